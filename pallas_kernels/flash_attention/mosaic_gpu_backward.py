"""FlashAttention backward in Pallas Mosaic GPU (Hopper): dQ and dK/dV kernels.

Both recompute P from the forward's log-sum-exp (FlashAttention-2's backward) and are
warp-specialised like the forward (`mosaic_gpu_parts`): a memory warpgroup streams blocks
through shared-memory slots with TMA, two compute warpgroups own 64 rows each.

- dQ: a compute warpgroup owns `block_q` queries (Q, dO, lse, Delta) and streams the key and
  value blocks it can see: S = Q Kᵀ and dP = dO Vᵀ (wgmma, issued together), P = exp2(S - lse),
  dS = P (dP - Delta), dQ += dS K (dS from registers).
- dK/dV: a compute warpgroup owns `block_kv` keys and values and streams the query-side
  blocks (Q, dO, lse, Delta) of every query head of its GQA group: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ,
  dV += Pᵀ dO, dK += dSᵀ Q; per key/value head, so nothing is summed afterwards.
- head_dim 256: a warpgroup's dK and dV accumulators of 64 x 256 would take 256 registers
  per thread, so the dK/dV CTA owns 64 keys and its two compute warpgroups split the
  columns (`_dkv_columns_kernel`): warpgroup 0 computes Sᵀ = K Qᵀ and Pᵀ, warpgroup 1
  dPᵀ - Delta = V dOᵀ - Delta, and they trade tiles through shared memory (mbarriers): dP
  to warpgroup 0, which forms dSᵀ, then Pᵀ and dSᵀ back to warpgroup 1; each accumulates
  its 128 columns of dV += Pᵀ dO and dK += dSᵀ Q. No matmul is computed twice. The dQ
  kernel keeps its structure with blocks of 32 keys (`_DQ_KEYS`; Q and K then take the
  64-byte swizzle): two slots of 64 keys next to the 128 query rows' Q and dO would need
  256 KB of shared memory.
- Masks as in the forward: only the visible blocks are streamed, blocks visible in full run
  without mask arithmetic, a warpgroup passes over the blocks only the other one needs.
- Lengths as in the forward: no padding to the blocks (TMA zero-fills rows past the end
  and drops stores past it), only to a multiple of 8 rows. Query rows past q_len that a
  dK/dV tile streams add nothing: their Q and dO are zero-filled and their lse and Delta
  are 0, so P = 1 times dO = 0, and dS = P (dP - Delta) = 0.
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
from pallas_kernels.flash_attention.common import pad, round_up
from pallas_kernels.flash_attention.mask import AttentionMask

HEAD_DIMS = (64, 128, 256)
# head_dim -> keys per step of the dQ kernel. At 256, the two warpgroups' Q and dO take
# 128 KB of shared memory; two slots of 32-key K and V blocks take 64 KB more (of 64-key
# blocks, 128 KB: over the 227 KB of a CTA).
_DQ_KEYS = {64: 64, 128: 64, 256: 32}


@dataclasses.dataclass(frozen=True)
class Config:
  """Static arguments: the mask, logit scale and soft-cap, query heads per key/value head,
  rows per compute warpgroup (64: one wgmma tile), slots in flight, interpret mode."""
  mask: AttentionMask
  scale: float
  softcap: float | None
  groups: int
  block: int = 64
  slots: int = 2
  interpret: bool = False


def _probabilities(s, lse, q_axis: int, cf: Config, hide):
  """P = exp2(logits - lse) of one tile from S = q kᵀ (f32, queries along q_axis), and the
  soft-cap's slope (None without one); lse (base 2): a vector along q_axis; hide: None
  (tile visible in full) or the masking of the base-2 logits."""
  x, c = parts.logits(s, cf.scale, cf.softcap)
  slope = None if cf.softcap is None else parts.softcap_slope(x, cf.softcap)
  if hide is not None:
    x = hide(x)
  return jnp.exp2(x * c - lax.broadcast_in_dim(lse, s.shape, [q_axis])), slope


def _probabilities_and_ds(s, dp, lse, delta, q_axis: int, cf: Config, hide):
  """P and dS = P (dP - Delta) (times the soft-cap's slope) of one tile from S = q kᵀ and
  dP = dO vᵀ (f32, queries along q_axis); lse (base 2) and delta: vectors along q_axis;
  hide: as `_probabilities`."""
  p, slope = _probabilities(s, lse, q_axis, cf, hide)
  ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [q_axis]))
  return p, ds if slope is None else ds * slope


def _accumulate_from_smem(terms, interpret: bool):
  """[acc + a · b for (acc, a, b) in terms] as `parts.accumulate`, but with a (like b) a
  shared-memory tile."""
  if interpret:
    return [acc + jnp.dot(a[...], b[...], preferred_element_type=jnp.float32)
            for acc, a, b in terms]

  def compute(acc_refs):
    for acc_ref, (_, a, b) in zip(acc_refs, terms):
      plgpu.wgmma(acc_ref, a, b)
  return list(pl.run_state(compute)([plgpu.ACC.init(acc) for acc, _, _ in terms]))


def _block_loops(step, pass_over, cta_lo, cta_hi, ranges, carry):
  """step(i, carry, masked) over a warpgroup's blocks [lo, hi) (unmasked on [full_lo,
  full_hi)), pass_over(i) over the rest of the CTA's [cta_lo, cta_hi)."""
  lo, full_lo, full_hi, hi = ranges
  lo = jnp.clip(lo, cta_lo, cta_hi)
  full_lo, full_hi, hi = (jnp.clip(x, lo, cta_hi) for x in (full_lo, full_hi, hi))
  skip = lambda i, carry: (pass_over(i), carry)[1]
  carry = lax.fori_loop(cta_lo, lo, skip, carry)
  carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
  return lax.fori_loop(hi, cta_hi, skip, carry)


def _copy_rows(sources, targets, index, barrier):
  """TMA copies of one block's inputs from `sources` (gmem refs) into `targets`[index]
  (shared-memory tiles), arriving on barrier. targets may run longer than sources: a
  trailing segment-id tile is not copied when there are no segment ids."""
  for src, dst in zip(sources, targets):
    plgpu.copy_gmem_to_smem(src, dst.at[index], barrier)


def _query_rows(q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, batch, head, rows):
  """The query-side inputs of `rows` of one head: Q, dO, lse, Delta (and segment ids)."""
  sources = [q_ref.at[batch, rows, head], do_ref.at[batch, rows, head],
             lse_ref.at[batch, head, rows], delta_ref.at[batch, head, rows]]
  return sources + ([] if q_seg_ref is None else [q_seg_ref.at[batch, rows]])


def _key_rows(k_ref, v_ref, kv_seg_ref, batch, kv_head, keys):
  """The key-side inputs of `keys` of one key/value head: K, V (and segment ids)."""
  sources = [k_ref.at[batch, keys, kv_head], v_ref.at[batch, keys, kv_head]]
  return sources + ([] if kv_seg_ref is None else [kv_seg_ref.at[batch, keys]])


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
               dq_ref, smem, barriers, *, cf: Config, bk: int):
  """One CTA: 2 * block query rows of one (batch, query head), streaming blocks of bk keys.
  lse_ref (base 2, 0 for rows that see nothing) and delta_ref [B, Hq, Tq] f32."""
  q_smem2, do_smem2, lse_smem2, delta_smem2, q_seg_smem2, k_smem, v_smem, kv_seg_smem = smem
  row_barriers, ready, free = barriers
  b = cf.block
  has_segments = q_seg_ref is not None
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  kv_head = lax.div(head, jnp.int32(cf.groups))
  cta_q0 = lax.axis_index("q_seq") * (parts.COMPUTE_WARPGROUPS * b)
  cta_lo, _, _, cta_hi = cf.mask.kv_blocks(cta_q0, parts.COMPUTE_WARPGROUPS * b, bk)
  slot_of = lambda j: lax.rem(j - cta_lo, jnp.int32(cf.slots))

  def load(t, slot):  # Step t is key/value block cta_lo + t.
    keys = pl.ds((cta_lo + t) * bk, bk)
    _copy_rows(_key_rows(k_ref, v_ref, kv_seg_ref, batch, kv_head, keys),
               (k_smem, v_smem, kv_seg_smem), slot, ready.at[slot])

  queues = [(load, ready, free)]

  @pl.when(wg < parts.COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q0 = cta_q0 + wg * b
    rows = pl.ds(q0, b)
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    _copy_rows(_query_rows(q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, batch, head, rows),
               (q_smem2, do_smem2, lse_smem2, delta_smem2, q_seg_smem2), wg,
               row_barriers.at[wg])
    plgpu.barrier_wait(row_barriers.at[wg])
    lse = plgpu.load(lse_smem2.at[wg], layout=parts.ROWS)
    delta = plgpu.load(delta_smem2.at[wg], layout=parts.ROWS)
    q_seg = plgpu.load(q_seg_smem2.at[wg], layout=parts.ROWS) if has_segments else None

    def step(j, dq, masked):
      slot = slot_of(j)
      plgpu.barrier_wait(ready.at[slot])
      s, dp = parts.products_t([(q_smem, k_smem.at[slot]), (do_smem, v_smem.at[slot])],
                               cf.interpret)
      hide = None
      if masked:
        kv_seg = None
        if has_segments:
          kv_seg = plgpu.load(kv_seg_smem.at[slot], layout=parts.COLUMNS)
        hide = lambda x: parts.hide(x, cf.mask, q0, j * bk, 0, q_seg, kv_seg)
      _, ds = _probabilities_and_ds(s, dp, lse, delta, 0, cf, hide)
      dq, = parts.accumulate([(dq, ds.astype(k_smem.dtype), k_smem.at[slot])], cf.interpret)
      plgpu.barrier_arrive(free.at[slot])
      return dq

    dq = plgpu.layout_cast(jnp.zeros((b, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
    dq = _block_loops(step, lambda j: parts.pass_over(slot_of(j), queues), cta_lo, cta_hi,
                      cf.mask.kv_blocks(q0, b, bk), dq)
    q_smem[...] = (dq * cf.scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == parts.COMPUTE_WARPGROUPS)
  def _memory():
    parts.stream(cta_hi - cta_lo, queues, cf.slots, k_ref.shape[1] // bk)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                dk_ref, dv_ref, smem, barriers, *, cf: Config):
  """One CTA: 2 * block keys of one (batch, key/value head), over the query heads
  [head * groups, (head + 1) * groups)."""
  k_smem2, v_smem2, kv_seg_smem2, q_smem, do_smem, lse_smem, delta_smem, q_seg_smem = smem
  own_barriers, ready, free = barriers
  b = cf.block
  has_segments = q_seg_ref is not None
  batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  cta_k0 = lax.axis_index("kv_seq") * (parts.COMPUTE_WARPGROUPS * b)
  cta_lo, _, _, cta_hi = cf.mask.q_blocks(cta_k0, parts.COMPUTE_WARPGROUPS * b, b)
  blocks = cta_hi - cta_lo  # Query blocks per head; the stream runs over groups * blocks.
  slot_of = lambda t: lax.rem(t, jnp.int32(cf.slots))

  def load(t, slot):  # Step t is query block cta_lo + t % blocks of group head t // blocks.
    per_head = jnp.asarray(blocks, jnp.int32)
    head = kv_head * cf.groups + lax.div(t, per_head)
    rows = pl.ds((cta_lo + lax.rem(t, per_head)) * b, b)
    _copy_rows(_query_rows(q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, batch, head, rows),
               (q_smem, do_smem, lse_smem, delta_smem, q_seg_smem), slot, ready.at[slot])

  queues = [(load, ready, free)]

  @pl.when(wg < parts.COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    k0 = cta_k0 + wg * b
    keys = pl.ds(k0, b)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    _copy_rows(_key_rows(k_ref, v_ref, kv_seg_ref, batch, kv_head, keys),
               (k_smem2, v_smem2, kv_seg_smem2), wg, own_barriers.at[wg])
    plgpu.barrier_wait(own_barriers.at[wg])
    kv_seg = plgpu.load(kv_seg_smem2.at[wg], layout=parts.ROWS) if has_segments else None
    ranges = cf.mask.q_blocks(k0, b, b)

    def step(i, carry, g, masked):  # Tiles are [keys, queries]: transposed S, P, dS.
      dk, dv = carry
      slot = slot_of(g * blocks + i - cta_lo)
      plgpu.barrier_wait(ready.at[slot])
      s, dp = parts.products_t([(k_smem, q_smem.at[slot]), (v_smem, do_smem.at[slot])],
                               cf.interpret)
      hide = None
      if masked:
        q_seg = None
        if has_segments:
          q_seg = plgpu.load(q_seg_smem.at[slot], layout=parts.COLUMNS)
        hide = lambda x: parts.hide(x, cf.mask, i * b, k0, 1, q_seg, kv_seg)
      lse = plgpu.load(lse_smem.at[slot], layout=parts.COLUMNS)
      delta = plgpu.load(delta_smem.at[slot], layout=parts.COLUMNS)
      p, ds = _probabilities_and_ds(s, dp, lse, delta, 1, cf, hide)
      dv, dk = parts.accumulate([(dv, p.astype(q_smem.dtype), do_smem.at[slot]),
                                 (dk, ds.astype(q_smem.dtype), q_smem.at[slot])],
                                cf.interpret)
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    def group(g, carry):
      pass_over = lambda i: parts.pass_over(slot_of(g * blocks + i - cta_lo), queues)
      return _block_loops(functools.partial(step, g=g), pass_over, cta_lo, cta_hi, ranges,
                          carry)

    zeros = lambda ref: plgpu.layout_cast(jnp.zeros(ref.shape, jnp.float32),
                                          plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, cf.groups, group, (zeros(k_smem), zeros(v_smem)))
    k_smem[...] = (dk * cf.scale).astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, kv_head])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == parts.COMPUTE_WARPGROUPS)
  def _memory():
    parts.stream(cf.groups * blocks, queues, cf.slots, cf.groups * (q_ref.shape[1] // b))


def _dkv_columns_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref,
                        kv_seg_ref, dk_ref, dv_ref, smem, barriers, *, cf: Config):
  """One CTA: `block` keys of one (batch, key/value head), over the query heads of its GQA
  group; compute warpgroup w owns the columns [w * D/2, (w + 1) * D/2) of dK and dV.

  Per streamed query block (tiles [keys, queries], as `_dkv_kernel`): warpgroup 0 computes
  Sᵀ = K Qᵀ and Pᵀ while warpgroup 1 computes dPᵀ = V dOᵀ, subtracts Delta and stores it
  (f32); warpgroup 0 forms dSᵀ = Pᵀ (dPᵀ - Delta) and stores Pᵀ and dSᵀ (bf16/f16); each then
  accumulates its columns, dV += Pᵀ dO and dK += dSᵀ Q (warpgroup 0 from registers,
  warpgroup 1 from shared memory). dp_ready and pds_ready carry one phase per block; each
  warpgroup arrives on a phase only after awaiting the other's previous one, so neither
  runs two phases ahead, and each single tile is rewritten only after its reader is done
  (warpgroup 1 stores the next dP after its wgmma reading P and dS has completed; warpgroup
  0 stores the next P and dS after that dP has arrived)."""
  (k_smem, v_smem, q_smem, do_smem, vectors, segments, dp_smem, p_smem, ds_smem) = smem
  kv_barrier, ready, free, dp_ready, pds_ready, written = barriers
  b, half = cf.block, k_smem.shape[-1] // 2
  has_segments = q_seg_ref is not None
  batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  k0 = lax.axis_index("kv_seq") * b
  keys = pl.ds(k0, b)
  ranges = cf.mask.q_blocks(k0, b, b)  # Both warpgroups step through the same blocks.
  lo, _, _, hi = ranges
  blocks = hi - lo  # Query blocks per head; the stream runs over groups * blocks.
  slot_of = lambda t: lax.rem(t, jnp.int32(cf.slots))
  # vectors[slot] = (lse, Delta) of a block; segments[slot]: its query ids, segments[-1]:
  # the CTA's key ids (each scratch buffer takes a whole KB: packed to fit 227 KB).
  lse_smem, delta_smem = vectors.at[:, 0], vectors.at[:, 1]

  def load(t, slot):  # Step t is query block lo + t % blocks of group head t // blocks.
    per_head = jnp.asarray(blocks, jnp.int32)
    head = kv_head * cf.groups + lax.div(t, per_head)
    rows = pl.ds((lo + lax.rem(t, per_head)) * b, b)
    _copy_rows(_query_rows(q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, batch, head, rows),
               (q_smem, do_smem, lse_smem, delta_smem, segments), slot, ready.at[slot])

  queues = [(load, ready, free)]

  def block_loops(step, carry):
    def group(g, carry):
      pass_over = lambda i: parts.pass_over(slot_of(g * blocks + i - lo), queues)
      return _block_loops(functools.partial(step, g=g), pass_over, lo, hi, ranges, carry)
    return lax.fori_loop(0, cf.groups, group, carry)

  def finish(dk, dv, w: int):
    """Stores warpgroup w's columns of dK and dV over K and V (no longer read: the other
    warpgroup's last matmul on them preceded its last hand-over); once both are written,
    warpgroup 0 copies dK out and warpgroup 1 dV (a TMA copy of half the columns of a
    swizzled tile would not be contiguous)."""
    cols = pl.ds(w * half, half)
    k_smem.at[:, cols][...] = (dk * cf.scale).astype(k_smem.dtype)
    v_smem.at[:, cols][...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.barrier_arrive(written)
    plgpu.barrier_wait(written)
    out_smem, out_ref = (k_smem, dk_ref) if w == 0 else (v_smem, dv_ref)
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[batch, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)

  zeros = plgpu.layout_cast(jnp.zeros((b, half), jnp.float32), plgpu.Layout.WGMMA)

  def own_keys():
    """Warpgroup 0 copies K (and the key ids), warpgroup 1 V; both await all of them: each
    overwrites the other's tile at the end."""
    plgpu.set_max_registers(232, action="increase")
    sources = ([k_ref.at[batch, keys, kv_head]]
               + ([kv_seg_ref.at[batch, keys]] if has_segments else []))
    targets = [k_smem] + ([segments.at[cf.slots]] if has_segments else [])

    @pl.when(wg == 0)
    def _keys():
      for src, dst in zip(sources, targets):
        plgpu.copy_gmem_to_smem(src, dst, kv_barrier)

    @pl.when(wg == 1)
    def _values():
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem, kv_barrier)
    plgpu.barrier_wait(kv_barrier)

  @pl.when(wg == 0)
  def _scores():
    own_keys()
    kv_seg = plgpu.load(segments.at[cf.slots], layout=parts.ROWS) if has_segments else None

    def step(i, carry, g, masked):
      dk, dv = carry
      slot = slot_of(g * blocks + i - lo)
      plgpu.barrier_wait(ready.at[slot])
      s, = parts.products_t([(k_smem, q_smem.at[slot])], cf.interpret)
      hide = None
      if masked:
        q_seg = plgpu.load(segments.at[slot], layout=parts.COLUMNS) if has_segments else None
        hide = lambda x: parts.hide(x, cf.mask, i * b, k0, 1, q_seg, kv_seg)
      lse = plgpu.load(lse_smem.at[slot], layout=parts.COLUMNS)
      p, slope = _probabilities(s, lse, 1, cf, hide)
      # Across the wait, P in bf16/f16 and P times the slope (f32) stay in registers: with
      # dP and the 128 of dK and dV, ~210 a thread.
      p, p_slope = p.astype(q_smem.dtype), p if slope is None else p * slope
      plgpu.barrier_wait(dp_ready)
      ds = (p_slope * plgpu.load(dp_smem, layout=plgpu.Layout.WGMMA)).astype(q_smem.dtype)
      p_smem[...] = p
      ds_smem[...] = ds
      plgpu.commit_smem()
      plgpu.barrier_arrive(pds_ready)
      cols = pl.ds(0, half)
      dv, dk = parts.accumulate([(dv, p, do_smem.at[slot, :, cols]),
                                 (dk, ds, q_smem.at[slot, :, cols])], cf.interpret)
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    finish(*block_loops(step, (zeros, zeros)), 0)

  @pl.when(wg == 1)
  def _gradients():
    own_keys()

    def step(i, carry, g, masked):
      del masked  # Masked entries have P = 0, hence dS = 0: nothing to do here.
      dk, dv = carry
      slot = slot_of(g * blocks + i - lo)
      plgpu.barrier_wait(ready.at[slot])
      dp, = parts.products_t([(v_smem, do_smem.at[slot])], cf.interpret)
      delta = plgpu.load(delta_smem.at[slot], layout=parts.COLUMNS)
      dp_smem[...] = dp - lax.broadcast_in_dim(delta, dp.shape, [1])
      plgpu.commit_smem()  # Ends with a warpgroup barrier: every thread's stores, then arrive.
      plgpu.barrier_arrive(dp_ready)
      plgpu.barrier_wait(pds_ready)
      cols = pl.ds(half, half)
      dv, dk = _accumulate_from_smem([(dv, p_smem, do_smem.at[slot, :, cols]),
                                      (dk, ds_smem, q_smem.at[slot, :, cols])], cf.interpret)
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    finish(*block_loops(step, (zeros, zeros)), 1)

  @pl.when(wg == parts.COMPUTE_WARPGROUPS)
  def _memory():
    parts.stream(cf.groups * blocks, queues, cf.slots, cf.groups * (q_ref.shape[1] // b))


def backward(q, k, v, q_seg, kv_seg, lse, delta, d_out, cf: Config):
  """dq, dk, dv. q, d_out [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; lse (natural base, -inf for a
  row that sees nothing) and delta = rowsum(dO * O) - dlse: [B, Hq, Tq] f32.

  Raises:
    NotImplementedError: head_dim not in HEAD_DIMS, or cf.block other than 64 at 256.
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  b, slots, wgs = cf.block, cf.slots, parts.COMPUTE_WARPGROUPS
  if head_dim not in HEAD_DIMS or v.shape[-1] != head_dim:
    raise NotImplementedError(
        f"mosaic_gpu_backward supports head_dim in {HEAD_DIMS} with value head_dim equal to "
        f"it; got {head_dim} and {v.shape[-1]}.")
  if head_dim == 256 and (b != 64 or slots != 2):
    raise NotImplementedError(
        "mosaic_gpu_backward at head_dim 256 fits shared memory with Config.block 64 and "
        f"Config.slots 2 only; got block {b} and slots {slots}.")
  # As the forward: TMA handles partial blocks, lengths off the 8-row tile are padded.
  tq, tk = round_up(q_len, parts.TMA_ROWS), round_up(kv_len, parts.TMA_ROWS)
  q, d_out, q_seg = (pad(x, 1, tq) for x in (q, d_out, q_seg))
  k, v, kv_seg = (pad(x, 1, tk) for x in (k, v, kv_seg))
  q_tiles, kv_tiles = pl.cdiv(q_len, wgs * b), pl.cdiv(kv_len, wgs * b)
  # P = exp2(x - lse); a row that saw nothing has every x = -inf: use lse 0 there (P = 0).
  # lse and Delta padded to whole tiles, as the forward's lse (small: [B, Hq, Tq] f32).
  lse = pad(jnp.where(lse == -jnp.inf, 0.0, lse * parts.LOG2E), 2, q_tiles * wgs * b)
  delta = pad(delta, 2, q_tiles * wgs * b)
  dtype, has_segments = q.dtype, q_seg is not None
  tile = lambda n, rows=b, transforms=parts.TILED: plgpu.SMEM((n, rows, head_dim), dtype,
                                                                transforms=transforms)
  vector = lambda n, dt=jnp.float32: plgpu.SMEM((n, b), dt)
  segment_vector = lambda n, keys=b: (plgpu.SMEM((n, keys), jnp.int32) if has_segments
                                      else None)
  inputs = (q, k, v, d_out, lse, delta, q_seg, kv_seg)
  row_copies = 4 + has_segments
  bk = _DQ_KEYS[head_dim]
  # dQ += dS K contracts over bk keys, a multiple of the swizzle's row of K (wgmma), and
  # S = Q Kᵀ needs Q swizzled as K: 32 keys take the 64-byte swizzle.
  q_k_tiled = parts.TILED if bk >= 64 else (plgpu.TilingTransform((8, 32)),
                                             plgpu.SwizzleTransform(64))

  dq = parts.launch(
      functools.partial(_dq_kernel, cf=cf, bk=bk), inputs,
      jax.ShapeDtypeStruct(q.shape, dtype),
      (tile(wgs, transforms=q_k_tiled), tile(wgs), vector(wgs), vector(wgs),
       segment_vector(wgs), tile(slots, bk, q_k_tiled), tile(slots, bk),
       segment_vector(slots, bk)),
      (plgpu.Barrier(num_arrivals=row_copies, num_barriers=wgs),
       plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=slots),
       plgpu.Barrier(num_arrivals=wgs, num_barriers=slots)),
      grid=(q_heads, q_tiles, batch), grid_names=("heads", "q_seq", "batch"),
      interpret=cf.interpret)
  dkv_out = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
  if head_dim == 256:
    # 224 KB of tiles: K, V (32 KB each), 2 slots of Q and dO (64 KB each), dP (f32), P,
    # dS (16, 8, 8 KB); the vectors packed two scratch buffers (1 KB each): 226 KB.
    # Barriers: K and V (+ key ids), the slots, the two hand-overs, dK and dV written.
    tile_2d = lambda dt, transforms: plgpu.SMEM((b, b), dt, transforms=transforms)
    f32_tiled = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
    dk, dv = parts.launch(
        functools.partial(_dkv_columns_kernel, cf=cf), inputs, dkv_out,
        (plgpu.SMEM((b, head_dim), dtype, transforms=parts.TILED),
         plgpu.SMEM((b, head_dim), dtype, transforms=parts.TILED), tile(slots), tile(slots),
         plgpu.SMEM((slots, 2, b), jnp.float32), segment_vector(slots + 1),
         tile_2d(jnp.float32, f32_tiled), tile_2d(dtype, parts.TILED),
         tile_2d(dtype, parts.TILED)),
        (plgpu.Barrier(num_arrivals=2 + has_segments),
         plgpu.Barrier(num_arrivals=row_copies, num_barriers=slots),
         plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),
         plgpu.Barrier(), plgpu.Barrier(), plgpu.Barrier(num_arrivals=wgs)),
        grid=(kv_heads, pl.cdiv(kv_len, b), batch), grid_names=("heads", "kv_seq", "batch"),
        interpret=cf.interpret)
  else:
    dk, dv = parts.launch(
        functools.partial(_dkv_kernel, cf=cf), inputs, dkv_out,
        (tile(wgs), tile(wgs), segment_vector(wgs), tile(slots), tile(slots), vector(slots),
         vector(slots), segment_vector(slots)),
        (plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=wgs),
         plgpu.Barrier(num_arrivals=row_copies, num_barriers=slots),
         plgpu.Barrier(num_arrivals=wgs, num_barriers=slots)),
        grid=(kv_heads, kv_tiles, batch), grid_names=("heads", "kv_seq", "batch"),
        interpret=cf.interpret)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]
