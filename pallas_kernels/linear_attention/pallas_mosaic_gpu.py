"""Chunked causal linear attention in Pallas with the Mosaic GPU lowering, for Hopper
(sm_90): the forward kernel here, the state passes in `pallas_mosaic_gpu_states`, the
per-chunk gradients and the decay gradient's in-chunk sums (XLA) in
`pallas_mosaic_gpu_gradients`; the composition (pieces, padding, the VJP) is
`chunked_plan`'s, shared with `pallas_triton`. No Pallas Triton kernel runs on this path.

Notation as `pallas_triton`: per value head, chunks of C = 64 tokens, b the cumulative log
decay inside a chunk (a scalar gate per token; fixed decay and no decay are broadcast to
it), rel the number of resets so far inside the chunk, h the state entering the chunk
`[K, V]`. The forward is Lightning Attention-2's single pass, as `pallas_triton`'s
`_fused_output_kernel`: one CTA per (batch, value head, sequence piece, value block)
walks its chunks in order with the state on chip and writes

  O = scale · [ wq ⊙ (Q h) + ((Q Kᵀ) ⊙ D) V ],    h ← d · h + Kᵀ (wk ⊙ V),

  D_ij = e^{b_i − b_j} if j ≤ i in one run, else 0;   wq_i = e^{b_i} [rel_i = 0];
  wk_j = e^{b_C − b_j} [rel_j = rel_C];               d = e^{b_C} [the chunk has no reset].

- Warp-specialised as the flash-attention kernels (`pallas_kernels.mosaic_gpu_parts`): a
  memory warpgroup streams each chunk's Q, K, V and vectors b, rel into shared-memory
  slots with TMA (the compute warpgroups derive wq, wk and d from them, b_C and rel_C
  read as scalars); one compute warpgroup per 64 value columns keeps its
  `[K, 64]` slice of h in registers (f32). `BlockSizes.value_blocks` spreads a head's
  value columns over that many CTAs (each reads Q and K) when batch × heads is small.
- A compute warpgroup's chunk: Q Kᵀ and Q h together (wgmma; h read from shared memory
  in the inputs' dtype, as the Triton kernel's dots read it), the decay mask D in
  registers, O += (Q Kᵀ ⊙ D) V (the scores from registers), O out by TMA; then wk ⊙ V
  through shared memory and h ← d · h + Kᵀ (wk ⊙ V) (wgmma with Kᵀ a transposed
  shared-memory operand).
- Sequence pieces and the chunk quantities (b, rel) are `chunked_plan`'s: the state
  entering each piece comes from a state pass (`pallas_mosaic_gpu_states`) and a scan.

Scope: bfloat16/float16, scalar gates (and fixed/no decay), key and value head dims 64
and 128, chunk_size 64 (one wgmma tile of scores); a vector gate (GLA) in bfloat16 through
`pallas_mosaic_gpu_vector` (this kernel over operands that carry the decay). Everything
else raises NotImplementedError naming the argument; `triton` serves it.

Interpret mode (CPU): as `mosaic_gpu_parts`, the matmuls are plain dots of the same tiles.
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
from pallas_kernels.linear_attention import chunked_plan
from pallas_kernels.linear_attention.pallas_mosaic_gpu_gradients import (decay_gradient,
                                                                       gradients)
from pallas_kernels.linear_attention.pallas_mosaic_gpu_states import state_call
from pallas_kernels.linear_attention.mosaic_gpu_tiles import (along, column_tiles, matmuls,
                                                              value_block, zeros)

_DTYPES = ("bfloat16", "float16")
_HEAD_DIMS = (64, 128)
CHUNK = 64  # tokens per chunk: the score tile is one 64-row wgmma
COLUMNS_PER_WARPGROUP = 64
TARGET_CTAS = 132  # one CTA per SM of an H100 (its shared memory holds one)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """slots: chunks in flight in shared memory (≥ 2); pieces: sequence pieces run in
  parallel, None for about `TARGET_CTAS` CTAs with pieces of at least
  `chunked_plan.MIN_PIECE_CHUNKS` chunks; value_blocks: CTAs per (batch, head) over the
  value columns (1 or value_dim // 64), None for one CTA per 64 columns when batch × heads
  is under `TARGET_CTAS` (more CTAs without the pieces' extra state pass), else 1."""
  slots: int = 2
  pieces: int | None = None
  value_blocks: int | None = None

  def __post_init__(self):
    if not (isinstance(self.slots, int) and self.slots >= 2):
      raise ValueError(f"BlockSizes.slots must be an int >= 2; got {self.slots!r}.")
    for name in ("pieces", "value_blocks"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"BlockSizes.{name} must be None or an int >= 1; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  chunks: int  # per piece
  ratio: int  # value heads per key head
  warpgroups: int  # compute warpgroups per CTA: value_dim // 64 // value_blocks
  value_blocks: int
  slots: int
  vector: bool  # the vector gate's factored operands (`pallas_mosaic_gpu_vector`)
  interpret: bool


def _kernel(q_ref, k_ref, v_ref, b_ref, rel_ref, start_ref, kt_ref, d_ref, out_ref, end_ref,
            smem, barriers, *, st: _Static):
  """One CTA: one (batch, value head, piece). q_ref, k_ref [B, T, Hk, K]; v_ref, out_ref
  [B, T, H, V]; b_ref [B, H, T] f32; rel_ref [B, T] int32; start_ref, end_ref
  [B, H, P, K, V] f32. wq, wk and d come from b and rel here, as the docstring defines
  them (b_C and rel_C read as scalars).

  With st.vector (a vector gate, `pallas_mosaic_gpu_vector`): b_ref is None and the decays
  sit in the operands: q_ref, k_ref hold q ⊙ e^{b} and k ⊙ e^{−b} per value head (Hk = H),
  kt_ref `[B, T, H, K]` the state update's keys k ⊙ e^{b_C − b} [rel = rel_C], d_ref
  `[B, H, N, K]` f32 the state's decay over each chunk per key channel (0 after a reset);
  the masks (runs, causality) stay here."""
  q_smem, k_smem, v_smem, vectors, own = smem
  b_smem, b_cols_smem, rel_smem, rel_cols_smem, kt_smem, d_smem = vectors
  h_smem2, vw_smem2, o_smem2 = own
  ready, free = barriers
  batch, piece = lax.axis_index("batch"), lax.axis_index("pieces")
  head, column_block = value_block(st.value_blocks, st.warpgroups)
  wg = lax.axis_index("wg")
  key_head = lax.div(head, jnp.int32(st.ratio))
  first = piece * st.chunks
  width = COLUMNS_PER_WARPGROUP

  def issue(t, slot):  # Step t of the stream is the piece's chunk t.
    rows = pl.ds((first + t) * CHUNK, CHUNK)
    copies = [(q_ref.at[batch, rows, key_head], q_smem.at[slot]),
              (k_ref.at[batch, rows, key_head], k_smem.at[slot]),
              (rel_ref.at[batch, rows], rel_smem.at[slot]),
              (rel_ref.at[batch, rows], rel_cols_smem.at[slot])]
    if st.vector:
      copies += [(kt_ref.at[batch, rows, head], kt_smem.at[slot]),
                 (d_ref.at[batch, head, first + t], d_smem.at[slot])]
    else:
      copies += [(b_ref.at[batch, head, rows], b_smem.at[slot]),
                 (b_ref.at[batch, head, rows], b_cols_smem.at[slot])]
    copies += column_tiles(v_ref, v_smem, batch, rows, head, column_block, slot,
                           st.warpgroups, width)
    for src, dst in copies:
      plgpu.copy_gmem_to_smem(src, dst, ready.at[slot])

  @pl.when(wg < st.warpgroups)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    cols = pl.ds((column_block + wg) * width, width)
    h_smem, o_smem = h_smem2.at[wg], o_smem2.at[wg]
    dtype = q_smem.dtype
    h = plgpu.load(start_ref.at[batch, head, piece, :, cols], layout=plgpu.Layout.WGMMA,
                   optimized=False)
    h_smem[...] = h.astype(dtype)
    plgpu.commit_smem()
    shape = (CHUNK, CHUNK)
    causal = parts.iota(shape, 0) >= parts.iota(shape, 1)

    def chunk_step(t, h):
      slot = lax.rem(t, jnp.int32(st.slots))
      rows = pl.ds((first + t) * CHUNK, CHUNK)
      q, k, v = q_smem.at[slot], k_smem.at[slot], v_smem.at[slot, wg]
      plgpu.barrier_wait(ready.at[slot])
      scores, qh = matmuls([(zeros((CHUNK, CHUNK)), q, k, "nt"),
                            (zeros((CHUNK, width)), q, h_smem, "nn")], st.interpret)
      rel_i = plgpu.load(rel_smem.at[slot], layout=parts.ROWS)
      rel_j = plgpu.load(rel_cols_smem.at[slot], layout=parts.COLUMNS)
      rel_last = rel_smem[slot, CHUNK - 1]
      visible = causal & (along(rel_i, shape, 0) == along(rel_j, shape, 1))
      if st.vector:  # decays in the operands: only the masks are left
        scores = jnp.where(visible, scores, 0.0)
        wq = jnp.where(rel_i == 0, 1.0, 0.0)
      else:
        b_i = plgpu.load(b_smem.at[slot], layout=parts.ROWS)
        b_j = plgpu.load(b_cols_smem.at[slot], layout=parts.COLUMNS)
        b_last = b_smem[slot, CHUNK - 1]
        scores = scores * jnp.exp(jnp.where(
            visible, along(b_i, shape, 0) - along(b_j, shape, 1), -jnp.inf))
        wq = jnp.where(rel_i == 0, jnp.exp(b_i), 0.0)
      o = qh * along(wq, qh.shape, 0)
      o, = matmuls([(o, scores.astype(dtype), v, "nn")], st.interpret)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's O has left
      o_smem[...] = (o * st.scale).astype(dtype)
      if st.vector:  # h ← e^{b_C} ⊙ h + K_tailᵀ V, the run mask in K_tail
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, rows, head, cols])
        d = plgpu.load(d_smem.at[slot], layout=parts.ROWS)
        h, = matmuls([(h * along(d, h.shape, 0), kt_smem.at[slot], v, "tn")], st.interpret)
      else:
        wk = jnp.where(rel_i == rel_last, jnp.exp(b_last - b_i), 0.0)
        v_rows = plgpu.load(v, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        vw_smem = vw_smem2.at[wg]
        vw_smem[...] = (v_rows * along(wk, v_rows.shape, 0)).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, rows, head, cols])
        d = jnp.where(rel_last == 0, jnp.exp(b_last), 0.0)
        h, = matmuls([(h * d, k, vw_smem, "tn")], st.interpret)
      plgpu.barrier_arrive(free.at[slot])
      h_smem[...] = h.astype(dtype)
      plgpu.commit_smem()
      return h

    h = lax.fori_loop(0, st.chunks, chunk_step, h)
    end_ref.at[batch, head, piece, :, cols][...] = h
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == st.warpgroups)
  def _memory():
    parts.stream(jnp.int32(st.chunks), [(issue, ready, free)], st.slots, st.chunks)


def output_call(q, k, v, b, rel, starts, plan, blocks: BlockSizes, vector_operands=None):
  """Launches `_kernel` over (value head and value block, piece, batch) on whole pieces
  (`plan`, a `chunked_plan.Plan`); starts `[B, H, P, K, V]`. Returns o `[B, T, H, V]`
  and the state leaving each piece.

  vector_operands: None for a scalar gate b `[B, T, H]`; for a vector gate (b None, q and
  k the factored operands per value head) the state update's keys `[B, T, H, K]` and
  chunk decays `[B, H, N, K]` f32 (`_kernel`'s docstring)."""
  batch, _, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  pieces = starts.shape[2]
  slots, wgs = blocks.slots, value_dim // COLUMNS_PER_WARPGROUP // blocks.value_blocks
  is_vector = vector_operands is not None
  st = _Static(scale=plan.scale, chunks=plan.chunks_per_piece, ratio=heads // key_heads,
               warpgroups=wgs, value_blocks=blocks.value_blocks, slots=slots,
               vector=is_vector, interpret=plan.interpret)
  k_tail, chunk_decay = vector_operands if is_vector else (None, None)
  b = None if is_vector else jnp.moveaxis(b, 2, 1)  # [B, H, T]: tokens contiguous, for TMA
  dtype = q.dtype
  tiled = lambda *shape: plgpu.SMEM(shape, dtype, transforms=parts.TILED)
  vector = lambda length, vdtype=jnp.float32: plgpu.SMEM((slots, length), vdtype)
  smem = (
      tiled(slots, CHUNK, key_dim),  # Q
      tiled(slots, CHUNK, key_dim),  # K
      tiled(slots, wgs, CHUNK, COLUMNS_PER_WARPGROUP),  # V, by compute warpgroup
      # b and rel twice: loaded as rows and as columns of the score tile, one layout per
      # ref; for a vector gate no b, but K_tail and the chunk decay
      (None if is_vector else vector(CHUNK), None if is_vector else vector(CHUNK),
       vector(CHUNK, jnp.int32), vector(CHUNK, jnp.int32),
       tiled(slots, CHUNK, key_dim) if is_vector else None,
       vector(key_dim) if is_vector else None),
      (tiled(wgs, key_dim, COLUMNS_PER_WARPGROUP),  # h, read by the tensor cores
       None if is_vector else tiled(wgs, CHUNK, COLUMNS_PER_WARPGROUP),  # wk ⊙ V
       tiled(wgs, CHUNK, COLUMNS_PER_WARPGROUP)),  # O on its way out
  )
  barriers = (plgpu.Barrier(num_arrivals=6 + wgs, num_barriers=slots),  # chunk ready
              plgpu.Barrier(num_arrivals=wgs, num_barriers=slots))  # slot free
  return parts.launch(
      functools.partial(_kernel, st=st),
      (q, k, v, b, rel, starts, k_tail, chunk_decay),
      (jax.ShapeDtypeStruct(v.shape, dtype), jax.ShapeDtypeStruct(starts.shape, jnp.float32)),
      smem, barriers, grid=(heads * blocks.value_blocks, pieces, batch),
      grid_names=("heads", "pieces", "batch"), interpret=st.interpret,
      compute_warpgroups=wgs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _linear_attention(q, k, v, g, h0, resets, plan, blocks):
  return _forward(q, k, v, g, h0, resets, plan, blocks)[0]


def _launches(blocks):
  state = functools.partial(state_call, slots=blocks.slots, value_blocks=blocks.value_blocks)
  return chunked_plan.Launches(output=functools.partial(output_call, blocks=blocks),
                               state=state, gradients=gradients,
                               decay_gradient=decay_gradient)


def _forward(q, k, v, g, h0, resets, plan, blocks):
  return chunked_plan.forward(q, k, v, g, h0, resets, plan, _launches(blocks))


def _backward(plan, blocks, residuals, cotangents):
  return chunked_plan.backward(plan, residuals, cotangents, _launches(blocks))


_linear_attention.defvjp(_forward, _backward)


def linear_attention(query, key, value, log_decay, initial_state, resets, *, scale: float,
                     chunk_size: int, interpret: bool = False,
                     block_sizes: BlockSizes | None = None):
  """Causal linear attention on Hopper: the Mosaic GPU forward, state passes and gradient
  kernel, with the decay gradient's in-chunk sums in XLA (`pallas_mosaic_gpu_gradients`).

  Arguments and results as `pallas_triton.linear_attention`, except: query/key/value are
  bfloat16 or float16; log_decay is None, fixed `[value_heads]`, a scalar gate
  `[batch, seq, value_heads]` or, in bfloat16, a vector gate `[batch, seq, value_heads,
  key_dim]` (`pallas_mosaic_gpu_vector`); key_dim and value_dim in (64, 128); chunk_size 64.

  Raises:
    NotImplementedError: naming the argument this kernel cannot serve.
  """
  batch, seq, _, key_dim = key.shape
  heads, value_dim = value.shape[2:]
  dtype = jnp.dtype(query.dtype)
  if dtype.name not in _DTYPES or key.dtype != dtype or value.dtype != dtype:
    raise NotImplementedError(
        f"pallas_mosaic_gpu supports query/key/value dtype in {_DTYPES} (all equal); got "
        f"{query.dtype}, {key.dtype}, {value.dtype}. Use 'triton'.")
  if key_dim not in _HEAD_DIMS or value_dim not in _HEAD_DIMS:
    raise NotImplementedError(
        f"pallas_mosaic_gpu supports key_dim and value_dim in {_HEAD_DIMS}; got {key_dim} "
        f"and {value_dim}. Use 'triton'.")
  if chunk_size != CHUNK:
    raise NotImplementedError(f"pallas_mosaic_gpu supports chunk_size={CHUNK} only (one "
                              f"wgmma tile of scores); got {chunk_size}.")
  vector = log_decay is not None and log_decay.ndim == 4
  if vector and dtype != jnp.bfloat16:
    raise NotImplementedError(
        f"pallas_mosaic_gpu takes a vector gate (log_decay [batch, seq, heads, key_dim]) "
        f"in bfloat16 only (its factored operands reach e^60, past float16's range); got "
        f"{dtype}. Use 'triton'.")
  if seq < 1:
    raise NotImplementedError(f"seq={seq}: an empty sequence has nothing to run.")
  blocks = block_sizes or BlockSizes()
  value_blocks = blocks.value_blocks
  if value_blocks is None:
    value_blocks = value_dim // COLUMNS_PER_WARPGROUP if batch * heads < TARGET_CTAS else 1
  if value_dim % (COLUMNS_PER_WARPGROUP * value_blocks):
    raise NotImplementedError(
        f"block_sizes.value_blocks={value_blocks} does not split value_dim={value_dim} "
        f"into blocks of whole {COLUMNS_PER_WARPGROUP}-column warpgroup tiles.")
  pieces = blocks.pieces
  if pieces is None:
    chunks = -(-seq // CHUNK)
    pieces = max(1, min(TARGET_CTAS // (batch * heads * value_blocks),
                        chunks // chunked_plan.MIN_PIECE_CHUNKS))
  g = chunked_plan.token_gate(log_decay, key, value)
  if vector:
    from pallas_kernels.linear_attention import pallas_mosaic_gpu_vector  # pylint: disable=g-import-not-at-top
    return pallas_mosaic_gpu_vector.linear_attention(
        query, key, value, g, initial_state.astype(jnp.float32), resets.astype(bool),
        scale=scale, pieces=pieces,
        blocks=dataclasses.replace(blocks, value_blocks=value_blocks), interpret=interpret)
  triton_blocks = dataclasses.replace(
      chunked_plan.BlockSizes.get_default(key_dim, value_dim, dtype), pieces=pieces)
  plan = chunked_plan.make_plan(batch, seq, heads, key_dim, value_dim, dtype, False, scale,
                                chunk_size, triton_blocks, interpret)
  blocks = dataclasses.replace(blocks, pieces=plan.pieces, value_blocks=value_blocks)
  return _linear_attention(query, key, value, g, initial_state.astype(jnp.float32),
                           resets.astype(bool), plan, blocks)
