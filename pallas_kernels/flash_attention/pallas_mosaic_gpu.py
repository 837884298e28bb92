"""FlashAttention-3 in Pallas with the Mosaic GPU lowering, for Hopper (sm_90): the forward
kernel, the wrapper and its custom VJP.

Algorithm: FlashAttention-3 (Shah et al., 2024, https://arxiv.org/abs/2407.08608), after
JAX's example kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`), carried over to every
mask of `ops.dot_product_attention` and to bfloat16.

- Three warpgroups per CTA. Two compute warpgroups own `block_q` query rows each; the memory
  warpgroup streams key/value blocks into `max_concurrent_steps` shared-memory slots with TMA
  and refills a slot once both compute warpgroups have released it (mbarriers).
- A compute warpgroup computes S = Q Kᵀ with wgmma (Q and K in shared memory), runs the online
  softmax in registers (base 2, log2(e) folded into the scale) and accumulates O += P V with
  wgmma (P from registers). A schedule barrier makes the two warpgroups take turns at the
  tensor cores, so one's softmax overlaps the other's matmuls (FA3's ping-pong).
- Masks (`mask.AttentionMask`): the CTA streams the union of its two warpgroups' visible
  key blocks; a warpgroup passes over the blocks outside its own range without computing (it
  still waits on and releases them, which keeps every mbarrier phase in step). Blocks visible
  in full run without mask arithmetic.
- GQA/MQA: query head h reads key/value head h // groups straight from the [B, T, H, D]
  arrays; nothing is repeated. Sinks start the online softmax (m = sink, l = 1).
- Sequence lengths need not be multiples of the blocks, and nothing is padded for them: the
  grid covers cdiv(q_len, 2 * block_q) query tiles and the stream cdiv(kv_len, block_kv)
  key blocks; TMA zero-fills the rows of a copy past the end of an array and drops the rows
  of a store past it. Only a length that is not a multiple of 8 (the row tile of the
  swizzled TMA layout) is padded, to the next multiple of 8. Padded keys are masked only
  where a query could otherwise see them (`AttentionMask.needs_key_bound`), and a
  warpgroup whose rows all lie past q_len computes nothing.
- Backward: `mosaic_gpu_backward` (dQ and dK/dV kernels of the same structure; at head_dim
  256 the dK/dV kernel splits the columns between the warpgroups), for the same head dims.

Interpret mode (CPU): see `mosaic_gpu_parts`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_parts as parts
from pallas_kernels.flash_attention import mosaic_gpu_backward
from pallas_kernels.flash_attention.common import flash_vjp, kernel_arguments, pad, round_up
from pallas_kernels.flash_attention.mask import AttentionMask

_DTYPES = ("bfloat16", "float16")
_HEAD_DIMS = mosaic_gpu_backward.HEAD_DIMS  # (64, 128, 256): the backward serves the same.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_q: query rows per compute warpgroup (a CTA holds two); block_kv: keys per step;
  max_concurrent_steps: key/value shared-memory slots in flight; schedule_barrier: the
  warpgroups take turns at the tensor cores."""
  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2
  schedule_barrier: bool = True

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      b = getattr(self, name)
      if not (isinstance(b, int) and b > 0 and b % 64 == 0):
        raise ValueError(f"BlockSizes.{name} must be a positive multiple of 64; got {b!r}.")
    if self.max_concurrent_steps < 2:
      raise ValueError("BlockSizes.max_concurrent_steps must be >= 2; got "
                       f"{self.max_concurrent_steps!r}.")

  @classmethod
  def get_default(cls, head_dim: int) -> BlockSizes:
    return _TUNING[head_dim]


# head_dim -> forward block sizes: the largest key block whose two slots of K and V fit in
# shared memory next to Q. Sweep on one H100 (bf16, 16 heads, T 4096, full and causal;
# docs/perf/runs/2026-11-23c-h100-tune-mosaic_gpu-forward.json): these won or tied against
# 64-key blocks, 3-4 slots and no schedule barrier; 3 slots of 128 keys at D 128 overflow
# shared memory. The backward kernels use 64-row tiles and 2 slots (not swept).
_TUNING = {
    64: BlockSizes(64, 256),
    128: BlockSizes(64, 128),
    256: BlockSizes(64, 64),
}


@dataclasses.dataclass(frozen=True)
class _Static:
  mask: AttentionMask
  scale: float
  softcap: float | None
  groups: int
  has_sinks: bool
  blocks: BlockSizes
  interpret: bool


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, sink_ref, out_ref, lse_ref,
                    smem, barriers, *, st: _Static):
  """One CTA: 2 * block_q query rows of one (batch, head). q_ref, out_ref [B, Tq, Hq, D];
  k_ref, v_ref [B, Tk, Hkv, D]; q_seg_ref [B, Tq], kv_seg_ref [B, Tk] int32; sink_ref
  [Hq, block_q] f32 (log2(e) * sink, per row); lse_ref [B, Hq, Tq] f32."""
  q_smem2, k_smem, v_smem, lse_smem2, q_seg_smem2, kv_seg_smem, sink_smem2 = smem
  q_barriers, k_barriers, v_barriers, k_free, v_free, schedule = barriers
  bq, bk, slots = st.blocks.block_q, st.blocks.block_kv, st.blocks.max_concurrent_steps
  has_segments = q_seg_ref is not None
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  wg = lax.axis_index("wg")
  cta_q0 = lax.axis_index("q_seq") * (parts.COMPUTE_WARPGROUPS * bq)
  # Key blocks [cta_lo, cta_hi) hold every key either warpgroup can see.
  cta_lo, _, _, cta_hi = st.mask.kv_blocks(cta_q0, parts.COMPUTE_WARPGROUPS * bq, bk)

  kv_head = lax.div(head, jnp.int32(st.groups))

  def slot_of(j):
    return lax.rem(j - cta_lo, jnp.int32(slots))

  def load_keys(t, slot):  # Step t of the stream is key block cta_lo + t.
    keys = pl.ds((cta_lo + t) * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[slot],
                            k_barriers.at[slot])
    if has_segments:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], kv_seg_smem.at[slot],
                              k_barriers.at[slot])

  def load_values(t, slot):
    plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds((cta_lo + t) * bk, bk), kv_head],
                            v_smem.at[slot], v_barriers.at[slot])

  # Keys are released after S = Q Kᵀ, values after O += P V.
  queues = [(load_keys, k_barriers, k_free), (load_values, v_barriers, v_free)]

  def take_turn():
    if st.blocks.schedule_barrier:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  @pl.when(wg < parts.COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q0 = cta_q0 + wg * bq
    rows = pl.ds(q0, bq)
    q_smem = q_smem2.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_barriers.at[wg])
    if has_segments:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], q_seg_smem2.at[wg],
                              q_barriers.at[wg])
    if st.has_sinks:
      plgpu.copy_gmem_to_smem(sink_ref.at[head], sink_smem2.at[wg], q_barriers.at[wg])
    plgpu.barrier_wait(q_barriers.at[wg])
    q_seg = plgpu.load(q_seg_smem2.at[wg], layout=parts.ROWS) if has_segments else None

    # m_i, l_i: running row max (base 2) and softmax denominator; acc: unnormalised output.
    if st.has_sinks:  # The sink column first: m_i = sink, l_i = exp2(sink - m_i) = 1.
      m_i = plgpu.load(sink_smem2.at[wg], layout=parts.ROWS)
      l_i = plgpu.layout_cast(jnp.full((bq,), 1.0, jnp.float32), parts.ROWS)
    else:
      m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), parts.ROWS)
      l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), parts.ROWS)
    acc = plgpu.layout_cast(jnp.full((bq, v_smem.shape[-1]), 0.0, jnp.float32),
                            plgpu.Layout.WGMMA)

    lo, full_lo, full_hi, hi = st.mask.kv_blocks(q0, bq, bk)
    lo = jnp.clip(lo, cta_lo, cta_hi)
    full_lo, full_hi, hi = (jnp.clip(x, lo, cta_hi) for x in (full_lo, full_hi, hi))

    def wait_keys(j):  # Block j's keys, if this warpgroup computes block j.
      @pl.when(j < hi)
      def _wait():
        plgpu.barrier_wait(k_barriers.at[slot_of(j)])

    def step(j, carry, masked):  # Block j's keys have been awaited (wait_keys).
      acc, m_i, l_i = carry
      slot = slot_of(j)
      s, = parts.products_t([(q_smem, k_smem.at[slot])], st.interpret, take_turn)
      if masked and has_segments:
        kv_seg = plgpu.load(kv_seg_smem.at[slot], layout=parts.COLUMNS)
      plgpu.barrier_arrive(k_free.at[slot])
      s, c = parts.logits(s, st.scale, st.softcap)
      if masked:
        s = parts.hide(s, st.mask, q0, j * bk, 0, q_seg, kv_seg if has_segments else None)
      m_new = jnp.maximum(m_i, s.max(axis=1) * c)
      # A row that has seen no key yet has m_new = -inf: subtract 0 instead (exp2 -> 0).
      m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_ref)  # Rescales what was accumulated under the old max.
      p = jnp.exp2(s * c - lax.broadcast_in_dim(m_ref, s.shape, [0]))
      l_i = l_i * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p = p.astype(q_smem.dtype)
      acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
      if st.blocks.schedule_barrier:
        plgpu.barrier_arrive(schedule)  # Softmax done; the tensor cores are the other's.
      plgpu.barrier_wait(v_barriers.at[slot])
      if st.blocks.schedule_barrier:
        plgpu.barrier_wait(schedule)
      # The next block's keys are awaited while the tensor cores run P V (as FA3).
      acc, = parts.accumulate([(acc, p, v_smem.at[slot])], st.interpret,
                              lambda: wait_keys(j + 1))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i

    def pass_over(j, carry):  # A block only the other warpgroup needs.
      parts.pass_over(slot_of(j), queues)
      take_turn()
      take_turn()
      return carry

    pl.when(wg == 1)(take_turn)
    carry = lax.fori_loop(cta_lo, lo, pass_over, (acc, m_i, l_i))
    wait_keys(lo)
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    acc, m_i, l_i = lax.fori_loop(hi, cta_hi, pass_over, carry)
    pl.when(wg == 0)(take_turn)

    # O = acc / l; a row that saw nothing (l = 0) keeps acc = 0 and gets lse = -inf.
    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
    q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(q_smem.dtype)
    lse_smem2.at[wg][...] = m_i * parts.LN2 + jnp.log(l_i)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[batch, head, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == parts.COMPUTE_WARPGROUPS)
  def _memory():
    parts.stream(cta_hi - cta_lo, queues, slots, k_ref.shape[1] // bk)


def _forward(q, k, v, q_seg, kv_seg, sinks, st: _Static):
  """out [B, Tq, Hq, D] in q's dtype and lse [B, Hq, Tq] f32 (natural base)."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len = k.shape[1]
  bq, bk, slots = st.blocks.block_q, st.blocks.block_kv, st.blocks.max_concurrent_steps
  rows_per_cta = parts.COMPUTE_WARPGROUPS * bq
  # TMA handles the partial last blocks; only a length off the 8-row tile is padded (a copy).
  tq, tk = round_up(q_len, parts.TMA_ROWS), round_up(kv_len, parts.TMA_ROWS)
  q, q_seg = pad(q, 1, tq), pad(q_seg, 1, tq)
  k, v, kv_seg = (pad(x, 1, tk) for x in (k, v, kv_seg))
  q_tiles = pl.cdiv(q_len, rows_per_cta)
  sink_rows = None
  if sinks is not None:
    sink_rows = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None] * parts.LOG2E, (q_heads, bq))

  dtype = q.dtype
  wgs = parts.COMPUTE_WARPGROUPS
  smem = (
      plgpu.SMEM((wgs, bq, head_dim), dtype, transforms=parts.TILED),  # Q, then O
      plgpu.SMEM((slots, bk, head_dim), dtype, transforms=parts.TILED),  # K
      plgpu.SMEM((slots, bk, head_dim), dtype, transforms=parts.TILED),  # V
      plgpu.SMEM((wgs, bq), jnp.float32),  # lse
      None if q_seg is None else plgpu.SMEM((wgs, bq), jnp.int32),
      None if kv_seg is None else plgpu.SMEM((slots, bk), jnp.int32),
      None if sinks is None else plgpu.SMEM((wgs, bq), jnp.float32),
  )
  has_segments = q_seg is not None
  barriers = (
      plgpu.Barrier(num_arrivals=1 + has_segments + st.has_sinks, num_barriers=wgs),  # Q
      plgpu.Barrier(num_arrivals=1 + has_segments, num_barriers=slots),  # K (+ kv ids)
      plgpu.Barrier(num_barriers=slots),  # V
      plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),  # K slot free
      plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),  # V slot free
      plgpu.Barrier(num_arrivals=wgs),  # tensor-core turns
  )
  out, lse = parts.launch(
      functools.partial(_forward_kernel, st=st), (q, k, v, q_seg, kv_seg, sink_rows),
      (jax.ShapeDtypeStruct((batch, tq, q_heads, head_dim), dtype),
       # Whole tiles: a store of a [block_q] vector is a plain bulk copy, which would not
       # stop at the end of a row (1 MB at 16k tokens and 16 heads; sliced below).
       jax.ShapeDtypeStruct((batch, q_heads, q_tiles * rows_per_cta), jnp.float32)),
      smem, barriers, grid=(q_heads, q_tiles, batch),
      grid_names=("heads", "q_seq", "batch"), interpret=st.interpret)
  return out[:, :q_len], lse[:, :, :q_len]


def _backward(q, k, v, q_seg, kv_seg, lse, delta, d_out, st: _Static):
  config = mosaic_gpu_backward.Config(mask=st.mask, scale=st.scale, softcap=st.softcap,
                                      groups=st.groups, interpret=st.interpret)
  return mosaic_gpu_backward.backward(q, k, v, q_seg, kv_seg, lse, delta, d_out, config)


_attention = flash_vjp(_forward, _backward)


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, mask: AttentionMask, scale: float,
                    logits_soft_cap: float | None, return_residuals: bool,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Softmax attention `softmax(scale · q kᵀ) v` on Hopper, differentiable (q, k, v, sinks).

  Arguments and results as `pallas_triton.flash_attention`, except: query/key/value are
  bfloat16 or float16, and D = Dv in (64, 128, 256).

  Raises:
    NotImplementedError: naming the argument this kernel cannot serve (dtype, head dims,
      empty sequence).
    ValueError: malformed arguments, or a mask of other lengths (`common.check_mask`).
  """
  dtype = jnp.dtype(query.dtype)
  if dtype.name not in _DTYPES or key.dtype != dtype or value.dtype != dtype:
    raise NotImplementedError(
        f"pallas_mosaic_gpu supports query/key/value dtype in {_DTYPES} (all equal); got "
        f"{query.dtype}, {key.dtype}, {value.dtype}. Use 'pallas_triton' for float32.")
  head_dim = query.shape[-1]
  if head_dim not in _HEAD_DIMS or value.shape[-1] != head_dim:
    raise NotImplementedError(
        f"pallas_mosaic_gpu supports head_dim in {_HEAD_DIMS} with value head_dim equal to "
        f"it; got {head_dim} and {value.shape[-1]}. Use 'pallas_triton'.")
  q_segment_ids, kv_segment_ids = kernel_arguments(
      "pallas_mosaic_gpu", query, key, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, sinks=sinks, mask=mask)
  st = _Static(mask=mask, scale=float(scale),
               softcap=None if logits_soft_cap is None else float(logits_soft_cap),
               groups=query.shape[2] // key.shape[2], has_sinks=sinks is not None,
               blocks=block_sizes or BlockSizes.get_default(head_dim),
               interpret=bool(interpret))
  out, lse = _attention(query, key, value, q_segment_ids, kv_segment_ids, sinks, st)
  return (out, lse) if return_residuals else out
