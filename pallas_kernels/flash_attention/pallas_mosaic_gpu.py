"""FlashAttention-3 forward in Pallas with the Mosaic GPU lowering, for Hopper (sm_90).

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
- Masks (`block_mask.BlockMask`): the CTA streams the union of its two warpgroups' visible
  key blocks; a warpgroup passes over the blocks outside its own range without computing (it
  still waits on and releases them, which keeps every mbarrier phase in step). Blocks visible
  in full run without mask arithmetic.
- GQA/MQA: query head h reads key/value head h // groups straight from the [B, T, H, D]
  arrays; nothing is repeated. Sinks start the online softmax (m = sink, l = 1).
- Sequence lengths are padded to the blocks in the wrapper (padded keys are masked, padded
  query rows sliced off). The backward pass is the Triton kernels' (`pallas_triton`), fed
  with this kernel's log-sum-exp.

Interpret mode (CPU): JAX's Mosaic GPU interpreter simulates the warpgroups, shared memory,
TMA copies and barriers, but not wgmma with a register operand nor `run_state`; there the two
matmuls are plain dots of the same shared-memory tiles. Everything else runs as compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import pallas_triton
from pallas_kernels.flash_attention.block_mask import BlockMask

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_DTYPES = ("bfloat16", "float16")
_HEAD_DIMS = (64, 128, 256)
_COMPUTE_WARPGROUPS = 2
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # A vector over the query rows of a tile.
_COLUMNS = plgpu.Layout.WGMMA.reduce(0)  # A vector over the key columns of a tile.


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


# head_dim -> block sizes: the largest key block whose two slots of K and V fit in shared
# memory next to Q (as in JAX's example kernel); not yet swept on our shapes.
_TUNING = {
    64: BlockSizes(64, 256),
    128: BlockSizes(64, 128),
    256: BlockSizes(64, 64),
}


@dataclasses.dataclass(frozen=True)
class _Static:
  mask: BlockMask
  scale: float
  softcap: float | None
  groups: int
  has_sinks: bool
  blocks: BlockSizes
  interpret: bool


def _logits(s, st: _Static):
  """Base-2 logits log2(e) * softcap(scale * s) of the f32 tile s."""
  if st.softcap is None:
    return s * (st.scale * _LOG2E)
  return jnp.tanh(s * (st.scale / st.softcap)) * (st.softcap * _LOG2E)


def _qk(q_smem, k_smem, while_running, interpret):
  """q_smem [bq, D] · k_smem [bk, D]ᵀ in f32; while_running() runs while wgmma computes."""
  if interpret:
    s = lax.dot_general(q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    while_running()
    return s

  def compute(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
    while_running()
    return acc_ref[...]
  return pl.run_scoped(compute, plgpu.ACC((q_smem.shape[0], k_smem.shape[0]), jnp.float32))


def _pv(acc, p, v_smem, interpret):
  """acc [bq, Dv] f32 + p [bq, bk] (registers) · v_smem [bk, Dv]."""
  if interpret:
    return acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)

  def compute(acc_ref):
    plgpu.wgmma(acc_ref, p, v_smem)
  return pl.run_state(compute)(plgpu.ACC.init(acc))


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
  cta_q0 = lax.axis_index("q_seq") * (_COMPUTE_WARPGROUPS * bq)
  # Key blocks [cta_lo, cta_hi) hold every key either warpgroup can see.
  cta_lo, _, _, cta_hi = st.mask.kv_blocks(cta_q0, _COMPUTE_WARPGROUPS * bq, bk)

  def slot_of(j):
    return lax.rem(j - cta_lo, jnp.int32(slots))

  def take_turn():
    if st.blocks.schedule_barrier:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  @pl.when(wg < _COMPUTE_WARPGROUPS)
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
    q_seg = plgpu.load(q_seg_smem2.at[wg], layout=_ROWS) if has_segments else None

    # m_i, l_i: running row max (base 2) and softmax denominator; acc: unnormalised output.
    if st.has_sinks:  # The sink column first: m_i = sink, l_i = exp2(sink - m_i) = 1.
      m_i = plgpu.load(sink_smem2.at[wg], layout=_ROWS)
      l_i = plgpu.layout_cast(jnp.full((bq,), 1.0, jnp.float32), _ROWS)
    else:
      m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _ROWS)
      l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), _ROWS)
    acc = plgpu.layout_cast(jnp.full((bq, v_smem.shape[-1]), 0.0, jnp.float32),
                            plgpu.Layout.WGMMA)

    def step(j, carry, masked):
      acc, m_i, l_i = carry
      slot = slot_of(j)
      plgpu.barrier_wait(k_barriers.at[slot])
      s = _qk(q_smem, k_smem.at[slot], take_turn, st.interpret)
      if masked and has_segments:
        kv_seg = plgpu.load(kv_seg_smem.at[slot], layout=_COLUMNS)
      plgpu.barrier_arrive(k_free.at[slot])
      s = _logits(s, st)
      if masked:
        q_pos = q0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        k_pos = j * bk + plgpu.broadcasted_iota(jnp.int32, s.shape, 1,
                                                layout=plgpu.Layout.WGMMA)
        segments = (None, None)
        if has_segments:
          segments = (lax.broadcast_in_dim(q_seg, s.shape, [0]),
                      lax.broadcast_in_dim(kv_seg, s.shape, [1]))
        s = jnp.where(st.mask.visible(q_pos, k_pos, *segments), s, -jnp.inf)
      m_new = jnp.maximum(m_i, s.max(axis=1))
      # A row that has seen no key yet has m_new = -inf: subtract 0 instead (exp2 -> 0).
      m_ref = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
      alpha = jnp.exp2(m_i - m_ref)  # Rescales what was accumulated under the old max.
      p = jnp.exp2(s - lax.broadcast_in_dim(m_ref, s.shape, [0]))
      l_i = l_i * alpha + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      p = p.astype(q_smem.dtype)
      acc, l_i, m_new, p = lax.optimization_barrier((acc, l_i, m_new, p))
      if st.blocks.schedule_barrier:
        plgpu.barrier_arrive(schedule)  # Softmax done; the tensor cores are the other's.
      plgpu.barrier_wait(v_barriers.at[slot])
      if st.blocks.schedule_barrier:
        plgpu.barrier_wait(schedule)
      acc = _pv(acc, p, v_smem.at[slot], st.interpret)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i

    def pass_over(j, carry):  # A block the other warpgroup needs: release it unread.
      slot = slot_of(j)
      plgpu.barrier_wait(k_barriers.at[slot])
      plgpu.barrier_arrive(k_free.at[slot])
      take_turn()
      plgpu.barrier_wait(v_barriers.at[slot])
      plgpu.barrier_arrive(v_free.at[slot])
      take_turn()
      return carry

    lo, full_lo, full_hi, hi = st.mask.kv_blocks(q0, bq, bk)
    lo = jnp.clip(lo, cta_lo, cta_hi)
    full_lo, full_hi, hi = (jnp.clip(x, lo, cta_hi) for x in (full_lo, full_hi, hi))
    pl.when(wg == 1)(take_turn)
    carry = lax.fori_loop(cta_lo, lo, pass_over, (acc, m_i, l_i))
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    acc, m_i, l_i = lax.fori_loop(hi, cta_hi, pass_over, carry)
    pl.when(wg == 0)(take_turn)

    # O = acc / l; a row that saw nothing (l = 0) keeps acc = 0 and gets lse = -inf.
    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
    q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(q_smem.dtype)
    lse_smem2.at[wg][...] = m_i * _LN2 + jnp.log(l_i)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[batch, head, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, jnp.int32(st.groups))

    def load_keys(j, slot):
      keys = pl.ds(j * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], k_smem.at[slot],
                              k_barriers.at[slot])
      if has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], kv_seg_smem.at[slot],
                                k_barriers.at[slot])

    def load_values(j, slot):
      plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(j * bk, bk), kv_head], v_smem.at[slot],
                              v_barriers.at[slot])

    for i in range(min(slots, k_ref.shape[1] // bk)):
      @pl.when(cta_lo + i < cta_hi)
      def _fill():
        load_keys(cta_lo + i, i)
        load_values(cta_lo + i, i)

    @pl.loop(cta_lo + slots, cta_hi)
    def _refill(j):
      slot = slot_of(j)
      plgpu.barrier_wait(k_free.at[slot])
      load_keys(j, slot)
      plgpu.barrier_wait(v_free.at[slot])
      load_values(j, slot)

    @pl.loop(jnp.maximum(cta_lo, cta_hi - slots), cta_hi)
    def _drain(j):  # Observe the last releases too: no barrier phase is left unseen.
      plgpu.barrier_wait(k_free.at[slot_of(j)])
      plgpu.barrier_wait(v_free.at[slot_of(j)])


def _forward(q, k, v, q_seg, kv_seg, sinks, st: _Static):
  """out [B, Tq, Hq, D] in q's dtype and lse [B, Hq, Tq] f32 (natural base)."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len = k.shape[1]
  bq, bk, slots = st.blocks.block_q, st.blocks.block_kv, st.blocks.max_concurrent_steps
  rows_per_cta = _COMPUTE_WARPGROUPS * bq
  tq, tk = pallas_triton.round_up(q_len, rows_per_cta), pallas_triton.round_up(kv_len, bk)
  q, q_seg = pallas_triton.pad(q, 1, tq), pallas_triton.pad(q_seg, 1, tq)
  k, v, kv_seg = (pallas_triton.pad(x, 1, tk) for x in (k, v, kv_seg))
  sink_rows = None
  if sinks is not None:
    sink_rows = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None] * _LOG2E, (q_heads, bq))

  dtype = q.dtype
  tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  wgs = _COMPUTE_WARPGROUPS
  smem = (
      plgpu.SMEM((wgs, bq, head_dim), dtype, transforms=tiles),  # Q, then O
      plgpu.SMEM((slots, bk, head_dim), dtype, transforms=tiles),  # K
      plgpu.SMEM((slots, bk, head_dim), dtype, transforms=tiles),  # V
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
  inputs = (q, k, v, q_seg, kv_seg, sink_rows)
  present = tuple(x is not None for x in inputs)

  def entry(*refs):
    it = iter(refs)
    in_refs = [next(it) if p else None for p in present]
    out_ref, lse_ref = next(it), next(it)
    pl.run_scoped(
        lambda smem, barriers: _forward_kernel(*in_refs, out_ref, lse_ref, smem, barriers,
                                               st=st),
        smem, barriers, collective_axes="wg")

  out, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((batch, tq, q_heads, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, q_heads, tq), jnp.float32)),
      grid=(q_heads, tq // rows_per_cta, batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if st.interpret else None,
  )(*(x for x in inputs if x is not None))
  return out[:, :q_len], lse[:, :, :q_len]


def _triton_config(st: _Static, head_dim, dtype) -> pallas_triton.Config:
  return pallas_triton.Config(
      mask=st.mask, scale=st.scale, softcap=st.softcap,
      blocks=pallas_triton.BlockSizes.get_default(head_dim, dtype), interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_seg, kv_seg, sinks, st):
  return _forward(q, k, v, q_seg, kv_seg, sinks, st)


def _attention_fwd(q, k, v, q_seg, kv_seg, sinks, st):
  out, lse = _forward(q, k, v, q_seg, kv_seg, sinks, st)
  return (out, lse), (q, k, v, q_seg, kv_seg, sinks, out, lse)


def _attention_bwd(st, res, cotangents):
  q = res[0]
  return pallas_triton.attention_bwd(_triton_config(st, q.shape[-1], q.dtype), res,
                                     cotangents)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, scale: float, is_causal: bool,
                    window: tuple[int | None, int | None], logits_soft_cap: float | None,
                    return_residuals: bool, block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
  """Softmax attention `softmax(scale · q kᵀ) v` on Hopper, differentiable (q, k, v, sinks).

  Arguments and results as `pallas_triton.flash_attention`, except: query/key/value are
  bfloat16 or float16, and D = Dv in (64, 128, 256).

  Raises:
    NotImplementedError: naming the argument this kernel cannot serve (dtype, head dims,
      empty sequence).
  """
  dtype = jnp.dtype(query.dtype)
  if dtype.name not in _DTYPES or key.dtype != dtype or value.dtype != dtype:
    raise NotImplementedError(
        f"pallas_mosaic_gpu supports query/key/value dtype in {_DTYPES} (all equal); got "
        f"{query.dtype}, {key.dtype}, {value.dtype}. Use 'pallas_triton' for float32.")
  batch, q_len, q_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if head_dim not in _HEAD_DIMS or value.shape[-1] != head_dim:
    raise NotImplementedError(
        f"pallas_mosaic_gpu supports head_dim in {_HEAD_DIMS} with value head_dim equal to "
        f"it; got {head_dim} and {value.shape[-1]}. Use 'pallas_triton'.")
  if q_len == 0 or kv_len == 0:
    raise NotImplementedError(f"pallas_mosaic_gpu needs q_seq, kv_seq >= 1; got "
                              f"q_seq={q_len}, kv_seq={kv_len}.")
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
  st = _Static(mask=mask, scale=float(scale),
               softcap=None if logits_soft_cap is None else float(logits_soft_cap),
               groups=q_heads // kv_heads, has_sinks=sinks is not None,
               blocks=block_sizes or BlockSizes.get_default(head_dim),
               interpret=bool(interpret))
  if q_segment_ids is not None:
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
  out, lse = _attention(query, key, value, q_segment_ids, kv_segment_ids, sinks, st)
  return (out, lse) if return_residuals else out
