"""The chunk-state passes of chunked linear attention on Hopper (Mosaic GPU), scalar gate
(fixed decay and no decay broadcast to it): its `chunked_plan.Launches.state`.

Per value head, chunks of C = 64 tokens, the pass walks a sequence piece's chunks in order
(forward) or in reverse (backward) with the state s `[K, V]` on chip, and per chunk

  stores s (the state entering the chunk; in reverse, the gradient w.r.t. the state
  leaving it), then s ← d · s + Xᵀ (w ⊙ Y),

forward: X = K, Y = V, w = wk (e^{b_C − b_j} in the chunk's last run);
backward: X = Q, Y = dO, w = scale · wq (e^{b_i} before the chunk's first reset);
d = e^{b_C} if the chunk holds no reset, else 0 (notation of `pallas_mosaic_gpu`).

Warp-specialised as the forward kernel: a memory warpgroup streams each chunk's X, Y and
vectors into shared-memory slots with TMA; one compute warpgroup per 64 value columns
keeps its `[K, 64]` slice of s in registers (f32), writes w ⊙ Y to shared memory for the
tensor cores and each stored state through shared memory by TMA, in the inputs' dtype.

Scope: as `pallas_mosaic_gpu` (16-bit inputs, K and V in 64 and 128, chunk 64).
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
from pallas_kernels.linear_attention.mosaic_gpu_tiles import (along, column_tiles, matmuls,
                                                              value_block)
from pallas_kernels.linear_attention.pallas_mosaic_gpu_gradients import CHUNK, chunk_vectors

COLUMNS_PER_WARPGROUP = 64


@dataclasses.dataclass(frozen=True)
class _Static:
  chunks: int  # per piece
  ratio: int  # value heads per key head
  warpgroups: int  # compute warpgroups per CTA: value_dim // 64 // value_blocks
  value_blocks: int
  slots: int
  reverse: bool
  interpret: bool


def _kernel(x_ref, y_ref, w_ref, d_ref, start_ref, *refs, st: _Static):
  """One CTA: one (batch, value head, piece). x_ref `[B, T, Hk, K]`, y_ref `[B, T, H, V]`,
  w_ref `[B, H, T]` f32, d_ref `[B, H, N, K]` f32 (d per chunk repeated over the state's
  rows), start_ref `[B, H, P, K, V]` f32. refs: (states `[B, H, N, K, V]`,) end (like
  start), smem, barriers."""
  *states_ref, end_ref, smem, barriers = refs
  x_smem, y_smem, w_smem, d_smem, s_smem2, yw_smem2 = smem
  ready, free = barriers
  batch, piece = lax.axis_index("batch"), lax.axis_index("pieces")
  head, column_block = value_block(st.value_blocks, st.warpgroups)
  wg = lax.axis_index("wg")
  key_head = lax.div(head, jnp.int32(st.ratio))
  width = COLUMNS_PER_WARPGROUP

  def chunk_of(t):  # Step t of the stream is the piece's t-th chunk in walking order.
    return piece * st.chunks + (st.chunks - 1 - t if st.reverse else t)

  def issue(t, slot):
    chunk = chunk_of(t)
    rows = pl.ds(chunk * CHUNK, CHUNK)
    copies = [(x_ref.at[batch, rows, key_head], x_smem.at[slot]),
              (w_ref.at[batch, head, rows], w_smem.at[slot]),
              (d_ref.at[batch, head, chunk], d_smem.at[slot])]
    copies += column_tiles(y_ref, y_smem, batch, rows, head, column_block, slot,
                           st.warpgroups, width)
    for src, dst in copies:
      plgpu.copy_gmem_to_smem(src, dst, ready.at[slot])

  @pl.when(wg < st.warpgroups)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    cols = pl.ds((column_block + wg) * width, width)
    s_smem, yw_smem = s_smem2.at[wg], yw_smem2.at[wg]
    s = plgpu.load(start_ref.at[batch, head, piece, :, cols], layout=plgpu.Layout.WGMMA,
                   optimized=False)

    def chunk_step(t, s):
      slot = lax.rem(t, jnp.int32(st.slots))
      plgpu.barrier_wait(ready.at[slot])
      if states_ref:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last stored state has left
        s_smem[...] = s.astype(s_smem.dtype)
      w = plgpu.load(w_smem.at[slot], layout=parts.ROWS)
      y = plgpu.load(y_smem.at[slot, wg], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      yw_smem[...] = (y * along(w, y.shape, 0)).astype(yw_smem.dtype)
      plgpu.commit_smem()
      if states_ref:
        plgpu.copy_smem_to_gmem(s_smem, states_ref[0].at[batch, head, chunk_of(t), :, cols])
      d = plgpu.load(d_smem.at[slot], layout=parts.ROWS)
      s, = matmuls([(s * along(d, s.shape, 0), x_smem.at[slot], yw_smem, "tn")],
                   st.interpret)
      plgpu.barrier_arrive(free.at[slot])
      return s

    s = lax.fori_loop(0, st.chunks, chunk_step, s)
    end_ref.at[batch, head, piece, :, cols][...] = s
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == st.warpgroups)
  def _memory():
    parts.stream(jnp.int32(st.chunks), [(issue, ready, free)], st.slots, st.chunks)


def state_call(x, y, b, rel, start, plan, *, reverse, write_states, slots=2,
               value_blocks=1):
  """`chunked_plan.Launches.state` on Hopper, scalar gate: x `[B, T, Hk, K]` (k, or q in
  reverse), y `[B, T, H, V]` (v, or dO), b `[B, T, H]`, rel `[B, T]` (T whole pieces),
  start `[B, H, P, K, V]` f32. Returns ([states `[B, H, N, K, V]` in x's dtype,] ends
  like start)."""
  _, wq, wk, d = chunk_vectors(b, rel, x.shape[-1])
  w = plan.scale * wq if reverse else wk
  return weighted_state_call(x, y, w, d, start, plan, reverse=reverse,
                             write_states=write_states, slots=slots,
                             value_blocks=value_blocks)


def weighted_state_call(x, y, w, d, start, plan, *, reverse, write_states, slots=2,
                        value_blocks=1):
  """The state pass over given weights: s ← d ⊙ s + Xᵀ (w ⊙ Y) per chunk, w `[B, H, T]`
  f32 per token, d `[B, H, N, K]` f32 per chunk and key channel (the module docstring);
  x `[B, T, Hk, K]` with Hk dividing H. Results as `state_call`'s."""
  batch, _, key_heads, key_dim = x.shape
  heads, value_dim = y.shape[2:]
  pieces = start.shape[2]
  wgs = value_dim // COLUMNS_PER_WARPGROUP // value_blocks
  st = _Static(chunks=plan.chunks_per_piece, ratio=heads // key_heads, warpgroups=wgs,
               value_blocks=value_blocks, slots=slots, reverse=reverse,
               interpret=plan.interpret)
  dtype = x.dtype
  tiled = lambda *shape: plgpu.SMEM(shape, dtype, transforms=parts.TILED)
  smem = (tiled(slots, CHUNK, key_dim),  # X
          tiled(slots, wgs, CHUNK, COLUMNS_PER_WARPGROUP),  # Y, by compute warpgroup
          plgpu.SMEM((slots, CHUNK), jnp.float32),  # w
          plgpu.SMEM((slots, key_dim), jnp.float32),  # d
          tiled(wgs, key_dim, COLUMNS_PER_WARPGROUP),  # the state on its way out
          tiled(wgs, CHUNK, COLUMNS_PER_WARPGROUP))  # w ⊙ Y, read by the tensor cores
  barriers = (plgpu.Barrier(num_arrivals=3 + wgs, num_barriers=slots),  # chunk ready
              plgpu.Barrier(num_arrivals=wgs, num_barriers=slots))  # slot free
  out_type = [jax.ShapeDtypeStruct(start.shape, jnp.float32)]
  if write_states:
    out_type.insert(0, jax.ShapeDtypeStruct(
        (batch, heads, plan.chunks, key_dim, value_dim), dtype))
  return parts.launch(
      functools.partial(_kernel, st=st), (x, y, w, d, start), tuple(out_type), smem,
      barriers, grid=(heads * value_blocks, pieces, batch),
      grid_names=("heads", "pieces", "batch"),
      interpret=st.interpret, compute_warpgroups=wgs)
