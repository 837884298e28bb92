"""FlashAttention-2 in Pallas with the Triton lowering: forward and backward, any NVIDIA GPU.

Algorithm: FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691). The forward pass
walks the key/value blocks of one query block with an online softmax (running row max m_i,
denominator l_i, unnormalised output acc) and writes the output and the log-sum-exp. The
backward pass recomputes the probabilities P from the saved log-sum-exp in two kernels: one
per key block accumulating dK, dV over the query blocks, one per query block accumulating dQ
over the key blocks (no atomics, no [Tq, Tk] intermediate).

Design choices:
- Masks are declarative (causal, window (left, right), segment ids, all aligned at the end of
  the sequences), so each kernel computes from its block index the range of blocks that can
  hold a visible entry and skips the rest: a causal window of w on T tokens costs about
  w / T of full attention. Inside that range, blocks that are entirely visible run a loop
  with no mask arithmetic; only the diagonal/edge blocks pay for `where` (`mask.AttentionMask`).
- GQA/MQA: query head h reads key/value head h // groups through the BlockSpec index map; the
  dK/dV kernel runs per key/value head and loops over the heads of its group, so repeated
  K/V is never materialised and no per-query-head dK/dV is summed afterwards.
- Sinks: the sink is one more softmax column with logit `sink` and no value, so the online
  softmax simply starts from it (m_i = sink, l_i = 1). Its gradient needs only the saved
  log-sum-exp and Delta, so it is computed outside the kernels in plain jnp.
- The softmax runs in base 2 (`exp2`; log2(e) folded into the logit scale); the returned
  log-sum-exp is in the natural base. A row that sees nothing gets output 0 and lse -inf.
- Sequence lengths are padded up to the block sizes and head dims up to a power of two
  (>= 16, the smallest Triton dot) inside the wrapper; padded keys are masked, padded query
  rows are sliced off (and contribute exactly zero to dK/dV since their dO and Delta are 0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.common import (BlockSizes, TritonConfig, flash_vjp,
                                                  masked_loops,
                                                  pad, pow2_head_dim, round_up,
                                                  shrink_block, triton_flash_attention)
from pallas_kernels.flash_attention.mask import AttentionMask

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)




def _visible(mask: AttentionMask, q_pos, k_pos, q_seg, k_seg):
  """Bool [bq, bk] tile mask from query positions / ids [bq] and key positions / ids [bk]."""
  column = lambda x: None if x is None else x[:, None]
  row = lambda x: None if x is None else x[None, :]
  return mask.visible(column(q_pos), row(k_pos), column(q_seg), row(k_seg))


def _logits(q, k, scale, softcap):
  """Base-2 logits log2(e) * softcap(scale * q kᵀ) [bq, bk] f32, and the tanh (or None)."""
  s = plgpu.dot(q, k, trans_b=True)
  if softcap is None:
    return s * (scale * _LOG2E), None
  t = jnp.tanh(s * (scale / softcap))
  return t * (softcap * _LOG2E), t


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, sink_ref, o_ref, lse_ref, *,
                mask: AttentionMask, scale: float, softcap: float | None, block_k: int):
  """One (query block, batch, head) program. q_ref [bq, D]; k_ref [Tk, D]; v_ref [Tk, Dv];
  q_seg_ref [bq]; kv_seg_ref [Tk]; sink_ref [1]; o_ref [bq, Dv]; lse_ref [bq]."""
  block_q = q_ref.shape[0]
  q0 = pl.program_id(0) * block_q
  q_pos = q0 + jnp.arange(block_q)
  q = q_ref[...]  # Stays on chip for the whole loop over key blocks.
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  # m_i, l_i: running row max and softmax denominator (base 2); acc: unnormalised output.
  if sink_ref is None:
    m_i = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l_i = jnp.zeros((block_q,), jnp.float32)
  else:  # Start from the sink column: m_i = sink, l_i = exp2(sink - m_i) = 1.
    m_i = jnp.zeros((block_q,), jnp.float32) + sink_ref[...].astype(jnp.float32) * _LOG2E
    l_i = jnp.ones((block_q,), jnp.float32)
  acc = jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32)

  # The loop over query blocks is the grid; this is FlashAttention-2's inner loop over K, V.
  def body(j, carry, masked):
    acc, m_i, l_i = carry
    keys = pl.ds(j * block_k, block_k)
    s, _ = _logits(q, k_ref[keys, :], scale, softcap)  # S_ij
    if masked:
      k_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
      k_pos = j * block_k + jnp.arange(block_k)
      s = jnp.where(_visible(mask, q_pos, k_pos, q_seg, k_seg), s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
    # A row that has seen no key yet has m_new = -inf: subtract 0 instead (exp2 -> 0, no NaN).
    m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m_i - m_ref)  # Rescales what was accumulated under the old max.
    p = jnp.exp2(s - m_ref[:, None])  # P~_ij
    l_i = alpha * l_i + jnp.sum(p, axis=-1)
    v = v_ref[keys, :]
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l_i

  lo, full_lo, full_hi, hi = mask.kv_blocks(q0, block_q, block_k)
  acc, m_i, l_i = masked_loops(body, lo, full_lo, full_hi, hi, (acc, m_i, l_i))
  # O_i = acc / l_i; a row that saw nothing (l_i = 0) keeps acc = 0.
  o_ref[...] = (acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = (m_i + jnp.log2(l_i)) * _LN2  # -inf + -inf = -inf when l_i = 0.


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, mask: AttentionMask, scale: float, softcap: float | None, block_k: int):
  """One (query block, batch, head) program: dQ_i = scale * sum_j dS_ij K_j.
  q_ref, do_ref [bq, D|Dv]; k_ref, v_ref [Tk, D|Dv]; lse_ref (base 2), delta_ref [bq]."""
  block_q = q_ref.shape[0]
  q0 = pl.program_id(0) * block_q
  q_pos = q0 + jnp.arange(block_q)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, dq, masked):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    s, t = _logits(q, k, scale, softcap)
    if masked:
      k_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
      k_pos = j * block_k + jnp.arange(block_k)
      s = jnp.where(_visible(mask, q_pos, k_pos, q_seg, k_seg), s, -jnp.inf)
    p = jnp.exp2(s - lse)  # P_ij
    dp = plgpu.dot(do, v_ref[keys, :], trans_b=True)  # dP_ij = dO_i · V_j
    ds = p * (dp - delta)  # dS_ij = P_ij (dP_ij - Delta_i)
    if softcap is not None:
      ds = ds * (1.0 - t * t)  # Through cap * tanh(x / cap).
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  lo, full_lo, full_hi, hi = mask.kv_blocks(q0, block_q, block_k)
  dq = jnp.zeros(q_ref.shape, jnp.float32)
  dq = masked_loops(body, lo, full_lo, full_hi, hi, dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, mask: AttentionMask, scale: float, softcap: float | None,
                 block_q: int):
  """One (key block, batch, kv head) program: dV_j = sum_i P_ij dO_i and
  dK_j = scale * sum_i dS_ij Q_i over all query heads of the group.
  q_ref, do_ref [Tq, groups, D|Dv]; lse_ref (base 2), delta_ref [groups, Tq];
  k_ref, v_ref, dk_ref, dv_ref [bk, D|Dv]; kv_seg_ref [bk]; q_seg_ref [Tq]."""
  block_k = k_ref.shape[0]
  k0 = pl.program_id(0) * block_k
  k_pos = k0 + jnp.arange(block_k)
  k, v = k_ref[...], v_ref[...]  # Stay on chip for the whole loop over query blocks.
  k_seg = None if kv_seg_ref is None else kv_seg_ref[...]

  def body(i, carry, g, masked):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q, do = q_ref[rows, g, :], do_ref[rows, g, :]
    s, t = _logits(q, k, scale, softcap)
    if masked:
      q_seg = None if q_seg_ref is None else q_seg_ref[rows]
      q_pos = i * block_q + jnp.arange(block_q)
      s = jnp.where(_visible(mask, q_pos, k_pos, q_seg, k_seg), s, -jnp.inf)
    p = jnp.exp2(s - lse_ref[g, rows][:, None])  # P_ij
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)  # P_ijᵀ dO_i
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta_ref[g, rows][:, None])
    if softcap is not None:
      ds = ds * (1.0 - t * t)
    return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

  lo, full_lo, full_hi, hi = mask.q_blocks(k0, block_k, block_q)

  def group(g, carry):  # Query heads g of this kv head's group, one after the other.
    return masked_loops(functools.partial(body, g=g), lo, full_lo, full_hi, hi, carry)

  dk = jnp.zeros(k_ref.shape, jnp.float32)
  dv = jnp.zeros(v_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_ref.shape[1], group, (dk, dv))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, q_seg, kv_seg, sinks, st: TritonConfig):
  """Returns out [B, Tq, Hq, Dv] (query dtype) and lse [B, Hq, Tq] float32."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  groups = q_heads // kv_heads
  bq, bk = shrink_block(st.blocks.block_q, q_len), shrink_block(st.blocks.block_k, kv_len)
  tq, tk = round_up(q_len, bq), round_up(kv_len, bk)
  dp, dvp = pow2_head_dim(head_dim), pow2_head_dim(v_dim)
  q = pad(pad(q, 1, tq), 3, dp)
  k = pad(pad(k, 1, tk), 3, dp)
  v = pad(pad(v, 1, tk), 3, dvp)
  q_seg, kv_seg = pad(q_seg, 1, tq), pad(kv_seg, 1, tk)

  in_specs = [
      pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, tk, None, dp), lambda i, b, h: (b, 0, h // groups, 0)),
      pl.BlockSpec((None, tk, None, dvp), lambda i, b, h: (b, 0, h // groups, 0)),
      None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
      None if kv_seg is None else pl.BlockSpec((None, tk), lambda i, b, h: (b, 0)),
      None if sinks is None else pl.BlockSpec((1,), lambda i, b, h: (h,)),
  ]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, mask=st.mask, scale=st.scale, softcap=st.softcap,
                        block_k=bk),
      grid=(tq // bq, batch, q_heads),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, dvp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((batch, tq, q_heads, dvp), q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, tq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps,
                                           num_stages=st.blocks.num_stages),
      interpret=st.interpret,
      name="flash_attention_fwd",
  )(q, k, v, q_seg, kv_seg, sinks)
  return out[:, :q_len, :, :v_dim], lse[:, :, :q_len]


def _backward(q, k, v, q_seg, kv_seg, lse, delta, do, st: TritonConfig):
  """dq, dk, dv from the log-sum-exp lse and Delta [B, Hq, Tq] (f32, natural base)."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  groups = q_heads // kv_heads
  b = st.blocks
  bq_dkv, bk_dkv = shrink_block(b.block_q_dkv, q_len), shrink_block(b.block_kv_dkv, kv_len)
  bq_dq, bk_dq = shrink_block(b.block_q_dq, q_len), shrink_block(b.block_kv_dq, kv_len)
  tq = round_up(q_len, max(bq_dkv, bq_dq))
  tk = round_up(kv_len, max(bk_dkv, bk_dq))
  dp, dvp = pow2_head_dim(head_dim), pow2_head_dim(v_dim)
  q, do = pad(pad(q, 1, tq), 3, dp), pad(pad(do, 1, tq), 3, dvp)
  k, v = pad(pad(k, 1, tk), 3, dp), pad(pad(v, 1, tk), 3, dvp)
  q_seg, kv_seg = pad(q_seg, 1, tq), pad(kv_seg, 1, tk)
  # Rows that saw nothing have lse = -inf and all logits -inf: use 0 so P = exp2(-inf) = 0.
  lse = pad(jnp.where(lse == -jnp.inf, 0.0, lse * _LOG2E), 2, tq)
  delta = pad(delta, 2, tq)
  params = plgpu.CompilerParams(num_warps=b.num_warps_bwd, num_stages=b.num_stages_bwd)
  static = dict(mask=st.mask, scale=st.scale, softcap=st.softcap)
  seg = lambda x, n, index: None if x is None else pl.BlockSpec((None, n), index)

  row_spec = lambda d: pl.BlockSpec((None, bq_dq, None, d), lambda i, b, h: (b, i, h, 0))
  kv_spec = lambda d: pl.BlockSpec((None, tk, None, d),
                                   lambda i, b, h: (b, 0, h // groups, 0))
  stat_spec = pl.BlockSpec((None, None, bq_dq), lambda i, b, h: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=bk_dq, **static),
      grid=(tq // bq_dq, batch, q_heads),
      in_specs=[row_spec(dp), kv_spec(dp), kv_spec(dvp),
                seg(q_seg, bq_dq, lambda i, b, h: (b, i)),
                seg(kv_seg, tk, lambda i, b, h: (b, 0)),
                row_spec(dvp), stat_spec, stat_spec],
      out_specs=row_spec(dp),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=st.interpret, name="flash_attention_dq",
  )(q, k, v, q_seg, kv_seg, do, lse, delta)

  # The dK/dV program of kv head h reads the query heads [h * groups, (h + 1) * groups).
  group_spec = lambda d: pl.BlockSpec((None, tq, groups, d), lambda j, b, h: (b, 0, h, 0))
  key_spec = lambda d: pl.BlockSpec((None, bk_dkv, None, d), lambda j, b, h: (b, j, h, 0))
  stat_spec = pl.BlockSpec((None, groups, tq), lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=bq_dkv, **static),
      grid=(tk // bk_dkv, batch, kv_heads),
      in_specs=[group_spec(dp), key_spec(dp), key_spec(dvp),
                seg(q_seg, tq, lambda j, b, h: (b, 0)),
                seg(kv_seg, bk_dkv, lambda j, b, h: (b, j)),
                group_spec(dvp), stat_spec, stat_spec],
      out_specs=[key_spec(dp), key_spec(dvp)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=st.interpret, name="flash_attention_dkdv",
  )(q, k, v, q_seg, kv_seg, do, lse, delta)
  return (dq[:, :q_len, :, :head_dim], dk[:, :kv_len, :, :head_dim],
          dv[:, :kv_len, :, :v_dim])


_attention = flash_vjp(_forward, _backward)


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, mask: AttentionMask, scale: float,
                    logits_soft_cap: float | None, return_residuals: bool,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Softmax attention `softmax(scale · q kᵀ) v`, differentiable (q, k, v, sinks).

  Args:
    query: `[B, Tq, Hq, D]`; key: `[B, Tk, Hkv, D]`; value: `[B, Tk, Hkv, Dv]`; one dtype of
      float32 / bfloat16 / float16; Hq a multiple of Hkv (query head h reads kv head
      h // (Hq // Hkv)); D, Dv <= 256.
    q_segment_ids, kv_segment_ids: `[B, Tq]`, `[B, Tk]` int32, or None (both).
    sinks: `[Hq]` float sink logits (an extra softmax column with no value), or None.
    mask: which keys each query sees (`mask.AttentionMask` of lengths Tq, Tk, with
      `has_segments` when segment ids are given).
    scale: logit scale.
    logits_soft_cap: c turns logits into c · tanh(logits / c); None for none.
    return_residuals: also return lse `[B, Hq, Tq]` float32 (sink included), differentiable.
    block_sizes: None for `BlockSizes.get_default(D, dtype)`.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    out `[B, Tq, Hq, Dv]` in the query's dtype (0 for a row that sees no key), and with
    return_residuals lse (-inf, or the sink logit, for such a row).

  Raises:
    NotImplementedError: naming the argument this kernel cannot serve (dtype, head dim,
      empty sequence).
    ValueError: malformed arguments, or a mask of other lengths (`common.check_mask`).
  """
  return triton_flash_attention(
      "pallas_triton", _attention, query, key, value,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks, mask=mask,
      scale=scale, logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
      block_sizes=block_sizes, interpret=interpret)


def flash_attention_reference(query, key, value, *, q_segment_ids=None,
                              kv_segment_ids=None, sinks=None, mask: AttentionMask,
                              scale: float, logits_soft_cap):
  """Plain-jnp attention with the same arguments: returns (out, lse), for checking."""
  batch, q_len, q_heads, _ = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  k = jnp.repeat(key, q_heads // kv_heads, axis=2)
  v = jnp.repeat(value, q_heads // kv_heads, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", query, k, preferred_element_type=jnp.float32) * scale
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  s = jnp.where(mask.dense(q_segment_ids, kv_segment_ids)[:, None], s, -jnp.inf)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None],
                            (batch, q_heads, q_len, 1))
    s = jnp.concatenate([s, sink], axis=-1)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse)[..., None])[..., :kv_len]
  out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
  return out.astype(query.dtype), lse
