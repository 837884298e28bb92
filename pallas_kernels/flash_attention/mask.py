"""Which keys a query sees: one small, hashable value from the public op to every backend.

`AttentionMask` is declarative: lengths, a window `(left, right)` with causality folded in,
and whether segment ids apply (their values are arrays and travel beside it). The XLA
backend reads it as a dense boolean array (`dense`); the flash kernels, which take it as a
static argument, compute from it the range of blocks a block of queries (or keys) can see,
skip the rest and run the blocks visible in full without mask arithmetic (`kv_blocks`,
`q_blocks`, `visible`). Ring attention reads its bounds. `sliding_window` converts the
layers' window size into the op's window.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """The static part of an attention mask.

  Positions are aligned at the end: query i sits at key position `i + kv_len - q_len` (a
  cache of earlier keys precedes the queries). With `d = j - (i + kv_len - q_len)`, key j
  is visible to query i when `-left <= d <= right` (a None bound is unbounded), and, with
  `has_segments`, when the two segment ids are equal.

  Causality is `right = 0` (a query sees no later key), folded into `right`; so a full
  mask is `AttentionMask(q_len, kv_len)`, a causal one `AttentionMask(q_len, kv_len,
  right=0)`, and masks combine with `&` (the keys both let through). `create` builds one
  from `dot_product_attention`'s arguments.
  """
  q_len: int
  kv_len: int
  left: int | None = None
  right: int | None = None
  has_segments: bool = False

  def __post_init__(self):
    for name in ("q_len", "kv_len", "left", "right"):
      value = getattr(self, name)
      if value is None and name in ("left", "right"):
        continue
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
          name.endswith("len") and value < 0):
        raise ValueError(f"AttentionMask.{name} must be "
                         f"{'an int >= 0' if name.endswith('len') else 'an int or None'}; "
                         f"got {value!r}.")
      object.__setattr__(self, name, int(value))  # numpy ints hash and compare as ints
    object.__setattr__(self, "has_segments", bool(self.has_segments))

  @classmethod
  def create(cls, q_len: int, kv_len: int, *, is_causal: bool = False,
             local_window_size=None, has_segments: bool = False) -> AttentionMask:
    """The mask of `dot_product_attention(..., is_causal, local_window_size)`.

    Args:
      q_len, kv_len: the query and key sequence lengths.
      is_causal: a query sees no key after its own position.
      local_window_size: None (unlimited), an int w (= `(w, w)`), or `(left, right)`: the
        query at position p sees keys in `[p - left, p + right]`; either bound may be None.
        (A layer's `window_size` counts keys including the query: `sliding_window`.)
      has_segments: segment ids are given.

    Raises:
      ValueError: a malformed `local_window_size`, naming what it got.
    """
    left, right = _window_bounds(local_window_size)
    mask = cls(q_len, kv_len, left, right, has_segments)
    return mask & cls(q_len, kv_len, right=0) if is_causal else mask

  def __and__(self, other: AttentionMask) -> AttentionMask:
    """The keys both masks let through (of the same lengths)."""
    if (self.q_len, self.kv_len) != (other.q_len, other.kv_len):
      raise ValueError(f"masks of different lengths cannot combine: (q_len, kv_len) = "
                       f"{(self.q_len, self.kv_len)} and {(other.q_len, other.kv_len)}.")
    tighter = lambda a, b: b if a is None else a if b is None else min(a, b)
    return AttentionMask(self.q_len, self.kv_len, tighter(self.left, other.left),
                         tighter(self.right, other.right),
                         self.has_segments or other.has_segments)

  @property
  def offset(self) -> int:
    """The key position of query 0."""
    return self.kv_len - self.q_len

  @property
  def is_causal(self) -> bool:
    """Whether no query sees a later key."""
    return self.right is not None and self.right <= 0

  def dense(self, q_segment_ids=None, kv_segment_ids=None):
    """Boolean `[batch or 1, q_len, kv_len]` visibility; segment ids `[batch, q_len]`,
    `[batch, kv_len]` (or None)."""
    q_pos = jnp.arange(self.q_len)[:, None]
    k_pos = jnp.arange(self.kv_len)[None, :]
    ok = self.visible(q_pos, k_pos, key_bound=False)
    ok = jnp.ones((self.q_len, self.kv_len), bool) if ok is None else ok
    ok = ok[None]
    if q_segment_ids is not None:
      ok = ok & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return ok

  def visible(self, q_pos, k_pos, q_seg=None, k_seg=None, *, key_bound: bool = True):
    """Bool tile from query positions / segment ids q_pos, q_seg ([bq, 1] or [bq, bk])
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
    hi, full_lo, full_hi = _cdiv(self.kv_len, bk), 0, n_full
    if self.right is not None:
      last = jnp.clip(q_end + off + self.right, 0, self.kv_len)  # exclusive
      hi = jnp.maximum(_cdiv(last, bk), lo)
      full_hi = lax.div(jnp.clip(q0 + off + self.right + 1, 0, self.kv_len), bk)
    if self.left is not None:
      full_lo = _cdiv(jnp.maximum(q_end - 1 + off - self.left, 0), bk)
    # No rows before q_len: nothing (a product, not jnp.where: see q_blocks).
    hi = lo + (hi - lo) * jnp.asarray(q0 < self.q_len, jnp.int32)
    return self._clip(lo, full_lo, full_hi, hi)

  def q_blocks(self, k0, bk, bq):
    """Query blocks for keys [k0, k0 + bk): (lo, full_lo, full_hi, hi) block indices.

    A block of keys all at or past kv_len is seen by nothing."""
    off = self.offset
    lo = 0 if self.right is None else lax.div(jnp.maximum(k0 - off - self.right, 0), bq)
    hi, full_lo, full_hi = _cdiv(self.q_len, bq), 0, _cdiv(self.q_len, bq)
    if self.left is not None:
      last = jnp.clip(k0 + bk - off + self.left, 0, self.q_len)  # exclusive
      hi = jnp.maximum(_cdiv(last, bq), lo)
      full_hi = lax.div(jnp.maximum(k0 - off + self.left + 1, 0), bq)
    if self.right is not None:
      full_lo = _cdiv(jnp.maximum(k0 + bk - 1 - off - self.right, 0), bq)
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


def sliding_window(size: int | None, *, causal: bool):
  """A layer's `window_size` as `dot_product_attention`'s `local_window_size`.

  The layers count a window in keys including the query itself (Based/Zoology, Mistral):
  size w lets the query at p see `p - w + 1 … p`, and `… p + w - 1` when not causal, that
  is `(w - 1, 0)` or `(w - 1, w - 1)`. The op's int w means `(w, w)`: w keys on each side
  besides the query. None (no window) stays None.
  """
  if size is None:
    return None
  return (size - 1, 0 if causal else size - 1)


def _window_bounds(local_window_size):
  """`local_window_size` (None, an int w, or `(left, right)`) as checked `(left, right)`."""
  if local_window_size is None:
    return None, None
  if isinstance(local_window_size, (int, np.integer)):
    left = right = int(local_window_size)
  else:
    try:
      left, right = local_window_size
    except (TypeError, ValueError):
      raise ValueError("local_window_size must be None, an int, or (left, right); got "
                       f"{local_window_size!r}.") from None
  for side, w in (("left", left), ("right", right)):
    if w is not None and (not isinstance(w, (int, np.integer)) or w < 0):
      raise ValueError(f"local_window_size {side} bound must be a non-negative int or "
                       f"None; got {local_window_size!r}.")
  return (None if left is None else int(left)), (None if right is None else int(right))


def _cdiv(a, b):
  """⌈a / b⌉ for a ≥ 0, b > 0, as `pl.cdiv` (without importing Pallas with the ops)."""
  if isinstance(a, int) and isinstance(b, int):
    return -(-a // b)
  return lax.div(a + (b - 1), b)
