"""Which key/value blocks a block of queries can see, for the flash-attention kernels.

Masks are declarative (causal, window (left, right), segment ids; query and key positions
aligned at the end of the sequences), so a kernel computes from its block index the range of
blocks that can hold a visible entry, skips the rest, and runs the blocks visible in full
without mask arithmetic. Shared by the Triton and Mosaic GPU kernels, with the padding of
sequences to whole blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Static mask: key j visible to query i iff, with d = j - (i + kv_len - q_len),
  d <= right (causal folded in) and d >= -left, j < kv_len, and equal segment ids."""
  q_len: int
  kv_len: int
  left: int | None
  right: int | None
  has_segments: bool

  @property
  def offset(self) -> int:
    return self.kv_len - self.q_len

  def visible(self, q_pos, k_pos, q_seg, k_seg, *, key_bound: bool = True):
    """Bool [bq, bk] from query positions / segment ids q_pos, q_seg ([bq, 1] or [bq, bk])
    and key positions / segment ids k_pos, k_seg ([1, bk] or [bq, bk]); segments may be
    None. key_bound=False leaves out the test j < kv_len, for a caller whose tile holds no
    key at or past kv_len that a query could otherwise see (`needs_key_bound`); then None
    means every pair is visible."""
    d = k_pos - (q_pos + self.offset)
    ok = k_pos < self.kv_len if key_bound else None
    both = lambda a, b: b if a is None else a & b
    if self.right is not None:
      ok = both(ok, d <= self.right)
    if self.left is not None:
      ok = both(ok, d >= -self.left)
    if q_seg is not None:
      ok = both(ok, q_seg == k_seg)
    return ok

  def needs_key_bound(self, bk: int) -> bool:
    """Whether a tile of bk keys can hold a key at or past kv_len that a query row before
    q_len would see but for the test j < kv_len: never when kv_len is a multiple of bk
    (the tiles end at kv_len) or when the mask is causal (right <= 0: a query sees no
    key after kv_len - 1 + right)."""
    return self.kv_len % bk != 0 and (self.right is None or self.right > 0)

  def kv_blocks(self, q0, bq, bk):
    """Key blocks for query rows [q0, q0 + bq): (lo, full_lo, full_hi, hi) block indices.

    Blocks in [lo, hi) may hold a visible key; [full_lo, full_hi) are visible in full. Only
    the rows before q_len count: a block of rows past q_len sees nothing, and a partial
    last block is judged by its real rows (the callers discard the others' outputs)."""
    off, n_full = self.offset, self.kv_len // bk
    q_end = jnp.minimum(q0 + bq, self.q_len)  # exclusive; <= q0 for rows past q_len
    lo = 0 if self.left is None else lax.div(jnp.maximum(q0 + off - self.left, 0), bk)
    hi, full_lo, full_hi = pl.cdiv(self.kv_len, bk), 0, n_full
    if self.right is not None:
      last = jnp.clip(q_end + off + self.right, 0, self.kv_len)  # exclusive
      hi = jnp.maximum(pl.cdiv(last, bk), lo)
      full_hi = lax.div(jnp.clip(q0 + off + self.right + 1, 0, self.kv_len), bk)
    if self.left is not None:
      full_lo = pl.cdiv(jnp.maximum(q_end - 1 + off - self.left, 0), bk)
    # No rows before q_len: nothing (a product, not jnp.where: see q_blocks).
    hi = lo + (hi - lo) * jnp.asarray(q0 < self.q_len, jnp.int32)
    return self._clip(lo, full_lo, full_hi, hi)

  def q_blocks(self, k0, bk, bq):
    """Query blocks for keys [k0, k0 + bk): (lo, full_lo, full_hi, hi) block indices.

    A block of keys all at or past kv_len is seen by nothing."""
    off = self.offset
    lo = 0 if self.right is None else lax.div(jnp.maximum(k0 - off - self.right, 0), bq)
    hi, full_lo, full_hi = pl.cdiv(self.q_len, bq), 0, pl.cdiv(self.q_len, bq)
    if self.left is not None:
      last = jnp.clip(k0 + bk - off + self.left, 0, self.q_len)  # exclusive
      hi = jnp.maximum(pl.cdiv(last, bq), lo)
      full_hi = lax.div(jnp.maximum(k0 - off + self.left + 1, 0), bq)
    if self.right is not None:
      full_lo = pl.cdiv(jnp.maximum(k0 + bk - 1 - off - self.right, 0), bq)
    # A key block that reaches into the padding is never visible in full. (A product, not
    # jnp.where: Triton lowering mistypes a scalar select of constants, JAX 0.11.2.)
    full_hi = full_hi * jnp.asarray(k0 + bk <= self.kv_len, jnp.int32)
    hi = lo + (hi - lo) * jnp.asarray(k0 < self.kv_len, jnp.int32)
    return self._clip(lo, full_lo, full_hi, hi)

  def _clip(self, lo, full_lo, full_hi, hi):
    if self.has_segments:  # segment ids can hide any entry: every block is masked.
      return lo, hi, hi, hi
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def kernel_arguments(kernel: str, query, key, *, q_segment_ids, kv_segment_ids, sinks,
                     is_causal: bool, window):
  """The BlockMask of a flash-attention kernel call ([B, T, H, D] query and key) and its
  segment ids as int32 (or None), after the checks every kernel makes: both sequences
  non-empty, heads divide, segment ids given together, sinks of shape [Hq].

  Raises:
    NotImplementedError: an empty sequence (`kernel` names the kernel in the message).
    ValueError: naming the argument that is malformed.
  """
  q_len, q_heads = query.shape[1], query.shape[2]
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if q_len == 0 or kv_len == 0:
    raise NotImplementedError(f"{kernel} needs q_seq, kv_seq >= 1; got q_seq={q_len}, "
                              f"kv_seq={kv_len}.")
  if q_heads % kv_heads:
    raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads "
                     f"({kv_heads}).")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
  if sinks is not None and sinks.shape != (q_heads,):
    raise ValueError(f"sinks must have shape ({q_heads},); got {sinks.shape}.")
  left, right = window
  if is_causal:
    right = 0 if right is None else min(right, 0)
  mask = BlockMask(q_len=q_len, kv_len=kv_len, left=left, right=right,
                   has_segments=q_segment_ids is not None)
  if q_segment_ids is None:
    return mask, None, None
  return mask, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


def masked_loops(body, lo, full_lo, full_hi, hi, carry):
  """Runs body(i, carry, masked) over [lo, full_lo) masked, [full_lo, full_hi) unmasked and
  [full_hi, hi) masked."""
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def pad(x, axis, size):
  """x zero-padded along `axis` to `size` (None stays None)."""
  if x is None or x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def round_up(n, m):
  """n rounded up to a multiple of m."""
  return -(-n // m) * m
