"""Chunked causal linear attention with a vector gate (GLA) in the Triton language.

The vector-gate parts of `triton`'s kernels, written in Triton (read `pallas_triton`'s
module docstring for the algorithm; `triton`'s for the launch scheme and what the two
gates share). Per value head, with b_i `[K]` the cumulative log decay inside a chunk and
h_n the state entering chunk n,

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

Here (the forward and the state passes are `triton`'s kernels, which call the first two):

  * `factored_chunk_output`, `exact_chunk_output`: o of one chunk, either form.
  * `_chunk_cumsum_kernel`: b, the cumulative log decay inside each chunk (instead of
    `pallas_triton._chunk_cumsum`, a Pallas kernel: no Pallas kernel runs on this path).
  * `_queries_kernel`, `_keys_kernel`, `_exact_kernel`: the gradients of one chunk in
    `pallas_triton_gradients._gradient_kernel`'s stages "queries" and "keys" (factored
    chunks, split so that each program holds fewer `[C, K]` f32 tiles) and "exact" (the
    chunks left unfactored, over the first two launches' outputs, aliased).
  * `decay_gradient_kernel`: dL/dg from the gradient kernels' parts, per chunk.

Precision as in `pallas_triton`: dot operands in the inputs' dtype (f32 inputs: IEEE f32
dots), f32 accumulation and carried state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels.linear_attention.triton_tiles import (
    FACTORED_RANGE, gate_row, gate_rows, gradient_inputs, gradient_outputs, gradient_program,
    key_decay, launch, launch_gradients, offsets, pairs, state_offsets, sum_value_blocks,
    through_offsets, value_block_rows)


@triton.jit
def _chunk_cumsum_kernel(g_ptr, seq, b_ptr, HEADS: tl.constexpr, K: tl.constexpr,
                         C: tl.constexpr):
  """b = the cumulative sum of g `[B, T, H, K]` f32 over one chunk's rows; T = seq."""
  chunk, h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  rows = n.to(tl.int64) * seq + chunk * C + tl.arange(0, C)
  at = offsets(rows, h, tl.arange(0, K), HEADS, K)
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
  mask = pairs(rel, SUB)
  q = q.to(tl.float32)
  if GRADIENTS:
    d_scores = tl.where(mask & (i[:, None] > i[None, :]), d_scores, 0.0)
  scores = tl.zeros([SUB, SUB], tl.float32)
  dq = tl.zeros([SUB, K], tl.float32)
  dk = tl.zeros([SUB, K], tl.float32)
  for j in range(0, SUB):
    k_j = tl.load(k_ptr + ((row0 + j) * KEY_HEADS + hk) * K + kk).to(tl.float32)
    b_j = gate_row(b_ptr, row0 + j, h, kk, HEADS, K, True)
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
def factored_chunk_output(q_ptr, o_ptr, k, v, b, rel, s, rows, hk, h, vv, scale,
                          HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, K: tl.constexpr,
                          V: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
  """Writes o of a factored chunk: (q_i e^{b_i}) · (k_j e^{−b_j}), the key factor ≤ e^60,
  as one `[C, C]` score tile; k, v, b `[C, ·]` and rel `[C]` of the chunk's `rows`."""
  dtype = q_ptr.dtype.element_ty
  q = tl.load(q_ptr + offsets(rows, hk, tl.arange(0, K), KEY_HEADS, K))
  q_decayed = q.to(tl.float32) * tl.exp(b)
  k_grown = (k.to(tl.float32) * tl.exp(-b)).to(dtype)
  scores = tl.where(pairs(rel, C), tl.dot(q_decayed.to(dtype), tl.trans(k_grown),
                                          input_precision=PRECISION), 0.0)
  # Tokens still in the run that entered the chunk read the carried state.
  out = tl.dot(tl.where(rel[:, None] == 0, q_decayed, 0.0).to(dtype), s.to(dtype),
               input_precision=PRECISION)
  out += tl.dot(scores.to(dtype), v, input_precision=PRECISION)
  tl.store(o_ptr + offsets(rows, h, vv, HEADS, V), (scale * out).to(o_ptr.dtype.element_ty))


@triton.jit
def exact_chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, o_ptr, k, v, b, rel, s, row0, hk,
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
    q = tl.load(q_ptr + offsets(rows, hk, kk, KEY_HEADS, K))
    b_sub = gate_rows(b_ptr, rows, h, kk, HEADS, K, True)
    rel_sub = tl.load(rel_ptr + rows)
    q_decayed = tl.where(rel_sub[:, None] == 0, q.to(tl.float32) * tl.exp(b_sub), 0.0)
    out = tl.dot(q_decayed.to(dtype), s.to(dtype), input_precision=PRECISION)
    scores, _, _ = _diagonal_block(q, b_sub, rel_sub, k_ptr, b_ptr, row0 + start,
                                   tl.zeros([SUB, SUB], tl.float32), hk, h, KEY_HEADS,
                                   HEADS, K, SUB, False)
    v_sub = tl.load(v_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
    out += tl.dot(scores.to(dtype), v_sub, input_precision=PRECISION)
    if start > 0:
      r = gate_row(b_ptr, row0 + start - 1, h, kk, HEADS, K, True)
      q_factor = tl.exp(b_sub - r[None, :])
      k_r = k.to(tl.float32) * tl.exp(tl.where(i[:, None] < start, r[None, :] - b,
                                               -float("inf")))
      scores = tl.dot((q.to(tl.float32) * q_factor).to(dtype), tl.trans(k_r.to(dtype)),
                      input_precision=PRECISION)
      scores = tl.where(rel_sub[:, None] == rel[None, :], scores, 0.0)
      out += tl.dot(scores.to(dtype), v, input_precision=PRECISION)
    tl.store(o_ptr + offsets(rows, h, vv, HEADS, V), (scale * out).to(o_ptr.dtype.element_ty))


@triton.jit
def _queries_kernel(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, h_ptr, dh_ptr, batch, seq,
                    scale, dq_ptr, db_ptr, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr,
                    N: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, PRECISION: tl.constexpr):
  """Stage "queries", factored chunks: dq and q ⊙ dq (the queries' part of db, without
  the pair (i, i)) of one chunk and value block. Layouts as `triton._gradient_kernel`'s,
  db `[S, B, T, H, K]`."""
  chunk, split, n, h, hk, vv, row0 = gradient_program(seq, HEADS, KEY_HEADS, BV, C)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  rows = row0 + i
  b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, True)
  if tl.min(b_last, axis=0) >= -FACTORED_RANGE:
    q, k, v, do, b, rel = gradient_inputs(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, rows,
                                          hk, h, vv, HEADS, KEY_HEADS, K, V, True)
    hs = tl.load(h_ptr + state_offsets(n, h, chunk, kk, vv, HEADS, N, K, V))
    # Inter-chunk: o_i ∋ scale (q_i ⊙ e^{b_i})ᵀ h_n.
    q_decay = tl.where(rel[:, None] == 0, tl.exp(b), 0.0)
    dq = scale * q_decay * tl.dot(do, tl.trans(hs.to(dtype)), input_precision=PRECISION)
    # Intra-chunk, pairs j < i: (q_i e^{b_i}) · (k_j e^{−b_j}).
    earlier = (i[:, None] > i[None, :]) & (rel[:, None] == rel[None, :])
    d_scores = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION)
    d_scores = tl.where(earlier, d_scores, 0.0).to(dtype)
    k_grown = (k.to(tl.float32) * tl.exp(-b)).to(dtype)
    dq += tl.exp(b) * tl.dot(d_scores, k_grown, input_precision=PRECISION)
    own = scale * tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=1)
    part = value_block_rows(split, batch, n, seq, chunk * C) + i  # rows of [S, B, T]
    per_head = offsets(part, h, kk, HEADS, K)
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
  chunk, split, n, h, hk, vv, row0 = gradient_program(seq, HEADS, KEY_HEADS, BV, C)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  rows = row0 + i
  state = state_offsets(n, h, chunk, kk, vv, HEADS, N, K, V)
  hs = tl.load(h_ptr + state)
  dh = tl.load(dh_ptr + state)
  tl.store(through_ptr + through_offsets(split * batch + n, h, chunk, kk, HEADS, N, K),
           tl.sum(dh.to(tl.float32) * hs.to(tl.float32), axis=1))
  b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, True)
  if tl.min(b_last, axis=0) >= -FACTORED_RANGE:
    q, k, v, do, b, rel = gradient_inputs(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, rows,
                                          hk, h, vv, HEADS, KEY_HEADS, K, V, True)
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    # Inter-chunk: h_{n+1} ∋ (k_j ⊙ e^{b_C − b_j}) v_jᵀ.
    k_decay = key_decay(b, b_last, rel, rel_last)
    dk_state = k_decay * tl.dot(v, tl.trans(dh.to(dtype)), input_precision=PRECISION)
    dv = tl.dot((k.to(tl.float32) * k_decay).to(dtype), dh.to(dtype),
                input_precision=PRECISION)
    # Intra-chunk: (q_i e^{b_i}) · (k_j e^{−b_j}); dk from the pairs j < i.
    reach = pairs(rel, C)
    q_decayed = (q.to(tl.float32) * tl.exp(b)).to(dtype)
    k_grown = (k.to(tl.float32) * tl.exp(-b)).to(dtype)
    scores = tl.where(reach, tl.dot(q_decayed, tl.trans(k_grown), input_precision=PRECISION),
                      0.0)
    d_scores = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION)
    d_scores = tl.where(reach & (i[:, None] > i[None, :]), d_scores, 0.0).to(dtype)
    dk = tl.exp(-b) * tl.dot(tl.trans(d_scores), q_decayed, input_precision=PRECISION)
    dv += tl.dot(tl.trans((scale * scores).to(dtype)), do, input_precision=PRECISION)
    q, k = q.to(tl.float32), k.to(tl.float32)
    own = scale * tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=1)
    part = value_block_rows(split, batch, n, seq, chunk * C) + i
    per_head = offsets(part, h, kk, HEADS, K)
    tl.store(db_ptr + per_head, tl.load(db_in_ptr + per_head) - k * dk)
    tl.store(dkeys_ptr + per_head, k * dk_state)
    tl.store(dk_ptr + per_head,
             (dk + dk_state + own[:, None] * q).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + offsets(rows, h, vv, HEADS, V), dv.to(dv_ptr.dtype.element_ty))


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
  chunk, split, n, h, hk, vv, row0 = gradient_program(seq, HEADS, KEY_HEADS, BV, C)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  u = tl.arange(0, SUB)
  kk = tl.arange(0, K)
  rows = row0 + i
  b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, True)
  if tl.min(b_last, axis=0) < -FACTORED_RANGE:
    state = state_offsets(n, h, chunk, kk, vv, HEADS, N, K, V)
    hs = tl.load(h_ptr + state).to(dtype)
    dh = tl.load(dh_ptr + state).to(dtype)
    rel = tl.load(rel_ptr + rows)
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    for start in tl.static_range(0, C, SUB):
      sub_rows = row0 + start + u
      q, k, v, do, b, rel_sub = gradient_inputs(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr,
                                                sub_rows, hk, h, vv, HEADS, KEY_HEADS, K, V,
                                                True)
      # The state terms, as in the factored stages.
      q_decay = tl.where(rel_sub[:, None] == 0, tl.exp(b), 0.0)
      dq = scale * q_decay * tl.dot(do, tl.trans(hs), input_precision=PRECISION)
      k_decay = key_decay(b, b_last, rel_sub, rel_last)
      dk_state = k_decay * tl.dot(v, tl.trans(dh), input_precision=PRECISION)
      dv = tl.dot((k.to(tl.float32) * k_decay).to(dtype), dh, input_precision=PRECISION)
      # The block's own pairs, exactly.
      d_scores = scale * tl.dot(do, tl.trans(v), input_precision=PRECISION)
      scores, dq_diag, dk = _diagonal_block(q, b, rel_sub, k_ptr, b_ptr, row0 + start,
                                            d_scores, hk, h, KEY_HEADS, HEADS, K, SUB, True)
      dq += dq_diag
      dv += tl.dot(tl.trans((scale * scores).to(dtype)), do, input_precision=PRECISION)
      if start > 0:  # the block's queries against the chunk's earlier keys
        k_all = tl.load(k_ptr + offsets(rows, hk, kk, KEY_HEADS, K))
        b_all = gate_rows(b_ptr, rows, h, kk, HEADS, K, True)
        v_all = tl.load(v_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
        r = gate_row(b_ptr, row0 + start - 1, h, kk, HEADS, K, True)
        q_factor = tl.exp(b - r[None, :])
        k_r = k_all.to(tl.float32) * tl.exp(tl.where(i[:, None] < start, r[None, :] - b_all,
                                                     -float("inf")))
        d_earlier = scale * tl.dot(do, tl.trans(v_all), input_precision=PRECISION)
        d_earlier = tl.where(rel_sub[:, None] == rel[None, :], d_earlier, 0.0)
        dq += q_factor * tl.dot(d_earlier.to(dtype), k_r.to(dtype), input_precision=PRECISION)
      if start + SUB < C:  # the block's keys against the chunk's later queries
        q_all = tl.load(q_ptr + offsets(rows, hk, kk, KEY_HEADS, K))
        b_all = gate_rows(b_ptr, rows, h, kk, HEADS, K, True)
        do_all = tl.load(do_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
        r = gate_row(b_ptr, row0 + start + SUB - 1, h, kk, HEADS, K, True)
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
      part = value_block_rows(split, batch, n, seq, chunk * C) + start + u
      per_head = offsets(part, h, kk, HEADS, K)
      tl.store(dq_ptr + per_head, (dq + own[:, None] * k).to(dq_ptr.dtype.element_ty))
      tl.store(db_ptr + per_head, q * dq - k * dk)
      tl.store(dkeys_ptr + per_head, k * dk_state)
      tl.store(dk_ptr + per_head,
               (dk + dk_state + own[:, None] * q).to(dk_ptr.dtype.element_ty))
      tl.store(dv_ptr + offsets(sub_rows, h, vv, HEADS, V), dv.to(dv_ptr.dtype.element_ty))


def gradient_call(q, k, v, do, b, rel, states, d_states, plan):
  """`chunked_plan.Launches.gradients` for b `[B, T, H, K]`, in `pallas_triton`'s three
  launches: "queries", "keys" (factored chunks) and "exact" over their outputs. d_b and
  d_keys are `[B, T, H, K]`."""
  per_head, dv, parts, through = gradient_outputs(q, v, b, plan)
  inputs = (q, k, v, do, b, rel, states, d_states)
  dq, d_b = launch_gradients(plan, _queries_kernel, "gradients_queries", *inputs,
                             out_shape=[per_head, parts])
  dk, dv, d_b, d_keys, through = launch_gradients(
      plan, _keys_kernel, "gradients_keys", *inputs, d_b,
      out_shape=[per_head, dv, parts, parts, through],
      input_output_aliases={len(inputs): 2})
  dq, dk, dv, d_b, d_keys = launch_gradients(
      plan, _exact_kernel, "gradients_exact", *inputs, dq, dk, dv, d_b, d_keys,
      out_shape=[per_head, per_head, dv, parts, parts],
      input_output_aliases={len(inputs) + i: i for i in range(5)}, SUB=plan.sub)
  return sum_value_blocks(dq, dk, dv, d_b, d_keys, through)


@triton.jit
def decay_gradient_kernel(db_ptr, dkeys_ptr, through_ptr, b_ptr, rel_ptr, reset_ptr, seq,
                          dg_ptr, HEADS: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                          C: tl.constexpr):
  """dL/dg_t `[K]` over one chunk (`pallas_triton_gradients._decay_gradient_kernel`'s
  vector form; the launch is `triton`'s, the scalar form beside it):

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
  at = offsets(rows, h, kk, HEADS, K)
  db = tl.load(db_ptr + at)
  dkeys = tl.load(dkeys_ptr + at)
  rel = tl.load(rel_ptr + rows)
  kept = tl.load(reset_ptr + rows)[:, None] == 0  # not a reset token
  rel_last = tl.load(rel_ptr + row0 + C - 1)
  b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, True)
  through = tl.load(through_ptr + through_offsets(n, h, chunk, kk, HEADS, N, K))
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


def chunk_cumsum_call(g, plan):
  """`chunked_plan.Launches.chunk_cumsum`: b, the cumulative sum of g `[B, T, H, K]` (T
  whole chunks) inside each chunk, by `_chunk_cumsum_kernel` (`pallas_triton._chunk_cumsum`'s
  job, without Pallas)."""
  batch, seq, heads, key_dim = g.shape
  return launch(plan, _chunk_cumsum_kernel, g, seq,
                out_shape=jax.ShapeDtypeStruct(g.shape, jnp.float32),
                grid=(plan.chunks, heads, batch), name="linear_attention_chunk_cumsum",
                HEADS=heads, K=key_dim, C=plan.chunk)
