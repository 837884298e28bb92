"""Pieces the flash-attention kernels share: the checks of a call, the three loops over
masked and unmasked blocks, padding, the custom VJP around a forward and a backward
kernel (with the backward's Delta and the sink gradient), and the entry point of the two
Triton-backed kernels (`pallas_triton`, `triton`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention.mask import AttentionMask


def check_mask(mask: AttentionMask, query, key, q_segment_ids):
  """Checks that `mask` describes this call ([B, T, H, D] query and key).

  Raises:
    ValueError: its lengths are not the query's and key's sequence lengths, or its
      `has_segments` disagrees with the segment ids given.
  """
  if not isinstance(mask, AttentionMask):
    raise ValueError(f"mask must be an AttentionMask; got {mask!r}.")
  if (mask.q_len, mask.kv_len) != (query.shape[1], key.shape[1]):
    raise ValueError(f"mask lengths (q_len, kv_len) = {(mask.q_len, mask.kv_len)} must be "
                     f"the query and key sequence lengths {(query.shape[1], key.shape[1])}.")
  if mask.has_segments != (q_segment_ids is not None):
    raise ValueError(f"mask.has_segments={mask.has_segments} but segment ids were "
                     f"{'not ' if q_segment_ids is None else ''}given.")


def kernel_arguments(kernel: str, query, key, *, q_segment_ids, kv_segment_ids, sinks,
                     mask: AttentionMask):
  """The segment ids of a flash-attention kernel call ([B, T, H, D] query and key) as int32
  (or None), after the checks every kernel makes: both sequences non-empty, heads divide,
  segment ids given together, sinks of shape [Hq], a mask of this call (`check_mask`).

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
  check_mask(mask, query, key, q_segment_ids)
  if q_segment_ids is None:
    return None, None
  return q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)


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


def flash_vjp(forward, backward):
  """The differentiable attention `(q, k, v, q_seg, kv_seg, sinks, static) -> (out, lse)` of
  a kernel's forward and backward, FlashAttention-2's way: the forward saves out and the
  log-sum-exp; the backward gets Delta (`softmax_delta`) and computes dq, dk, dv; the sink
  gradient needs neither P nor a kernel (`sink_gradient`).

  Args:
    forward: `(q, k, v, q_seg, kv_seg, sinks, static) -> (out [B, Tq, Hq, Dv], lse
      [B, Hq, Tq] f32)`.
    backward: `(q, k, v, q_seg, kv_seg, lse, delta, d_out, static) -> (dq, dk, dv)`, d_out
      in q's dtype.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
  def attention(q, k, v, q_seg, kv_seg, sinks, static):
    return forward(q, k, v, q_seg, kv_seg, sinks, static)

  def attention_fwd(q, k, v, q_seg, kv_seg, sinks, static):
    out, lse = forward(q, k, v, q_seg, kv_seg, sinks, static)
    return (out, lse), (q, k, v, q_seg, kv_seg, sinks, out, lse)

  def attention_bwd(static, residuals, cotangents):
    q, k, v, q_seg, kv_seg, sinks, out, lse = residuals
    d_out, d_lse = cotangents
    delta = softmax_delta(out, d_out, d_lse)
    dq, dk, dv = backward(q, k, v, q_seg, kv_seg, lse, delta, d_out.astype(q.dtype), static)
    return dq, dk, dv, None, None, sink_gradient(sinks, lse, delta)

  attention.defvjp(attention_fwd, attention_bwd)
  return attention


def softmax_delta(out, d_out, d_lse):
  """Delta_i = rowsum(dO_i * O_i) - dlse_i [B, Hq, Tq] f32: with it dS_ij = P_ij (dP_ij -
  Delta_i), a cotangent on the log-sum-exp included."""
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  return delta - d_lse


def sink_gradient(sinks, lse, delta):
  """d sink_h = -sum_i p_sink_i Delta_i with p_sink_i = exp(sink_h - lse_i); None without
  sinks."""
  if sinks is None:
    return None
  p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
  return (-jnp.sum(p_sink * delta, axis=(0, 2))).astype(sinks.dtype)


# What the Triton-backed kernels (`pallas_triton`, `triton`) serve.
TRITON_DTYPES = ("float32", "bfloat16", "float16")
TRITON_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of a Triton-backed kernel's three kernels (`pallas_triton`, `triton`), and
  Triton's warps / pipeline stages.

  block_q, block_k: query and key rows per tile in the forward kernel.
  block_q_dkv, block_kv_dkv: the dK/dV kernel (one program per `block_kv_dkv` keys).
  block_q_dq, block_kv_dq: the dQ kernel (one program per `block_q_dq` queries).
  All are powers of two >= 16; they shrink to the (padded) sequence when it is shorter.
  """
  block_q: int = 64
  block_k: int = 64
  block_q_dkv: int = 32
  block_kv_dkv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 32
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for f in ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq",
              "block_kv_dq"):
      b = getattr(self, f)
      if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
        raise ValueError(f"BlockSizes.{f} must be a power of two >= 16; got {b!r}.")

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> BlockSizes:
    """The tuning-table entry for (head_dim rounded up to 64/128/256, dtype)."""
    dim = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    name = jnp.dtype(dtype).name
    return TRITON_TUNING[(dim, "float32" if name == "float32" else "16bit")]


# (head_dim, dtype) -> block sizes; bfloat16 and float16 share the "16bit" rows. Winners of a
# sweep of the `pallas_triton` kernels on one H100 (JAX 0.11.2; B=4, T=4096, H=16, causal;
# each kernel timed alone); the Triton-language ones take them untimed. The float32 rows
# for head_dim 64 and 256 were only checked to compile and run, not swept.
TRITON_TUNING = {
    (64, "16bit"): BlockSizes(128, 64, 64, 64, 64, 64, 4, 3, 4, 3),
    (128, "16bit"): BlockSizes(128, 64, 64, 64, 64, 64, 8, 3, 4, 2),
    (256, "16bit"): BlockSizes(128, 64, 64, 64, 64, 64, 8, 2, 4, 2),
    (64, "float32"): BlockSizes(128, 64, 64, 64, 64, 32, 8, 3, 4, 1),
    (128, "float32"): BlockSizes(128, 64, 64, 128, 64, 32, 8, 3, 4, 1),
    (256, "float32"): BlockSizes(64, 32, 32, 32, 32, 32, 4, 1, 4, 1),
}


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """The static arguments of a Triton-backed kernel's forward and backward."""
  mask: AttentionMask
  scale: float
  softcap: float | None
  blocks: BlockSizes
  interpret: bool


def shrink_block(b: int, n: int) -> int:
  """Block size b shrunk to a short sequence n (still a power of two ≥ 16)."""
  return min(b, max(16, 1 << max(0, n - 1).bit_length()))


def pow2_head_dim(d: int) -> int:
  """A head dim padded to a power of two ≥ 16 (the smallest Triton dot)."""
  return max(16, 1 << max(0, d - 1).bit_length())


def triton_flash_attention(kernel: str, attention, query, key, value, *,
                           q_segment_ids, kv_segment_ids, sinks, mask, scale,
                           logits_soft_cap, return_residuals, block_sizes, interpret):
  """A Triton-backed kernel's `flash_attention` (`pallas_triton.flash_attention`'s
  arguments and results): checks, then `attention(q, k, v, q_seg, kv_seg, sinks,
  TritonConfig)` (a `flash_vjp`) with `block_sizes or BlockSizes.get_default(head_dim,
  dtype)`.

  Raises:
    NotImplementedError: a dtype or head dim the kernels do not serve, or an empty
      sequence, naming `kernel`.
    ValueError: malformed arguments (`kernel_arguments`).
  """
  dtype = jnp.dtype(query.dtype)
  if dtype.name not in TRITON_DTYPES or key.dtype != dtype or value.dtype != dtype:
    raise NotImplementedError(
        f"{kernel} supports query/key/value dtype in {TRITON_DTYPES} (all equal); got "
        f"{query.dtype}, {key.dtype}, {value.dtype}.")
  for name, d in (("query/key head_dim", query.shape[-1]),
                  ("value head_dim", value.shape[-1])):
    if d > TRITON_MAX_HEAD_DIM:
      raise NotImplementedError(f"{kernel} supports {name} <= {TRITON_MAX_HEAD_DIM}; "
                                f"got {d}.")
  q_segment_ids, kv_segment_ids = kernel_arguments(
      kernel, query, key, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      sinks=sinks, mask=mask)
  config = TritonConfig(
      mask=mask, scale=float(scale),
      softcap=None if logits_soft_cap is None else float(logits_soft_cap),
      blocks=block_sizes or BlockSizes.get_default(query.shape[3], dtype), interpret=bool(interpret))
  out, lse = attention(query, key, value, q_segment_ids, kv_segment_ids, sinks, config)
  return (out, lse) if return_residuals else out
