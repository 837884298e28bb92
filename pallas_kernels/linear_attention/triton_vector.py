"""Chunked causal linear attention with a vector gate (GLA) in the Triton language.

The kernels `triton.linear_attention` launches when log_decay is `[B, T, H, K]`: the
vector-gate forms of `pallas_triton`'s kernels, written in Triton (read `pallas_triton`'s
module docstring for the algorithm; `triton`'s for the scalar gate and the launch scheme).
Per value head, with b_i `[K]` the cumulative log decay inside a chunk and h_n the state
entering chunk n,

  o_i     = scale · [ Σ_{j≤i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j + (q_i ⊙ e^{b_i})ᵀ h_n ]
  h_{n+1} = e^{b_C} ⊙ h_n + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ.

The pairwise decay differs per key column, so it cannot sit outside a matmul. A chunk
whose decay falls by at most `chunked_plan.FACTORED_RANGE` (60) in every channel is
factored, (q_i e^{b_i}) · (k_j e^{−b_j}), and costs a scalar gate's matmuls. Any other
chunk is "exact": split into row blocks of SUB = 16, pairs in different blocks go
through a reference point r (b just before the later block, or at the end of the earlier
one), (q_i e^{b_i − r}) · (k_j e^{r − b_j}), both factors ≤ 1, and pairs inside a block
use the exact `[SUB, K]` decay one key row at a time (`_diagonal_block`). Resets are
masks (`rel`), never decays, as in `pallas_triton`.

Kernels (grids as `triton`'s scalar ones):

  * `_chunk_cumsum_kernel`: b, the cumulative log decay inside each chunk.
  * `_fused_output_kernel`: the one-pass forward, h `[K, BV]` carried on chip.
  * `_state_kernel`: the chunk-state recurrence (h_n; in reverse, dh_n; piece starts).
  * `_queries_kernel`, `_keys_kernel`, `_exact_kernel`: the gradients of one chunk in
    `pallas_triton_gradients._gradient_kernel`'s stages "queries" and "keys" (factored
    chunks, split so that each program holds fewer `[C, K]` f32 tiles) and "exact" (the
    chunks left unfactored, over the first two launches' outputs, aliased).
  * `_decay_gradient_kernel`: dL/dg from the gradient kernels' parts, per chunk.

The composition is `chunked_plan.forward`/`backward`, through `LAUNCHES` (b from
`_chunk_cumsum_kernel` instead of `pallas_triton._chunk_cumsum`, a Pallas kernel): no
Pallas kernel runs on this path. Precision as in `pallas_triton`: dot operands in the
inputs' dtype (f32 inputs: IEEE f32 dots), f32 accumulation and carried state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.linear_attention import chunked_plan
from pallas_kernels.linear_attention.chunked_plan import storage_dtype
from pallas_kernels.triton_call import triton_call

# Factored chunks: log decay falling by at most this in every channel.
_FACTORED_RANGE = tl.constexpr(chunked_plan.FACTORED_RANGE)


def dot_precision(dtype) -> str:
  """tl.dot's input_precision: IEEE f32 for f32 operands, as `pallas_triton_tiles.dot`'s
  HIGHEST (not TF32); ignored for 16-bit operands."""
  return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


@triton.jit
def _chunk_cumsum_kernel(g_ptr, seq, b_ptr, HEADS: tl.constexpr, K: tl.constexpr,
                         C: tl.constexpr):
  """b = the cumulative sum of g `[B, T, H, K]` f32 over one chunk's rows; T = seq."""
  chunk, h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  rows = n.to(tl.int64) * seq + chunk * C + tl.arange(0, C)
  at = (rows[:, None] * HEADS + h) * K + tl.arange(0, K)[None, :]
  tl.store(b_ptr + at, tl.cumsum(tl.load(g_ptr + at), axis=0))


@triton.jit
def _diagonal_block(q, b, rel, k_ptr, b_ptr, row0, d_scores, hk, h, KEY_HEADS: tl.constexpr,
                    HEADS: tl.constexpr, K: tl.constexpr, SUB: tl.constexpr,
                    GRADIENTS: tl.constexpr):
  """The exact diagonal block (`pallas_triton_tiles.vector_diag`): q, b `[SUB, K]` and rel
  `[SUB]` of the rows row0 … row0 + SUB − 1 (global rows of `[B, T]`).

  scores[i, j] = Σ_k q_ik k_jk e^{b_ik − b_jk} for j ≤ i in one run, built one key row j
  at a time so the decay tile never meets a positive exponent. With GRADIENTS, d_scores
  (dL/dscores, `[SUB, SUB]` f32) gives the block's parts of dq and dk (pairs j < i).
  Returns (scores, dq, dk), f32.
  """
  i = tl.arange(0, SUB)
  kk = tl.arange(0, K)
  mask = (i[:, None] >= i[None, :]) & (rel[:, None] == rel[None, :])
  q = q.to(tl.float32)
  if GRADIENTS:
    d_scores = tl.where(mask & (i[:, None] > i[None, :]), d_scores, 0.0)
  scores = tl.zeros([SUB, SUB], tl.float32)
  dq = tl.zeros([SUB, K], tl.float32)
  dk = tl.zeros([SUB, K], tl.float32)
  for j in range(0, SUB):
    k_j = tl.load(k_ptr + ((row0 + j) * KEY_HEADS + hk) * K + kk).to(tl.float32)
    b_j = tl.load(b_ptr + ((row0 + j) * HEADS + h) * K + kk)
    decay = tl.exp(tl.where(i[:, None] >= j, b - b_j[None, :], -float("inf")))
    column = tl.sum(q * k_j[None, :] * decay, axis=1)
    scores = tl.where(i[None, :] == j, column[:, None], scores)
    if GRADIENTS:
      d_column = tl.sum(tl.where(i[None, :] == j, d_scores, 0.0), axis=1)
      dq += d_column[:, None] * k_j[None, :] * decay
      dk_j = tl.sum(d_column[:, None] * q * decay, axis=0)
      dk = tl.where(i[:, None] == j, dk_j[None, :], dk)
  return tl.where(mask, scores, 0.0), dq, dk


@triton.jit
def _factored_chunk_output(q_ptr, o_ptr, k, v, b, rel, s, rows, hk, h, vv, scale,
                           HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, K: tl.constexpr,
                           V: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
  """Writes o of a factored chunk: (q_i e^{b_i}) · (k_j e^{−b_j}), the key factor ≤ e^60,
  as one `[C, C]` score tile; k, v, b `[C, ·]` and rel `[C]` of the chunk's `rows`."""
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  q = tl.load(q_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
  q_decayed = q.to(tl.float32) * tl.exp(b)
  k_grown = (k.to(tl.float32) * tl.exp(-b)).to(dtype)
  pairs = (i[:, None] >= i[None, :]) & (rel[:, None] == rel[None, :])
  scores = tl.where(pairs, tl.dot(q_decayed.to(dtype), tl.trans(k_grown),
                                  input_precision=PRECISION), 0.0)
  # Tokens still in the run that entered the chunk read the carried state.
  out = tl.dot(tl.where(rel[:, None] == 0, q_decayed, 0.0).to(dtype), s.to(dtype),
               input_precision=PRECISION)
  out += tl.dot(scores.to(dtype), v, input_precision=PRECISION)
  tl.store(o_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :],
           (scale * out).to(o_ptr.dtype.element_ty))


@triton.jit
def _exact_chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, o_ptr, k, v, b, rel, s, row0, hk,
                        h, vv, scale, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr,
                        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        SUB: tl.constexpr, PRECISION: tl.constexpr):
  """Writes o of a chunk too strongly decayed to factor, in row blocks of SUB
  (`pallas_triton._vector_block_output`): the state term, the exact diagonal block, and
  the chunk's earlier rows through r = b just before the block."""
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  u = tl.arange(0, SUB)
  kk = tl.arange(0, K)
  for start in tl.static_range(0, C, SUB):
    rows = row0 + start + u
    q = tl.load(q_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
    b_sub = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])
    rel_sub = tl.load(rel_ptr + rows)
    q_decayed = tl.where(rel_sub[:, None] == 0, q.to(tl.float32) * tl.exp(b_sub), 0.0)
    out = tl.dot(q_decayed.to(dtype), s.to(dtype), input_precision=PRECISION)
    scores, _, _ = _diagonal_block(q, b_sub, rel_sub, k_ptr, b_ptr, row0 + start,
                                   tl.zeros([SUB, SUB], tl.float32), hk, h, KEY_HEADS,
                                   HEADS, K, SUB, False)
    v_sub = tl.load(v_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    out += tl.dot(scores.to(dtype), v_sub, input_precision=PRECISION)
    if start > 0:
      r = tl.load(b_ptr + ((row0 + start - 1) * HEADS + h) * K + kk)
      q_factor = tl.exp(b_sub - r[None, :])
      k_r = k.to(tl.float32) * tl.exp(tl.where(i[:, None] < start, r[None, :] - b,
                                               -float("inf")))
      scores = tl.dot((q.to(tl.float32) * q_factor).to(dtype), tl.trans(k_r.to(dtype)),
                      input_precision=PRECISION)
      scores = tl.where(rel_sub[:, None] == rel[None, :], scores, 0.0)
      out += tl.dot(scores.to(dtype), v, input_precision=PRECISION)
    tl.store(o_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :],
             (scale * out).to(o_ptr.dtype.element_ty))


@triton.jit
def _fused_output_kernel(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, start_ptr, seq, chunks, scale,
                         o_ptr, end_ptr, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr,
                         PIECES: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BV: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                         PRECISION: tl.constexpr):
  """The forward of one sequence piece and one value block (`triton._fused_output_kernel`
  with b `[B, T, H, K]`): each chunk factored or exact, then the state update."""
  block_v, piece, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h = batch_head // HEADS, batch_head % HEADS
  hk = h // (HEADS // KEY_HEADS)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  vv = block_v * BV + tl.arange(0, BV)
  state = ((n * HEADS + h) * PIECES + piece).to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
  s = tl.load(start_ptr + state)  # h [K, BV], f32, carried over the chunks

  for t in range(0, chunks):
    row0 = n.to(tl.int64) * seq + (piece * chunks + t) * C
    rows = row0 + i
    k = tl.load(k_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :]).to(dtype)
    v = tl.load(v_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    b = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])  # [C, K] f32
    rel = tl.load(rel_ptr + rows)
    b_last = tl.load(b_ptr + ((row0 + C - 1) * HEADS + h) * K + kk)  # [K]
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    # The branches are helpers: Triton's if/else needs the names both define to agree
    # in type, and the blocks' tiles are [SUB, ·] where the factored ones are [C, ·].
    if tl.min(b_last, axis=0) >= -_FACTORED_RANGE:
      _factored_chunk_output(q_ptr, o_ptr, k, v, b, rel, s, rows, hk, h, vv, scale, HEADS,
                             KEY_HEADS, K, V, C, PRECISION)
    else:
      _exact_chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, o_ptr, k, v, b, rel, s, row0,
                          hk, h, vv, scale, HEADS, KEY_HEADS, K, V, C, SUB, PRECISION)

    # h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ over the chunk's last run.
    weight = tl.where(rel[:, None] == rel_last, tl.exp(b_last[None, :] - b), 0.0)
    keys = (k.to(tl.float32) * weight).to(dtype)
    carry = tl.where(rel_last == 0, tl.exp(b_last), 0.0)
    s = carry[:, None] * s + tl.dot(tl.trans(keys), v, input_precision=PRECISION)

  tl.store(end_ptr + state, s)


def _fused_output_call(q, k, v, b, rel, starts, plan):
  """`triton._fused_output_call` for b `[B, T, H, K]`."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  return triton_call(
      _fused_output_kernel, q, k, v, b, rel, starts, seq, plan.chunks_per_piece,
      np.float32(plan.scale),
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct(starts.shape, jnp.float32)],
      grid=(value_dim // plan.block_v, plan.pieces, batch * heads),
      interpret=plan.interpret, num_warps=plan.num_warps, num_stages=plan.num_stages,
      name="linear_attention_vector_fused_fwd", HEADS=heads, KEY_HEADS=key_heads,
      PIECES=plan.pieces, K=key_dim, V=value_dim, BV=plan.block_v, C=plan.chunk,
      SUB=plan.sub, PRECISION=dot_precision(q.dtype))


@triton.jit
def _state_kernel(x_ptr, y_ptr, b_ptr, rel_ptr, start_ptr, seq, chunks, scale, states_ptr,
                  end_ptr, HEADS: tl.constexpr, X_HEADS: tl.constexpr, PIECES: tl.constexpr,
                  N: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr,
                  WRITE_STATES: tl.constexpr, PRECISION: tl.constexpr):
  """`triton._state_kernel` with b `[B, T, H, K]`: the decays are per state row.

  Forward: h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ (j in the chunk's last run);
  reverse: dh ← e^{b_C} ⊙ dh + scale Σ_i (q_i ⊙ e^{b_i}) dO_iᵀ (i before any reset).
  """
  tile, piece, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h = batch_head // HEADS, batch_head % HEADS
  hx = h // (HEADS // X_HEADS)
  dtype = x_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = (tile // (V // BV)) * BK + tl.arange(0, BK)
  vv = (tile % (V // BV)) * BV + tl.arange(0, BV)
  in_state = kk[:, None] * V + vv[None, :]
  end = ((n * HEADS + h) * PIECES + piece).to(tl.int64) * K * V + in_state
  s = tl.load(start_ptr + end)  # [BK, BV] f32, carried over the chunks

  for t in range(0, chunks):
    if REVERSE:
      j = piece * chunks + chunks - 1 - t
    else:
      j = piece * chunks + t
    if WRITE_STATES:
      tl.store(states_ptr + ((n * HEADS + h) * N + j).to(tl.int64) * K * V + in_state,
               s.to(states_ptr.dtype.element_ty))
    row0 = n.to(tl.int64) * seq + j * C
    rows = row0 + i
    x = tl.load(x_ptr + (rows[:, None] * X_HEADS + hx) * K + kk[None, :])
    y = tl.load(y_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    b = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])  # [C, BK]
    rel = tl.load(rel_ptr + rows)
    b_last = tl.load(b_ptr + ((row0 + C - 1) * HEADS + h) * K + kk)  # [BK]
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    if REVERSE:
      weight = tl.where(rel[:, None] == 0, scale * tl.exp(b), 0.0)
    else:
      weight = tl.where(rel[:, None] == rel_last, tl.exp(b_last[None, :] - b), 0.0)
    x = (x.to(tl.float32) * weight).to(dtype)
    carry = tl.where(rel_last == 0, tl.exp(b_last), 0.0)
    s = carry[:, None] * s + tl.dot(tl.trans(x), y, input_precision=PRECISION)

  tl.store(end_ptr + end, s)


def _state_call(x, y, b, rel, start, plan, *, reverse, write_states):
  """`triton._state_call` for b `[B, T, H, K]`."""
  batch, seq, x_heads, key_dim = x.shape
  heads, value_dim = y.shape[2:]
  ends = jax.ShapeDtypeStruct(start.shape, jnp.float32)
  states = jax.ShapeDtypeStruct(
      (batch, heads, plan.chunks, key_dim, value_dim) if write_states else (1,),
      storage_dtype(x.dtype))
  tiles = (key_dim // plan.block_k) * (value_dim // plan.block_v)
  states, ends = triton_call(
      _state_kernel, x, y, b, rel, start, seq, plan.chunks_per_piece, np.float32(plan.scale),
      out_shape=[states, ends], grid=(tiles, plan.pieces, batch * heads),
      interpret=plan.interpret, num_warps=plan.num_warps, num_stages=plan.num_stages,
      name=f"linear_attention_vector_state_{'bwd' if reverse else 'fwd'}",
      HEADS=heads, X_HEADS=x_heads, PIECES=plan.pieces, N=plan.chunks, K=key_dim,
      V=value_dim, BK=plan.block_k, BV=plan.block_v, C=plan.chunk, REVERSE=reverse,
      WRITE_STATES=write_states, PRECISION=dot_precision(x.dtype))
  return (states, ends) if write_states else (ends,)


@triton.jit
def _queries_kernel(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, h_ptr, dh_ptr, batch, seq,
                    scale, dq_ptr, db_ptr, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr,
                    N: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, PRECISION: tl.constexpr):
  """Stage "queries", factored chunks: dq and q ⊙ dq (the queries' part of db, without
  the pair (i, i)) of one chunk and value block. Layouts as `triton._gradient_kernel`'s,
  db `[S, B, T, H, K]`."""
  chunk, split, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h = batch_head // HEADS, batch_head % HEADS
  hk = h // (HEADS // KEY_HEADS)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  vv = split * BV + tl.arange(0, BV)
  row0 = n.to(tl.int64) * seq + chunk * C
  rows = row0 + i
  b_last = tl.load(b_ptr + ((row0 + C - 1) * HEADS + h) * K + kk)
  if tl.min(b_last, axis=0) >= -_FACTORED_RANGE:
    q = tl.load(q_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
    k = tl.load(k_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :]).to(dtype)
    v = tl.load(v_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    do = tl.load(do_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    b = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])
    rel = tl.load(rel_ptr + rows)
    hs = tl.load(h_ptr + ((n * HEADS + h) * N + chunk).to(tl.int64) * K * V
                 + kk[:, None] * V + vv[None, :])
    # Inter-chunk: o_i ∋ scale (q_i ⊙ e^{b_i})ᵀ h_n.
    q_decay = tl.where(rel[:, None] == 0, tl.exp(b), 0.0)
    dq = scale * q_decay * tl.dot(do, tl.trans(hs.to(dtype)), input_precision=PRECISION)
    # Intra-chunk, pairs j < i: (q_i e^{b_i}) · (k_j e^{−b_j}).
    pairs = (i[:, None] > i[None, :]) & (rel[:, None] == rel[None, :])
    d_scores = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION)
    d_scores = tl.where(pairs, d_scores, 0.0).to(dtype)
    k_grown = (k.to(tl.float32) * tl.exp(-b)).to(dtype)
    dq += tl.exp(b) * tl.dot(d_scores, k_grown, input_precision=PRECISION)
    own = scale * tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=1)
    part = (split * batch + n).to(tl.int64) * seq + chunk * C + i  # rows of [S, B, T]
    per_head = (part[:, None] * HEADS + h) * K + kk[None, :]
    tl.store(dq_ptr + per_head,
             (dq + own[:, None] * k.to(tl.float32)).to(dq_ptr.dtype.element_ty))
    tl.store(db_ptr + per_head, q.to(tl.float32) * dq)


@triton.jit
def _keys_kernel(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, h_ptr, dh_ptr, db_in_ptr, batch,
                 seq, scale, dk_ptr, dv_ptr, db_ptr, dkeys_ptr, through_ptr,
                 HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, N: tl.constexpr,
                 K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                 PRECISION: tl.constexpr):
  """Stage "keys", factored chunks: dk, dv, db (−k ⊙ dk added to "queries"' q ⊙ dq,
  db_in, aliased to db), dkeys = k ⊙ dk_state; and through = Σ_v dh_n ⊙ h_n `[K]` of
  every chunk, factored or not."""
  chunk, split, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h = batch_head // HEADS, batch_head % HEADS
  hk = h // (HEADS // KEY_HEADS)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  vv = split * BV + tl.arange(0, BV)
  row0 = n.to(tl.int64) * seq + chunk * C
  rows = row0 + i
  state = (((n * HEADS + h) * N + chunk).to(tl.int64) * K * V + kk[:, None] * V
           + vv[None, :])
  hs = tl.load(h_ptr + state)
  dh = tl.load(dh_ptr + state)
  through = ((split * batch + n) * HEADS + h) * N + chunk
  tl.store(through_ptr + through.to(tl.int64) * K + kk,
           tl.sum(dh.to(tl.float32) * hs.to(tl.float32), axis=1))
  b_last = tl.load(b_ptr + ((row0 + C - 1) * HEADS + h) * K + kk)
  if tl.min(b_last, axis=0) >= -_FACTORED_RANGE:
    q = tl.load(q_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
    k = tl.load(k_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :]).to(dtype)
    v = tl.load(v_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    do = tl.load(do_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
    b = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])
    rel = tl.load(rel_ptr + rows)
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    # Inter-chunk: h_{n+1} ∋ (k_j ⊙ e^{b_C − b_j}) v_jᵀ.
    k_decay = tl.where(rel[:, None] == rel_last, tl.exp(b_last[None, :] - b), 0.0)
    dk_state = k_decay * tl.dot(v, tl.trans(dh.to(dtype)), input_precision=PRECISION)
    dv = tl.dot((k.to(tl.float32) * k_decay).to(dtype), dh.to(dtype),
                input_precision=PRECISION)
    # Intra-chunk: (q_i e^{b_i}) · (k_j e^{−b_j}); dk from the pairs j < i.
    pairs = (i[:, None] >= i[None, :]) & (rel[:, None] == rel[None, :])
    q_decayed = (q.to(tl.float32) * tl.exp(b)).to(dtype)
    k_grown = (k.to(tl.float32) * tl.exp(-b)).to(dtype)
    scores = tl.where(pairs, tl.dot(q_decayed, tl.trans(k_grown), input_precision=PRECISION),
                      0.0)
    d_scores = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION)
    d_scores = tl.where(pairs & (i[:, None] > i[None, :]), d_scores, 0.0).to(dtype)
    dk = tl.exp(-b) * tl.dot(tl.trans(d_scores), q_decayed, input_precision=PRECISION)
    dv += tl.dot(tl.trans((scale * scores).to(dtype)), do, input_precision=PRECISION)
    q, k = q.to(tl.float32), k.to(tl.float32)
    own = scale * tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=1)
    part = (split * batch + n).to(tl.int64) * seq + chunk * C + i
    per_head = (part[:, None] * HEADS + h) * K + kk[None, :]
    tl.store(db_ptr + per_head, tl.load(db_in_ptr + per_head) - k * dk)
    tl.store(dkeys_ptr + per_head, k * dk_state)
    tl.store(dk_ptr + per_head,
             (dk + dk_state + own[:, None] * q).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :],
             dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def _exact_kernel(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, h_ptr, dh_ptr, dq_in_ptr,
                  dk_in_ptr, dv_in_ptr, db_in_ptr, dkeys_in_ptr, batch, seq, scale, dq_ptr,
                  dk_ptr, dv_ptr, db_ptr, dkeys_ptr, HEADS: tl.constexpr,
                  KEY_HEADS: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                  PRECISION: tl.constexpr):
  """Stage "exact": dq, dk, dv, db, dkeys of a chunk too strongly decayed to factor, in
  row blocks of SUB, written over the first two stages' outputs (the *_in arguments,
  aliased; untouched for factored chunks). Per block: the state terms, the exact
  diagonal block, the block's queries against the chunk's earlier keys through r = b
  before the block, and its keys against the later queries through r = b at its end."""
  chunk, split, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h = batch_head // HEADS, batch_head % HEADS
  hk = h // (HEADS // KEY_HEADS)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  u = tl.arange(0, SUB)
  kk = tl.arange(0, K)
  vv = split * BV + tl.arange(0, BV)
  row0 = n.to(tl.int64) * seq + chunk * C
  rows = row0 + i
  b_last = tl.load(b_ptr + ((row0 + C - 1) * HEADS + h) * K + kk)
  if tl.min(b_last, axis=0) < -_FACTORED_RANGE:
    state = (((n * HEADS + h) * N + chunk).to(tl.int64) * K * V + kk[:, None] * V
             + vv[None, :])
    hs = tl.load(h_ptr + state).to(dtype)
    dh = tl.load(dh_ptr + state).to(dtype)
    rel = tl.load(rel_ptr + rows)
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    for start in tl.static_range(0, C, SUB):
      sub_rows = row0 + start + u
      q = tl.load(q_ptr + (sub_rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
      k = tl.load(k_ptr + (sub_rows[:, None] * KEY_HEADS + hk) * K + kk[None, :]).to(dtype)
      v = tl.load(v_ptr + (sub_rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
      do = tl.load(do_ptr + (sub_rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
      b = tl.load(b_ptr + (sub_rows[:, None] * HEADS + h) * K + kk[None, :])
      rel_sub = tl.load(rel_ptr + sub_rows)
      # The state terms, as in the factored stages.
      q_decay = tl.where(rel_sub[:, None] == 0, tl.exp(b), 0.0)
      dq = scale * q_decay * tl.dot(do, tl.trans(hs), input_precision=PRECISION)
      k_decay = tl.where(rel_sub[:, None] == rel_last, tl.exp(b_last[None, :] - b), 0.0)
      dk_state = k_decay * tl.dot(v, tl.trans(dh), input_precision=PRECISION)
      dv = tl.dot((k.to(tl.float32) * k_decay).to(dtype), dh, input_precision=PRECISION)
      # The block's own pairs, exactly.
      d_scores = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION)
      scores, dq_diag, dk = _diagonal_block(q, b, rel_sub, k_ptr, b_ptr, row0 + start,
                                            d_scores, hk, h, KEY_HEADS, HEADS, K, SUB, True)
      dq += dq_diag
      dv += tl.dot(tl.trans((scale * scores).to(dtype)), do, input_precision=PRECISION)
      if start > 0:  # the block's queries against the chunk's earlier keys
        k_all = tl.load(k_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
        b_all = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])
        v_all = tl.load(v_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
        r = tl.load(b_ptr + ((row0 + start - 1) * HEADS + h) * K + kk)
        q_factor = tl.exp(b - r[None, :])
        k_r = k_all.to(tl.float32) * tl.exp(tl.where(i[:, None] < start, r[None, :] - b_all,
                                                     -float("inf")))
        d_earlier = scale * tl.dot(do, tl.trans(v_all), input_precision=PRECISION)
        d_earlier = tl.where(rel_sub[:, None] == rel[None, :], d_earlier, 0.0)
        dq += q_factor * tl.dot(d_earlier.to(dtype), k_r.to(dtype), input_precision=PRECISION)
      if start + SUB < C:  # the block's keys against the chunk's later queries
        q_all = tl.load(q_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
        b_all = tl.load(b_ptr + (rows[:, None] * HEADS + h) * K + kk[None, :])
        do_all = tl.load(do_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :]).to(dtype)
        r = tl.load(b_ptr + ((row0 + start + SUB - 1) * HEADS + h) * K + kk)
        k_factor = tl.exp(r[None, :] - b)
        q_r = (q_all.to(tl.float32) * tl.exp(tl.where(i[:, None] >= start + SUB,
                                                      b_all - r[None, :], -float("inf")))
               ).to(dtype)
        same_run = rel[:, None] == rel_sub[None, :]  # [C, SUB]
        later = tl.dot(q_r, tl.trans((k.to(tl.float32) * k_factor).to(dtype)),
                       input_precision=PRECISION)
        later = tl.where(same_run, scale * later, 0.0)
        d_later = tl.dot(do_all, tl.trans(v), input_precision=PRECISION)
        d_later = tl.where(same_run, scale * d_later, 0.0)
        dv += tl.dot(tl.trans(later.to(dtype)), do_all, input_precision=PRECISION)
        dk += k_factor * tl.dot(tl.trans(d_later.to(dtype)), q_r, input_precision=PRECISION)
      q, k = q.to(tl.float32), k.to(tl.float32)
      own = scale * tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=1)
      part = (split * batch + n).to(tl.int64) * seq + chunk * C + start + u
      per_head = (part[:, None] * HEADS + h) * K + kk[None, :]
      tl.store(dq_ptr + per_head, (dq + own[:, None] * k).to(dq_ptr.dtype.element_ty))
      tl.store(db_ptr + per_head, q * dq - k * dk)
      tl.store(dkeys_ptr + per_head, k * dk_state)
      tl.store(dk_ptr + per_head,
               (dk + dk_state + own[:, None] * q).to(dk_ptr.dtype.element_ty))
      tl.store(dv_ptr + (sub_rows[:, None] * HEADS + h) * V + vv[None, :],
               dv.to(dv_ptr.dtype.element_ty))


def _gradient_call(q, k, v, do, b, rel, states, d_states, plan):
  """`triton._gradient_call` for b `[B, T, H, K]`, in `pallas_triton`'s three launches:
  "queries", "keys" (factored chunks) and "exact" over their outputs. d_b and d_keys are
  `[B, T, H, K]`."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  bv = plan.gradient_block_v
  splits = value_dim // bv
  partial = lambda shape, dtype: jax.ShapeDtypeStruct((splits,) + shape, dtype)
  # f32 when summed over value blocks or over the value heads that share a key head.
  sums = splits > 1 or heads != key_heads
  per_head = partial((batch, seq, heads, key_dim), jnp.float32 if sums
                     else storage_dtype(q.dtype))
  parts = partial(b.shape, jnp.float32)
  dv_shape = jax.ShapeDtypeStruct(v.shape, v.dtype)
  inputs = (q, k, v, do, b, rel, states, d_states)

  def launch(kernel, stage, *more, out_shape, **kwargs):
    return triton_call(
        kernel, *inputs, *more, batch, seq, np.float32(plan.scale), out_shape=out_shape,
        grid=(plan.chunks, splits, batch * heads), interpret=plan.interpret,
        num_warps=plan.gradient_num_warps, num_stages=plan.num_stages,
        name="linear_attention_vector_gradients_" + stage, HEADS=heads,
        KEY_HEADS=key_heads, N=plan.chunks, K=key_dim, V=value_dim, BV=bv, C=plan.chunk,
        PRECISION=dot_precision(q.dtype), **kwargs)

  dq, d_b = launch(_queries_kernel, "queries", out_shape=[per_head, parts])
  dk, dv, d_b, d_keys, through = launch(
      _keys_kernel, "keys", d_b, out_shape=[per_head, dv_shape, parts, parts,
                                            partial((batch, heads, plan.chunks, key_dim),
                                                    jnp.float32)],
      input_output_aliases={len(inputs): 2})
  dq, dk, dv, d_b, d_keys = launch(
      _exact_kernel, "exact", dq, dk, dv, d_b, d_keys,
      out_shape=[per_head, per_head, dv_shape, parts, parts],
      input_output_aliases={len(inputs) + i: i for i in range(5)}, SUB=plan.sub)
  return (dq.sum(0), dk.sum(0), dv, d_b.sum(0), d_keys.sum(0), through.sum(0))


@triton.jit
def _decay_gradient_kernel(db_ptr, dkeys_ptr, through_ptr, b_ptr, rel_ptr, reset_ptr, seq,
                           dg_ptr, HEADS: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                           C: tl.constexpr):
  """dL/dg_t `[K]` over one chunk (`pallas_triton_gradients._decay_gradient_kernel`'s
  vector form):

    inner_t = Σ_{u ≥ t in t's run} db_u                        (0 at a reset token)
    outer_t = Σ_{u < t} dkeys_u (u in the last run) + e^{b_C} ⊙ through   (t in the
              last run, not a reset token; the second term only if the chunk has no reset)

  With prefix sums S = cumsum(db): inner_t = E_t − S_t + db_t, E_t the sum up to the end
  of t's run: the chunk's total without a reset, else a `[C, C]` masked matmul (IEEE f32).
  """
  chunk, h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  row0 = n.to(tl.int64) * seq + chunk * C
  rows = row0 + i
  at = (rows[:, None] * HEADS + h) * K + kk[None, :]
  db = tl.load(db_ptr + at)
  dkeys = tl.load(dkeys_ptr + at)
  rel = tl.load(rel_ptr + rows)
  kept = tl.load(reset_ptr + rows)[:, None] == 0  # not a reset token
  rel_last = tl.load(rel_ptr + row0 + C - 1)
  b_last = tl.load(b_ptr + ((row0 + C - 1) * HEADS + h) * K + kk)
  through = tl.load(through_ptr + ((n * HEADS + h) * N + chunk).to(tl.int64) * K + kk)
  through = tl.where(rel_last == 0, tl.exp(b_last) * through, 0.0)
  last_run = rel[:, None] == rel_last
  keys = tl.where(last_run, dkeys, 0.0)
  outer = tl.where(last_run & kept, tl.cumsum(keys, axis=0) - keys + through[None, :], 0.0)
  if rel_last == 0:
    run_end = tl.zeros([C, K], tl.float32) + tl.sum(db, axis=0)[None, :]
  else:
    up_to_run = tl.where(rel[None, :] <= rel[:, None], 1.0, 0.0)  # [t, u]
    run_end = tl.dot(up_to_run, db, input_precision="ieee")
  inner = tl.where(kept, run_end - tl.cumsum(db, axis=0) + db, 0.0)
  tl.store(dg_ptr + at, inner + outer)


def _decay_gradient_call(b, rel, resets, d_b, d_keys, through, plan):
  """`pallas_triton_gradients.log_decay_gradient` for a vector gate: b, d_b, d_keys
  `[B, T, H, K]`,
  rel, resets `[B, T]`, through `[B, H, N, K]`; dL/dg `[B, T, H, K]` f32."""
  batch, seq, heads, key_dim = b.shape
  return triton_call(
      _decay_gradient_kernel, d_b, d_keys, through, b, rel, resets.astype(jnp.int32), seq,
      out_shape=jax.ShapeDtypeStruct(b.shape, jnp.float32),
      grid=(plan.chunks, heads, batch), interpret=plan.interpret, num_warps=plan.num_warps,
      num_stages=plan.num_stages, name="linear_attention_vector_decay_gradient",
      HEADS=heads, N=plan.chunks, K=key_dim, C=plan.chunk)


def _chunk_cumsum_call(g, plan):
  """b: the cumulative sum of g `[B, T, H, K]` (T whole chunks) inside each chunk, by
  `_chunk_cumsum_kernel` (`pallas_triton._chunk_cumsum`'s job, without Pallas)."""
  batch, seq, heads, key_dim = g.shape
  return triton_call(
      _chunk_cumsum_kernel, g, seq, out_shape=jax.ShapeDtypeStruct(g.shape, jnp.float32),
      grid=(plan.chunks, heads, batch), interpret=plan.interpret, num_warps=plan.num_warps,
      num_stages=plan.num_stages, name="linear_attention_chunk_cumsum", HEADS=heads,
      K=key_dim, C=plan.chunk)


LAUNCHES = chunked_plan.Launches(output=_fused_output_call, state=_state_call,
                                 gradients=_gradient_call,
                                 decay_gradient=_decay_gradient_call,
                                 chunk_cumsum=_chunk_cumsum_call)
