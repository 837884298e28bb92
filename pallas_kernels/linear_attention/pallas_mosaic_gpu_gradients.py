"""The per-chunk gradients of chunked linear attention on Hopper (Mosaic GPU), scalar gate
(fixed decay and no decay broadcast to it): its `chunked_plan.Launches.gradients`, as
`pallas_triton_gradients.gradient_call` is the Triton kernels'.

Notation as `pallas_triton` and `pallas_mosaic_gpu`: per value head and chunk of C = 64
tokens, b the cumulative log decay inside the chunk, h the state entering the chunk and
dh the gradient w.r.t. the state leaving it (both `[K, V]`, from the Triton state passes),
wq_i = e^{b_i} [rel_i = 0], wk_j = e^{b_C − b_j} [rel_j = rel_C], D_ij = e^{b_i − b_j} for
j ≤ i in one run. With S = scale (Q Kᵀ ⊙ D) and dS = scale (dO Vᵀ ⊙ D) on j < i:

  dq = scale wq ⊙ (dO hᵀ) + dS K          + own ⊙ k
  dk = wk ⊙ (V dhᵀ)        + dSᵀ Q         + own ⊙ q,   own_i = scale dO_i · v_i
  dv = wk ⊙ (K dh)         + Sᵀ dO

and the decay gradient's parts as `pallas_triton_gradients` gives them: per token
Σ_k q ⊙ dq and Σ_k k ⊙ dk over the pairs inside the chunk (the diagonal left out) and with
the state entering it, Σ_k k ⊙ wk ⊙ (V dhᵀ) over the pairs with the state leaving it, and
per chunk through = Σ_v dh ⊙ h `[K]`.

One CTA per (batch, chunk, value head), two warpgroups; the chunk's tiles arrive by TMA:
- the query side computes Q Kᵀ, dO Vᵀ and dO hᵀ together (wgmma), the masked, decayed S
  and dS into shared memory for the key side, then dq (dS from registers) and through;
- the key side computes K dh and V dhᵀ meanwhile, then, once S and dS are there, Sᵀ dO and
  dSᵀ Q (transposed shared-memory operands).
dq, dk and dv leave through shared memory by TMA in the inputs' dtype (per value head:
grouped heads are summed by the caller), the per-token vectors as `[B, H, T]` f32.

Scope: bfloat16/float16, key and value dims 64 and 128, chunk 64; the caller checks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_parts as parts
from pallas_kernels.linear_attention import common
from pallas_kernels.linear_attention.mosaic_gpu_tiles import along, matmuls, zeros

CHUNK = 64
HALF = 64  # rows of the [K, V] states read at a time for Σ_v dh ⊙ h


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  ratio: int  # value heads per key head
  interpret: bool


def chunk_vectors(b, rel, key_dim):
  """From `chunked_plan.prepare`'s b `[B, T, H]` and rel `[B, T]` (T whole chunks): b,
  wq, wk `[B, H, T]` (tokens contiguous, for TMA) and d `[B, H, N, K]`, the state's decay
  over each chunk repeated over its rows (see the module docstring)."""
  batch, seq, heads = b.shape
  chunks = seq // CHUNK
  b = jnp.moveaxis(b, 2, 1).reshape(batch, heads, chunks, CHUNK)
  runs = common.run_masks(rel.reshape(batch, 1, chunks, CHUNK))
  b_last = b[..., -1:]
  wq = jnp.where(runs.incoming, jnp.exp(b), 0.0)
  wk = jnp.where(runs.outgoing, jnp.exp(b_last - b), 0.0)
  d = jnp.where(runs.passes, jnp.exp(b_last), 0.0)
  flat = lambda x: x.reshape(batch, heads, seq)
  return flat(b), flat(wq), flat(wk), jnp.broadcast_to(d, (batch, heads, chunks, key_dim))


def _kernel(q_ref, k_ref, v_ref, do_ref, b_ref, rel_ref, wq_ref, wk_ref, h_ref, dh_ref,
            dq_ref, dk_ref, dv_ref, dbq_ref, dbk_ref, dkeys_ref, through_ref,
            smem, barriers, *, st: _Static):
  """One CTA: one (batch, chunk, value head). q_ref, k_ref `[B, T, Hk, K]`; v_ref, do_ref
  `[B, T, H, V]`; b_ref, wq_ref, wk_ref `[B, H, T]` f32; rel_ref `[B, T]` int32; h_ref,
  dh_ref `[B, H, N, K, V]`. Outputs: dq, dk `[B, T, H, K]`, dv like v, dbq, dbk, dkeys
  `[B, H, T]` f32 and through `[B, H, N, K]` f32."""
  tiles, vectors, staged = smem
  q_smem, k_smem, v_smem, do_smem, h_smem, dh_smem, s_smem, ds_smem = tiles
  b_rows, b_cols, rel_rows, rel_cols, wq_smem, wk_smem, own_smem = vectors
  dq_out, dk_out, dv_out, dbq_out, dbk_out, dkeys_out, through_out = staged
  loaded, scores_ready, done = barriers
  batch, chunk, head = (lax.axis_index(n) for n in ("batch", "chunks", "heads"))
  wg = lax.axis_index("wg")
  key_head = lax.div(head, jnp.int32(st.ratio))
  rows = pl.ds(chunk * CHUNK, CHUNK)
  dtype = q_smem.dtype
  key_dim = q_smem.shape[-1]

  @pl.when(wg == 0)
  def _load():
    copies = [(q_ref.at[batch, rows, key_head], q_smem),
              (k_ref.at[batch, rows, key_head], k_smem),
              (v_ref.at[batch, rows, head], v_smem),
              (do_ref.at[batch, rows, head], do_smem),
              (h_ref.at[batch, head, chunk], h_smem),
              (dh_ref.at[batch, head, chunk], dh_smem),
              (b_ref.at[batch, head, rows], b_rows),
              (b_ref.at[batch, head, rows], b_cols),
              (rel_ref.at[batch, rows], rel_rows),
              (rel_ref.at[batch, rows], rel_cols),
              (wq_ref.at[batch, head, rows], wq_smem),
              (wk_ref.at[batch, head, rows], wk_smem)]
    for src, dst in copies:
      plgpu.copy_gmem_to_smem(src, dst, loaded)

  plgpu.barrier_wait(loaded)
  shape = (CHUNK, CHUNK)
  i, j = parts.iota(shape, 0), parts.iota(shape, 1)

  @pl.when(wg == 0)
  def _query_side():
    scores, d_scores, dq = matmuls(
        [(zeros(shape), q_smem, k_smem, "nt"), (zeros(shape), do_smem, v_smem, "nt"),
         (zeros((CHUNK, key_dim)), do_smem, h_smem, "nt")], st.interpret)
    b_i = plgpu.load(b_rows, layout=parts.ROWS)
    b_j = plgpu.load(b_cols, layout=parts.COLUMNS)
    rel_i = plgpu.load(rel_rows, layout=parts.ROWS)
    rel_j = plgpu.load(rel_cols, layout=parts.COLUMNS)
    visible = (i >= j) & (along(rel_i, shape, 0) == along(rel_j, shape, 1))
    decay = jnp.exp(jnp.where(visible, along(b_i, shape, 0) - along(b_j, shape, 1),
                              -jnp.inf)) * st.scale
    own_smem[...] = jnp.sum(jnp.where(i == j, d_scores, 0.0), axis=1) * st.scale
    s_smem[...] = (scores * decay).astype(dtype)
    d_scores = jnp.where(i > j, d_scores * decay, 0.0).astype(dtype)
    ds_smem[...] = d_scores
    plgpu.commit_smem()
    plgpu.barrier_arrive(scores_ready)
    wq = plgpu.load(wq_smem, layout=parts.ROWS)
    dq = dq * along(wq * st.scale, dq.shape, 0)
    dq, = matmuls([(dq, d_scores, k_smem, "nn")], st.interpret)
    q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    dbq_out[...] = jnp.sum(q * dq, axis=1)
    k = plgpu.load(k_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    own = plgpu.load(own_smem, layout=parts.ROWS)
    dq_out[...] = (dq + along(own, dq.shape, 0) * k).astype(dq_out.dtype)
    for half in range(key_dim // HALF):
      half_rows = pl.ds(half * HALF, HALF)
      h = plgpu.load(h_smem.at[half_rows], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      dh = plgpu.load(dh_smem.at[half_rows], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      through_out.at[half][...] = jnp.sum(h * dh, axis=1)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_out, dq_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(dbq_out, dbq_ref.at[batch, head, rows])
    plgpu.copy_smem_to_gmem(through_out, through_ref.at[batch, head, chunk])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _key_side():
    value_dim = v_smem.shape[-1]
    dv, dk = matmuls([(zeros((CHUNK, value_dim)), k_smem, dh_smem, "nn"),
                      (zeros((CHUNK, key_dim)), v_smem, dh_smem, "nt")], st.interpret)
    wk = plgpu.load(wk_smem, layout=parts.ROWS)
    dv = dv * along(wk, dv.shape, 0)
    dk = dk * along(wk, dk.shape, 0)
    k = plgpu.load(k_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    keys_part = jnp.sum(k * dk, axis=1)
    dkeys_out[...] = keys_part
    plgpu.barrier_wait(scores_ready)
    dv, dk = matmuls([(dv, s_smem, do_smem, "tn"), (dk, ds_smem, q_smem, "tn")],
                     st.interpret)
    dv_out[...] = dv.astype(dv_out.dtype)
    k = plgpu.load(k_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    dbk_out[...] = jnp.sum(k * dk, axis=1) - keys_part
    q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
    own = plgpu.load(own_smem, layout=parts.ROWS)
    dk_out[...] = (dk + along(own, dk.shape, 0) * q).astype(dk_out.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_out, dk_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(dv_out, dv_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(dbk_out, dbk_ref.at[batch, head, rows])
    plgpu.copy_smem_to_gmem(dkeys_out, dkeys_ref.at[batch, head, rows])
    plgpu.wait_smem_to_gmem(0)

  # No warpgroup leaves while the other may still issue wgmma (an exit then was seen to
  # end in CUDA_ERROR_ILLEGAL_INSTRUCTION by jax-linear-attention).
  plgpu.barrier_arrive(done)
  plgpu.barrier_wait(done)


def gradients(q, k, v, do, b, rel, states, d_states, plan):
  """`chunked_plan.Launches.gradients`' arguments and results: q, k `[B, T, Hk, K]`, v, do
  `[B, T, H, V]` (T whole chunks), b `[B, T, H]`, rel `[B, T]`, states and d_states
  `[B, H, N, K, V]`. Returns dq, dk per value head `[B, T, H, K]`, dv, and the decay
  gradient's parts d_b, d_keys `[B, T, H]` and through `[B, H, N, K]`."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  chunks = seq // CHUNK
  dtype = q.dtype
  st = _Static(scale=plan.scale, ratio=heads // key_heads, interpret=plan.interpret)
  b_t, wq, wk, _ = chunk_vectors(b, rel, key_dim)
  tile = lambda rows, cols: plgpu.SMEM((rows, cols), dtype, transforms=parts.TILED)
  vector = lambda length, vdtype=jnp.float32: plgpu.SMEM((length,), vdtype)
  smem = (
      (tile(CHUNK, key_dim), tile(CHUNK, key_dim), tile(CHUNK, value_dim),  # q k v
       tile(CHUNK, value_dim), tile(key_dim, value_dim), tile(key_dim, value_dim),  # dO h dh
       tile(CHUNK, CHUNK), tile(CHUNK, CHUNK)),  # S dS
      # b and rel twice: loaded as rows and as columns of the score tile, one layout per ref
      (vector(CHUNK), vector(CHUNK), vector(CHUNK, jnp.int32), vector(CHUNK, jnp.int32),
       vector(CHUNK), vector(CHUNK), vector(CHUNK)),  # b b rel rel wq wk own
      (tile(CHUNK, key_dim), tile(CHUNK, key_dim), tile(CHUNK, value_dim),  # dq dk dv
       vector(CHUNK), vector(CHUNK), vector(CHUNK),  # dbq dbk dkeys
       plgpu.SMEM((key_dim // HALF, HALF), jnp.float32)),  # through
  )
  barriers = (plgpu.Barrier(num_arrivals=12), plgpu.Barrier(num_arrivals=1),
              plgpu.Barrier(num_arrivals=2))
  per_token = jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)
  out_type = (jax.ShapeDtypeStruct((batch, seq, heads, key_dim), dtype),
              jax.ShapeDtypeStruct((batch, seq, heads, key_dim), dtype),
              jax.ShapeDtypeStruct(v.shape, v.dtype), per_token, per_token, per_token,
              jax.ShapeDtypeStruct((batch, heads, chunks, key_dim // HALF, HALF),
                                   jnp.float32))

  def entry(*refs):
    pl.run_scoped(lambda smem, barriers: _kernel(*refs, smem, barriers, st=st),
                  smem, barriers, collective_axes="wg")

  dq, dk, dv, dbq, dbk, dkeys, through = plgpu.kernel(
      entry, out_type=out_type, grid=(batch, chunks, heads),
      grid_names=("batch", "chunks", "heads"), num_threads=2, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if st.interpret else None,
  )(q, k, v, do, b_t, rel, wq, wk, states, d_states)
  tokens_last = lambda x: jnp.moveaxis(x, 1, 2)
  return (dq, dk, dv, tokens_last(dbq - dbk), tokens_last(dkeys),
          through.reshape(batch, heads, chunks, key_dim))


def decay_gradient(b, rel, resets, d_b, d_keys, through, plan):
  """dL/dg `[B, T, H]` from the gradient kernel's parts, as
  `pallas_triton_gradients.log_decay_gradient` gives it for a scalar gate, in XLA (a few
  passes over `[B, T, H]` f32). Per chunk, with S the prefix sums of d_b:

    inner_t = S at the end of t's run − S_t + d_b_t        (0 at a reset token)
    outer_t = Σ_{u < t} d_keys_u (u in the last run) + e^{b_C} Σ_k through
              (t in the last run and not a reset; the through term only if the chunk
              has no reset)

  b, d_b, d_keys `[B, T, H]`, rel `[B, T]` int32, resets `[B, T]` bool (T whole chunks),
  through `[B, H, N, K]`."""
  batch, seq, heads = b.shape
  chunks = seq // plan.chunk
  split = lambda x: x.reshape(batch, chunks, plan.chunk, *x.shape[2:])
  b, d_b, d_keys = split(b), split(d_b), split(d_keys)  # [B, N, C, H]
  runs = common.run_masks(split(rel))
  rel, reset = split(rel)[..., None], split(resets)[..., None]  # [B, N, C, 1]
  prefix = jnp.cumsum(d_b, axis=2)
  # rel does not fall inside a chunk: t's run ends at the last u with rel_u <= rel_t.
  run_end = jnp.sum(rel[:, :, None, :, 0] <= rel, axis=3, keepdims=True) - 1
  inner = jnp.take_along_axis(prefix, jnp.broadcast_to(run_end, prefix.shape), axis=2)
  inner = jnp.where(reset, 0.0, inner - prefix + d_b)
  last_run = runs.outgoing[..., None]
  keys = jnp.where(last_run, d_keys, 0.0)
  spans = jnp.moveaxis(jnp.sum(through, axis=3), 1, 2)[:, :, None]  # [B, N, 1, H]
  spans = jnp.where(runs.passes[..., None], jnp.exp(b[:, :, -1:]) * spans, 0.0)
  outer = jnp.where(last_run & ~reset, jnp.cumsum(keys, axis=2) - keys + spans, 0.0)
  return (inner + outer).reshape(batch, seq, heads)
