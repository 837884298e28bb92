"""`dot_product_attention`: softmax attention with every mask the layers need.

The op checks its arguments, builds one `AttentionMask` (defined in
`pallas_kernels/flash_attention/mask.py`) and passes it, with the arrays, to a backend of
`pallas_kernels/flash_attention/`: "xla" (everywhere), "cudnn" (through
`jax.nn.dot_product_attention`, NVIDIA GPUs), the Pallas flash-attention kernels
"pallas_mosaic_gpu", "pallas_triton", "pallas_tpu", and the Triton-language ones
"triton": the table `BACKENDS` at the end, which `dispatch` reads.
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.ops import dispatch
from attn_jax.ops.checks import check_qkv, segment_ids_int32
from attn_jax.ops.nonfinite_guard import guard_attention
from pallas_kernels.flash_attention.mask import AttentionMask


def dot_product_attention(query, key, value, *, scale=None, is_causal=False,
                          local_window_size=None, q_segment_ids=None, kv_segment_ids=None,
                          logits_soft_cap=None, sinks=None, return_residuals=False,
                          dropout_rate=0.0, dropout_rng=None, implementation=None):
  """Scaled dot-product (softmax) attention, `softmax(q kᵀ · scale) v`.

  Args:
    query: `[batch, q_seq, q_heads, head_dim]`.
    key: `[batch, kv_seq, kv_heads, head_dim]`; `q_heads` must be a multiple of `kv_heads`
      (GQA/MQA): query head h reads key/value head `h // (q_heads // kv_heads)`.
    value: `[batch, kv_seq, kv_heads, v_dim]`. query, key and value share one float dtype.
    scale: logit scale; None means `head_dim ** -0.5`.
    is_causal: query i sees keys up to its own position. Positions align at the end, so
      with `q_seq < kv_seq` (decoding against a cache) query i sits at `i + kv_seq - q_seq`.
    local_window_size: None (unlimited), an int w (= (w, w)), or `(left, right)`: query at
      position p sees keys in `[p - left, p + right]`; either bound may be None. The
      layers' `window_size` counts keys including the query instead (w means `(w - 1, 0)`
      causal): `ops.sliding_window` converts it.
    q_segment_ids, kv_segment_ids: `[batch, q_seq]`, `[batch, kv_seq]` integers, given
      together; a query sees only keys with the same id (packed sequences).
    logits_soft_cap: c > 0 turns logits into `c · tanh(logits / c)` (after scaling).
    sinks: `[q_heads]` learned sink logits: an extra softmax column with no value.
    return_residuals: also return the log-sum-exp of the (capped, scaled) logits,
      `[batch, q_heads, q_seq]` float32, sink included.
    dropout_rate: attention dropout in [0, 1): each weight is dropped with this
      probability and the kept ones divided by 1 - rate (training only; Zoology's
      attention uses 0.1). Only the XLA path applies it; the kernels refuse it.
    dropout_rng: the PRNG key that draws the dropout mask; needed when dropout_rate > 0.
    implementation: None picks the fastest that serves the call; or one of "xla",
      "cudnn", "pallas_mosaic_gpu", "pallas_triton", "triton", "pallas_tpu".

  Returns:
    `[batch, q_seq, q_heads, v_dim]` in the query's dtype (and the log-sum-exp with
    `return_residuals`). A query that sees no key gets zeros (and log-sum-exp -inf, or the
    sink's logit when sinks are given).

  Raises:
    ValueError: on malformed arguments, naming the argument and what was expected.
    NotImplementedError: when the named implementation cannot serve the call.
  """
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  check_qkv(query, key, value, grouped="query")
  batch, q_len, q_heads, head_dim = query.shape
  kv_len = key.shape[1]
  mask = AttentionMask.create(q_len, kv_len, is_causal=bool(is_causal),
                              local_window_size=local_window_size,
                              has_segments=q_segment_ids is not None)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together; got only "
                     + ("q_segment_ids." if kv_segment_ids is None else "kv_segment_ids."))
  if q_segment_ids is not None:
    q_segment_ids, kv_segment_ids = segment_ids_int32(
        ("q_segment_ids", q_segment_ids, (batch, q_len)),
        ("kv_segment_ids", kv_segment_ids, (batch, kv_len)))
  if logits_soft_cap is not None:
    logits_soft_cap = float(logits_soft_cap)
    if not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be > 0 or None; got {logits_soft_cap}.")
  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if sinks.shape != (q_heads,):
      raise ValueError(f"sinks must have shape [q_heads] = ({q_heads},); got {sinks.shape}.")
  scale = head_dim ** -0.5 if scale is None else float(scale)

  kwargs = dict(mask=mask, scale=scale, logits_soft_cap=logits_soft_cap,
                return_residuals=bool(return_residuals))
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not (
      0 <= dropout_rate < 1):
    raise ValueError(f"dropout_rate must be a number in [0, 1); got {dropout_rate!r}.")
  if dropout_rate:
    if dropout_rng is None:
      raise ValueError(f"dropout_rate={dropout_rate} needs dropout_rng, the PRNG key that "
                       "draws the dropout mask (jax.random.key(...)).")
    kwargs.update(dropout_rate=float(dropout_rate), dropout_rng=dropout_rng)
  return dispatch.dispatch("dot_product_attention", BACKENDS, implementation,
                           query, key, value, q_segment_ids, kv_segment_ids, sinks, **kwargs)


def _backend(entry, jit: bool, kernel: bool = True):
  """The op's call of `entry`, a backend's `flash_attention` (`pallas_kernels.
  flash_attention`): a Pallas kernel's through one shared jit (`dispatch.traced_once`);
  a fused kernel's (not XLA's) guarded against non-finite inputs (`nonfinite_guard`) and
  refusing attention dropout."""
  if jit:
    entry = dispatch.traced_once(entry, _STATIC_ARGS)

  def run(query, key, value, q_segment_ids, kv_segment_ids, sinks, **static):
    return entry(query, key, value, q_segment_ids=q_segment_ids,
                 kv_segment_ids=kv_segment_ids, sinks=sinks, **static)
  if not kernel:
    return run
  guarded = guard_attention(run)

  def run_kernel(*arrays, dropout_rate=0.0, dropout_rng=None, **static):
    del dropout_rng
    if dropout_rate:
      raise NotImplementedError(f"dropout_rate={dropout_rate}: the fused kernels have no "
                                "attention dropout; implementation='xla' (or None) has it.")
    return guarded(*arrays, **static)
  return run_kernel


_STATIC_ARGS = ("mask", "scale", "logits_soft_cap", "return_residuals", "interpret")

# pylint: disable=g-import-not-at-top  (a kernel is imported when it first runs)


def _xla():
  from pallas_kernels.flash_attention import xla
  return _backend(xla.flash_attention, jit=False, kernel=False)


def _cudnn():
  from pallas_kernels.flash_attention import cudnn
  return _backend(cudnn.flash_attention, jit=False)


def _pallas_mosaic_gpu():
  from pallas_kernels.flash_attention import pallas_mosaic_gpu
  return _backend(pallas_mosaic_gpu.flash_attention, jit=True)


def _pallas_triton():
  from pallas_kernels.flash_attention import pallas_triton
  return _backend(pallas_triton.flash_attention, jit=True)


def _triton():
  triton = dispatch.import_triton_kernels("pallas_kernels.flash_attention.triton")
  return _backend(triton.flash_attention, jit=True)


def _pallas_tpu():
  from pallas_kernels.flash_attention import pallas_tpu
  return _backend(pallas_tpu.flash_attention, jit=True)


# On an H100 (docs/perf/flash_attention.md) cuDNN and the Mosaic GPU kernel are level
# (0.92-1.20x cuDNN forward + backward; cuDNN ahead on long rows); the kernels
# serve what cuDNN cannot (segment ids, soft-cap, sinks, log-sum-exp, right windows),
# Mosaic GPU on Hopper, Triton elsewhere. "triton" (Triton-language kernels through
# jax-triton, the replacement of the deprecated Pallas Triton lowering) comes after
# pallas_triton until a GPU times it: it serves what pallas_triton refuses (issue 20).
BACKENDS = (
    dispatch.Backend("xla", "any", _xla),
    dispatch.Backend("cudnn", "gpu", _cudnn, interpretable=False),
    dispatch.Backend("pallas_mosaic_gpu", "gpu", _pallas_mosaic_gpu),
    dispatch.Backend("pallas_triton", "gpu", _pallas_triton),
    dispatch.Backend("triton", "gpu", _triton),
    dispatch.Backend("pallas_tpu", "tpu", _pallas_tpu),
)
