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

from pallas_kernels.flash_attention import mosaic_gpu_parts as parts
from pallas_kernels.flash_attention.block_mask import BlockMask, pad, round_up

HEAD_DIMS = (64, 128)  # dK and dV accumulators of 256 columns do not fit in registers.


@dataclasses.dataclass(frozen=True)
class Config:
  """Static arguments: the mask, logit scale and soft-cap, query heads per key/value head,
  rows per compute warpgroup (64: one wgmma tile), slots in flight, interpret mode."""
  mask: BlockMask
  scale: float
  softcap: float | None
  groups: int
  block: int = 64
  slots: int = 2
  interpret: bool = False


def _probabilities_and_ds(s, dp, lse, delta, q_axis: int, cf: Config, hide):
  """P and dS = P (dP - Delta) of one tile from S = q kᵀ and dP = dO vᵀ (f32, queries along
  q_axis); lse (base 2) and delta: vectors along q_axis; hide: None (tile visible in full)
  or the masking of the base-2 logits."""
  x, c = parts.logits(s, cf.scale, cf.softcap)
  slope = None if cf.softcap is None else parts.softcap_slope(x, cf.softcap)
  if hide is not None:
    x = hide(x)
  along_queries = lambda v: lax.broadcast_in_dim(v, s.shape, [q_axis])
  p = jnp.exp2(x * c - along_queries(lse))
  ds = p * (dp - along_queries(delta))
  return p, ds if slope is None else ds * slope


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
               dq_ref, smem, barriers, *, cf: Config):
  """One CTA: 2 * block query rows of one (batch, query head). lse_ref (base 2, 0 for rows
  that see nothing) and delta_ref [B, Hq, Tq] f32."""
  q_smem2, do_smem2, lse_smem2, delta_smem2, q_seg_smem2, k_smem, v_smem, kv_seg_smem = smem
  row_barriers, ready, free = barriers
  b = cf.block
  has_segments = q_seg_ref is not None
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  kv_head = lax.div(head, jnp.int32(cf.groups))
  cta_q0 = lax.axis_index("q_seq") * (parts.COMPUTE_WARPGROUPS * b)
  cta_lo, _, _, cta_hi = cf.mask.kv_blocks(cta_q0, parts.COMPUTE_WARPGROUPS * b, b)
  slot_of = lambda j: lax.rem(j - cta_lo, jnp.int32(cf.slots))

  def load(t, slot):  # Step t is key/value block cta_lo + t.
    keys = pl.ds((cta_lo + t) * b, b)
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
        hide = lambda x: parts.hide(x, cf.mask, q0, j * b, 0, q_seg, kv_seg)
      _, ds = _probabilities_and_ds(s, dp, lse, delta, 0, cf, hide)
      dq, = parts.accumulate([(dq, ds.astype(k_smem.dtype), k_smem.at[slot])], cf.interpret)
      plgpu.barrier_arrive(free.at[slot])
      return dq

    dq = plgpu.layout_cast(jnp.zeros((b, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
    dq = _block_loops(step, lambda j: parts.pass_over(slot_of(j), queues), cta_lo, cta_hi,
                      cf.mask.kv_blocks(q0, b, b), dq)
    q_smem[...] = (dq * cf.scale).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == parts.COMPUTE_WARPGROUPS)
  def _memory():
    parts.stream(cta_hi - cta_lo, queues, cf.slots, k_ref.shape[1] // b)


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


def backward(q, k, v, q_seg, kv_seg, lse, delta, d_out, cf: Config):
  """dq, dk, dv. q, d_out [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; lse (natural base, -inf for a
  row that sees nothing) and delta = rowsum(dO * O) - dlse: [B, Hq, Tq] f32."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  b, slots, wgs = cf.block, cf.slots, parts.COMPUTE_WARPGROUPS
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
  tile = lambda n: plgpu.SMEM((n, b, head_dim), dtype, transforms=parts.TILED)
  vector = lambda n, dt=jnp.float32: plgpu.SMEM((n, b), dt)
  segment_vector = lambda n: vector(n, jnp.int32) if has_segments else None
  inputs = (q, k, v, d_out, lse, delta, q_seg, kv_seg)
  row_copies = 4 + has_segments

  dq = parts.launch(
      functools.partial(_dq_kernel, cf=cf), inputs, jax.ShapeDtypeStruct(q.shape, dtype),
      (tile(wgs), tile(wgs), vector(wgs), vector(wgs), segment_vector(wgs), tile(slots),
       tile(slots), segment_vector(slots)),
      (plgpu.Barrier(num_arrivals=row_copies, num_barriers=wgs),
       plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=slots),
       plgpu.Barrier(num_arrivals=wgs, num_barriers=slots)),
      grid=(q_heads, q_tiles, batch), grid_names=("heads", "q_seq", "batch"),
      interpret=cf.interpret)
  dk, dv = parts.launch(
      functools.partial(_dkv_kernel, cf=cf), inputs,
      (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
      (tile(wgs), tile(wgs), segment_vector(wgs), tile(slots), tile(slots), vector(slots),
       vector(slots), segment_vector(slots)),
      (plgpu.Barrier(num_arrivals=2 + has_segments, num_barriers=wgs),
       plgpu.Barrier(num_arrivals=row_copies, num_barriers=slots),
       plgpu.Barrier(num_arrivals=wgs, num_barriers=slots)),
      grid=(kv_heads, kv_tiles, batch), grid_names=("heads", "kv_seq", "batch"),
      interpret=cf.interpret)
  return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]

