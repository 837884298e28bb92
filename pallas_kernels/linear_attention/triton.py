"""Chunked causal linear attention in the Triton language (`@triton.jit`), with its VJP.

The algorithm and notation are `pallas_triton`'s (read its module docstring): per value
head the state S_t = a_t S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t, cut into chunks of C
tokens; b_i is the cumulative log decay inside a chunk, h_n the state entering chunk n,

  o_i     = scale · [ Σ_{j≤i} e^{b_i − b_j} (q_i · k_j) v_j + e^{b_i} q_iᵀ h_n ]
  h_{n+1} = e^{b_C} h_n + Σ_j e^{b_C − b_j} k_j v_jᵀ,

with resets as masks (`rel`, the resets so far inside the chunk: token i reads h_n only
while rel_i = 0, key j feeds h_{n+1} only from the chunk's last run, h passes a chunk only
if it holds no reset, pairs interact only within one run).

This file holds the entry point, the kernels of both gates' forward and state passes
(b `[C, K]` for the vector gate, `[C, 1]` for a scalar one, so that `triton_tiles`'
expressions serve both), the scalar gate's gradient kernels (fixed decay and "no decay"
broadcast to it), where every exponent above is ≤ 0, and every launch but the vector
gate's gradients. The vector gate (GLA) is `triton_vector`'s: its chunk outputs (factored
or exact), gradient stages and decay gradient. The kernels are `pallas_triton`'s written
in Triton, composed by `chunked_plan.forward` and `backward` (shared with `pallas_triton`
and `pallas_mosaic_gpu`) through `LAUNCHES`:

  * `_fused_output_kernel`: one program per (value block, sequence piece, batch × head)
    walks the piece's chunks in order with h `[K, BV]` on chip (f32) and writes o, so the
    chunk states never touch memory (Lightning Attention-2's one-pass forward).
  * `_state_kernel`: one program per (state tile, piece, batch × head) walks the chunks,
    storing each h_n and the piece's end state; in reverse over q and dO it gives dh_n.
    It also gives the piece starts (P > 1), chained by `chunked_plan.piece_starts`.
  * `_gradient_kernel`: one program per (chunk, value block, batch × head) gives dq,
    dk, dv of the chunk from h_n and dh_n, and the decay gradient's parts: db = q ⊙ dq −
    k ⊙ dk (pairs inside the chunk and with h_n), dkeys = k ⊙ dk (pairs with the state
    leaving it), each summed over K, and through = Σ_v dh_n ⊙ h_n `[K]`.
  * `_decay_gradient_kernel`: one program per (chunk, head, batch) sums those parts into
    dL/dg_t, no sum running past the chunk (see
    `pallas_triton_gradients.log_decay_gradient`).

The kernels are launched by `pallas_kernels.triton_call` — jax_triton on a GPU, Triton's
interpreter on CPU — and replace the Pallas Triton lowering that JAX 0.11 deprecates
(issue 20). Shared with `pallas_triton` (`chunked_plan`): the plan, the padding and
cumulative decays, the piece scan and the composition of the forward and backward.

Precision as in `pallas_triton`: dot operands in the inputs' dtype (f32 inputs: IEEE f32
dots, not TF32), f32 accumulation, f32 carried state; the h_n and dh_n stored for the
backward in the inputs' dtype when it is 16-bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.linear_attention import chunked_plan, triton_vector
from pallas_kernels.linear_attention.chunked_plan import BlockSizes, storage_dtype
from pallas_kernels.linear_attention.triton_tiles import (
    FACTORED_RANGE, dot_precision, gate_row, gate_rows, gradient_outputs,
    gradient_program, heads_of, kernel_name, key_decay, launch, launch_gradients, offsets,
    pairs, state_offsets, state_step, sum_value_blocks, through_offsets)
from pallas_kernels.linear_attention.triton_vector import (exact_chunk_output,
                                                           factored_chunk_output)


@triton.jit
def _pair_decay(b, rel, C: tl.constexpr):
  """e^{b_i − b_j} `[C, C]` of a scalar gate (b `[C, 1]`) for the pairs j ≤ i of one run
  (≤ 1), else 0."""
  return tl.exp(tl.where(pairs(rel, C), b - tl.trans(b), -float("inf")))


@triton.jit
def _chunk_output(q_ptr, o_ptr, k, v, b, rel, s, rows, hk, h, vv, scale, HEADS: tl.constexpr,
                  KEY_HEADS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  C: tl.constexpr, PRECISION: tl.constexpr):
  """Writes o of one chunk of a scalar gate: k, v `[C, ·]`, b `[C, 1]` and rel `[C]` of
  the chunk's `rows`, s = h_n `[K, BV]` f32."""
  dtype = q_ptr.dtype.element_ty
  q = tl.load(q_ptr + offsets(rows, hk, tl.arange(0, K), KEY_HEADS, K))
  # Intra-chunk: pairs j ≤ i of one run, decay e^{b_i − b_j} ≤ 1.
  scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * _pair_decay(b, rel, C)
  # Inter-chunk: tokens still in the run that entered the chunk read h_n.
  q_decayed = tl.where(rel[:, None] == 0, q.to(tl.float32) * tl.exp(b), 0.0)
  out = tl.dot(q_decayed.to(dtype), s.to(dtype), input_precision=PRECISION)
  out += tl.dot(scores.to(dtype), v, input_precision=PRECISION)
  tl.store(o_ptr + offsets(rows, h, vv, HEADS, V), (scale * out).to(o_ptr.dtype.element_ty))


@triton.jit
def _fused_output_kernel(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, start_ptr, seq, chunks, scale,
                         o_ptr, end_ptr, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr,
                         PIECES: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BV: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                         VECTOR: tl.constexpr, PRECISION: tl.constexpr):
  """The forward of one sequence piece and one value block.

  q, k `[B, T, HK, K]`, v `[B, T, H, V]`, b `[B, T, H(, K)]` f32 (`[B, T, H, K]` if
  VECTOR), rel `[B, T]` i32, start `[B, H, P, K, V]` f32 (the state entering each piece);
  T = seq, P · chunks · C tokens. Writes o `[B, T, H, V]` and end `[B, H, P, K, V]`, the
  state leaving each piece. A vector gate's chunks are factored or exact (SUB-row blocks).
  """
  block_v, piece, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h, hk = heads_of(batch_head, HEADS, KEY_HEADS)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)  # rows of a chunk
  kk = tl.arange(0, K)
  vv = block_v * BV + tl.arange(0, BV)
  state = state_offsets(n, h, piece, kk, vv, HEADS, PIECES, K, V)
  s = tl.load(start_ptr + state)  # h [K, BV], f32, carried over the chunks

  for t in range(0, chunks):
    row0 = n.to(tl.int64) * seq + (piece * chunks + t) * C  # first row of the chunk
    rows = row0 + i
    k = tl.load(k_ptr + offsets(rows, hk, kk, KEY_HEADS, K)).to(dtype)
    v = tl.load(v_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
    b = gate_rows(b_ptr, rows, h, kk, HEADS, K, VECTOR)  # [C, K|1] f32
    b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, VECTOR)
    rel = tl.load(rel_ptr + rows)  # [C] i32
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    # The branches are helpers: Triton's if/else needs the names both define to agree
    # in type, and the exact blocks' tiles are [SUB, ·] where the others are [C, ·].
    if VECTOR:
      if tl.min(b_last, axis=0) >= -FACTORED_RANGE:
        factored_chunk_output(q_ptr, o_ptr, k, v, b, rel, s, rows, hk, h, vv, scale, HEADS,
                              KEY_HEADS, K, V, C, PRECISION)
      else:
        exact_chunk_output(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, o_ptr, k, v, b, rel, s, row0,
                           hk, h, vv, scale, HEADS, KEY_HEADS, K, V, C, SUB, PRECISION)
    else:
      _chunk_output(q_ptr, o_ptr, k, v, b, rel, s, rows, hk, h, vv, scale, HEADS, KEY_HEADS,
                    K, V, C, PRECISION)
    # h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ over the chunk's last run.
    s = state_step(s, k, v, key_decay(b, b_last, rel, rel_last), b_last, rel_last, PRECISION)

  tl.store(end_ptr + state, s)


def _fused_output_call(q, k, v, b, rel, starts, plan):
  """Launches `_fused_output_kernel` over (value block, piece, batch × head); arguments
  and results as `chunked_plan.Launches.output`."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  return launch(
      plan, _fused_output_kernel, q, k, v, b, rel, starts, seq, plan.chunks_per_piece,
      np.float32(plan.scale),
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct(starts.shape, jnp.float32)],
      grid=(value_dim // plan.block_v, plan.pieces, batch * heads),
      name=kernel_name("fused_fwd", b.ndim == 4), HEADS=heads, KEY_HEADS=key_heads,
      PIECES=plan.pieces, K=key_dim, V=value_dim, BV=plan.block_v, C=plan.chunk,
      SUB=plan.sub, VECTOR=b.ndim == 4, PRECISION=dot_precision(q.dtype))


@triton.jit
def _state_kernel(x_ptr, y_ptr, b_ptr, rel_ptr, start_ptr, seq, chunks, scale, states_ptr,
                  end_ptr, HEADS: tl.constexpr, X_HEADS: tl.constexpr, PIECES: tl.constexpr,
                  N: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr,
                  WRITE_STATES: tl.constexpr, VECTOR: tl.constexpr,
                  PRECISION: tl.constexpr):
  """The chunk-state recurrence over one sequence piece, for one `[BK, BV]` state tile.

  Forward (x = k, y = v, chunks in order): stores h_n, then
    h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ   (j in the chunk's last run).
  Reverse (x = q, y = dO, chunks backwards): stores dh_n (w.r.t. the state leaving chunk
  n), then dh ← e^{b_C} ⊙ dh + scale Σ_i (q_i ⊙ e^{b_i}) dO_iᵀ (i before any reset).
  The decay factor is zero when the chunk holds a reset; with a vector gate the decays
  are per state row.

  x `[B, T, Hx, K]` (Hx divides H), y `[B, T, H, V]`, b `[B, T, H(, K)]` f32, rel
  `[B, T]` i32, start `[B, H, P, K, V]` f32; T = seq, P · chunks · C tokens. Writes
  states `[B, H, N, K, V]` (if WRITE_STATES) and end `[B, H, P, K, V]` f32.
  """
  tile, piece, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h, hx = heads_of(batch_head, HEADS, X_HEADS)
  dtype = x_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = (tile // (V // BV)) * BK + tl.arange(0, BK)
  vv = (tile % (V // BV)) * BV + tl.arange(0, BV)
  end = state_offsets(n, h, piece, kk, vv, HEADS, PIECES, K, V)
  s = tl.load(start_ptr + end)  # [BK, BV] f32, carried over the chunks

  for t in range(0, chunks):
    if REVERSE:
      j = piece * chunks + chunks - 1 - t
    else:
      j = piece * chunks + t
    if WRITE_STATES:
      tl.store(states_ptr + state_offsets(n, h, j, kk, vv, HEADS, N, K, V),
               s.to(states_ptr.dtype.element_ty))
    row0 = n.to(tl.int64) * seq + j * C
    rows = row0 + i
    x = tl.load(x_ptr + offsets(rows, hx, kk, X_HEADS, K))
    y = tl.load(y_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
    b = gate_rows(b_ptr, rows, h, kk, HEADS, K, VECTOR)
    b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, VECTOR)
    rel = tl.load(rel_ptr + rows)
    rel_last = tl.load(rel_ptr + row0 + C - 1)
    if REVERSE:
      weight = tl.where(rel[:, None] == 0, scale * tl.exp(b), 0.0)
    else:
      weight = key_decay(b, b_last, rel, rel_last)
    s = state_step(s, x, y, weight, b_last, rel_last, PRECISION)

  tl.store(end_ptr + end, s)


def _state_call(x, y, b, rel, start, plan, *, reverse, write_states):
  """Launches `_state_kernel` over (state tile, piece, batch × head); arguments and
  results as `chunked_plan.Launches.state`: ([h_n `[B, H, N, K, V]`,] ends
  `[B, H, P, K, V]`)."""
  batch, seq, x_heads, key_dim = x.shape
  heads, value_dim = y.shape[2:]
  ends = jax.ShapeDtypeStruct(start.shape, jnp.float32)
  # Without write_states the kernel's states pointer gets a one-element placeholder.
  states = jax.ShapeDtypeStruct(
      (batch, heads, plan.chunks, key_dim, value_dim) if write_states else (1,),
      storage_dtype(x.dtype))
  tiles = (key_dim // plan.block_k) * (value_dim // plan.block_v)
  states, ends = launch(
      plan, _state_kernel, x, y, b, rel, start, seq, plan.chunks_per_piece,
      np.float32(plan.scale), out_shape=[states, ends],
      grid=(tiles, plan.pieces, batch * heads),
      name=kernel_name("state_bwd" if reverse else "state_fwd", b.ndim == 4),
      HEADS=heads, X_HEADS=x_heads, PIECES=plan.pieces, N=plan.chunks, K=key_dim,
      V=value_dim, BK=plan.block_k, BV=plan.block_v, C=plan.chunk, REVERSE=reverse,
      WRITE_STATES=write_states, VECTOR=b.ndim == 4, PRECISION=dot_precision(x.dtype))
  return (states, ends) if write_states else (ends,)


@triton.jit
def _gradient_kernel(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, h_ptr, dh_ptr, batch, seq,
                     scale, dq_ptr, dk_ptr, dv_ptr, db_ptr, dkeys_ptr, through_ptr,
                     HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, N: tl.constexpr,
                     K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                     LOOP_V: tl.constexpr, PRECISION: tl.constexpr):
  """dq, dk, dv and the decay-gradient parts of one chunk, scalar gate, over all value
  columns (BV = V) in blocks of LOOP_V: each block's `[K, LOOP_V]` tiles of h_n and dh_n
  are loaded, used and dropped, so a program never holds a whole `[K, V]` state.

  q, k `[B, T, HK, K]`; v, do `[B, T, H, V]`; b `[B, T, H]` f32; rel `[B, T]` i32; h, dh
  `[B, H, N, K, V]`. Writes dq, dk `[1, B, T, H, K]`, db, dkeys `[1, B, T, H]`, dv
  `[B, T, H, V]`, through `[1, B, H, N, K]`.
  """
  chunk, _, n, h, hk, _, row0 = gradient_program(seq, HEADS, KEY_HEADS, BV, C)
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)
  kk = tl.arange(0, K)
  rows = row0 + i
  q = tl.load(q_ptr + offsets(rows, hk, kk, KEY_HEADS, K))
  k = tl.load(k_ptr + offsets(rows, hk, kk, KEY_HEADS, K)).to(dtype)
  b = gate_rows(b_ptr, rows, h, kk, HEADS, K, False)  # [C, 1]
  rel = tl.load(rel_ptr + rows)
  b_last = gate_row(b_ptr, row0 + C - 1, h, kk, HEADS, K, False)  # [1]
  rel_last = tl.load(rel_ptr + row0 + C - 1)
  q_decay = tl.where(rel[:, None] == 0, tl.exp(b), 0.0)
  k_decay = key_decay(b, b_last, rel, rel_last)
  k_state = (k.to(tl.float32) * k_decay).to(dtype)
  decay = _pair_decay(b, rel, C)
  # scale e^{b_i − b_j} (q_i · k_j), transposed: dv_j ∋ Σ_i of it times dO_i.
  scores_t = tl.trans((scale * tl.dot(q, tl.trans(k), input_precision=PRECISION)
                       * decay).to(dtype))

  # Inter-chunk: o_i ∋ scale (q_i e^{b_i})ᵀ h_n and h_{n+1} ∋ (k_j e^{b_C − b_j}) v_jᵀ;
  # intra-chunk: o_i ∋ scale Σ_{j≤i} e^{b_i − b_j} (q_i · k_j) v_j.
  dq = tl.zeros((C, K), tl.float32)  # Σ over value blocks of dO h_nᵀ
  dk_state = tl.zeros((C, K), tl.float32)  # of v dh_nᵀ
  d_scores = tl.zeros((C, C), tl.float32)  # of dO vᵀ
  own = tl.zeros((C,), tl.float32)  # of dO_i · v_i
  through = tl.zeros((K,), tl.float32)  # of Σ_v dh ⊙ h_n
  for block in range(0, V // LOOP_V):
    vv = block * LOOP_V + tl.arange(0, LOOP_V)
    v = tl.load(v_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
    do = tl.load(do_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
    state = state_offsets(n, h, chunk, kk, vv, HEADS, N, K, V)
    hs = tl.load(h_ptr + state).to(dtype)  # h_n [K, LOOP_V]
    dh = tl.load(dh_ptr + state).to(dtype)  # dh_n [K, LOOP_V]
    dq += tl.dot(do, tl.trans(hs), input_precision=PRECISION)
    dk_state += tl.dot(v, tl.trans(dh), input_precision=PRECISION)
    d_scores += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    dv = tl.dot(k_state, dh, input_precision=PRECISION)
    dv += tl.dot(scores_t, do, input_precision=PRECISION)
    tl.store(dv_ptr + offsets(rows, h, vv, HEADS, V), dv.to(dv_ptr.dtype.element_ty))
    own += tl.sum(do.to(tl.float32) * v.to(tl.float32), axis=1)
    through += tl.sum(dh.to(tl.float32) * hs.to(tl.float32), axis=1)

  # The pair (i, i) goes to dq and dk below (`own`), not through the decay gradient's
  # parts.
  dq = scale * q_decay * dq
  dk_state = k_decay * dk_state
  d_scores = tl.where(pairs(rel, C) & (i[:, None] > i[None, :]), scale * d_scores * decay,
                      0.0).to(dtype)
  dq += tl.dot(d_scores, k, input_precision=PRECISION)
  dk = tl.dot(tl.trans(d_scores), q, input_precision=PRECISION)
  q, k = q.to(tl.float32), k.to(tl.float32)
  own = scale * own
  per_head = offsets(rows, h, kk, HEADS, K)  # value block 0 of [1, B, T]: rows themselves
  tl.store(dq_ptr + per_head, (dq + own[:, None] * k).to(dq_ptr.dtype.element_ty))
  tl.store(dk_ptr + per_head,
           (dk + dk_state + own[:, None] * q).to(dk_ptr.dtype.element_ty))
  tl.store(db_ptr + rows * HEADS + h, tl.sum(q * dq - k * dk, axis=1))
  tl.store(dkeys_ptr + rows * HEADS + h, tl.sum(k * dk_state, axis=1))
  tl.store(through_ptr + through_offsets(n, h, chunk, kk, HEADS, N, K), through)


def _gradient_call(q, k, v, do, b, rel, states, d_states, plan):
  """`chunked_plan.Launches.gradients`: dq, dk per value head `[B, T, H, K]`, dv, d_b,
  d_keys (like b) and through `[B, H, N, K]`; `_gradient_kernel` for a scalar gate (one
  program per chunk and head, looping over value blocks of `plan.gradient_block_v`),
  `triton_vector.gradient_call`'s three launches for a vector one."""
  if b.ndim == 4:
    return triton_vector.gradient_call(q, k, v, do, b, rel, states, d_states, plan)
  whole = dataclasses.replace(plan, gradient_block_v=v.shape[-1])  # one value block
  per_head, dv, parts, through = gradient_outputs(q, v, b, whole)
  return sum_value_blocks(*launch_gradients(
      whole, _gradient_kernel, "gradients", q, k, v, do, b, rel, states, d_states,
      out_shape=[per_head, per_head, dv, parts, parts, through],
      LOOP_V=plan.gradient_block_v))


@triton.jit
def _decay_gradient_kernel(db_ptr, dkeys_ptr, through_ptr, b_ptr, rel_ptr, reset_ptr, seq,
                           dg_ptr, HEADS: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                           C: tl.constexpr):
  """dL/dg_t over one chunk of a scalar gate from `_gradient_kernel`'s parts:

    inner_t = Σ_{u ≥ t in t's run} db_u                        (0 at a reset token)
    outer_t = Σ_{u < t in t's run} dkeys_u + e^{b_C} Σ_k through  (t in the chunk's last
              run, not a reset token; the last term only if the chunk holds no reset)

  With prefix sums S = cumsum(db): inner_t = E_t − S_t + db_t, E_t the sum up to the end
  of t's run (the chunk's total when it holds no reset, else a masked `[C, C]` row sum);
  outer's sum is an exclusive cumsum. No sum runs past the chunk.
  """
  chunk, h, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  i = tl.arange(0, C)
  row0 = n.to(tl.int64) * seq + chunk * C
  rows = row0 + i
  db = tl.load(db_ptr + rows * HEADS + h)
  rel = tl.load(rel_ptr + rows)
  kept = tl.load(reset_ptr + rows) == 0  # not a reset token
  rel_last = tl.load(rel_ptr + row0 + C - 1)
  last_run = rel == rel_last
  keys = tl.where(last_run, tl.load(dkeys_ptr + rows * HEADS + h), 0.0)
  b_last = tl.load(b_ptr + (row0 + C - 1) * HEADS + h)
  through = tl.load(through_ptr + through_offsets(n, h, chunk, tl.arange(0, K), HEADS, N, K))
  through = tl.where(rel_last == 0, tl.exp(b_last) * tl.sum(through, axis=0), 0.0)
  if rel_last == 0:
    run_end = tl.zeros((C,), tl.float32) + tl.sum(db, axis=0)
  else:
    run_end = tl.sum(tl.where(rel[None, :] <= rel[:, None], db[None, :], 0.0), axis=1)
  inner = run_end - tl.cumsum(db, axis=0) + db
  outer = tl.cumsum(keys, axis=0) - keys + through
  dg = tl.where(kept, inner, 0.0) + tl.where(kept & last_run, outer, 0.0)
  tl.store(dg_ptr + rows * HEADS + h, dg)


def _decay_gradient_call(b, rel, resets, d_b, d_keys, through, plan):
  """`chunked_plan.Launches.decay_gradient` over (chunk, head, batch): b, d_b, d_keys
  `[B, T, H(, K)]`, rel, resets `[B, T]`, through `[B, H, N, K]`; dL/dg like b, f32. The
  kernel is this module's for a scalar gate, `triton_vector`'s for a vector one."""
  batch, seq, heads = b.shape[:3]
  vector = b.ndim == 4
  kernel = triton_vector.decay_gradient_kernel if vector else _decay_gradient_kernel
  return launch(
      plan, kernel, d_b, d_keys, through, b, rel, resets.astype(jnp.int32), seq,
      out_shape=jax.ShapeDtypeStruct(b.shape, jnp.float32),
      grid=(plan.chunks, heads, batch), name=kernel_name("decay_gradient", vector),
      HEADS=heads, N=plan.chunks, K=through.shape[-1], C=plan.chunk)


LAUNCHES = chunked_plan.Launches(output=_fused_output_call, state=_state_call,
                                 gradients=_gradient_call,
                                 decay_gradient=_decay_gradient_call,
                                 chunk_cumsum=triton_vector.chunk_cumsum_call)


_linear_attention = chunked_plan.with_vjp(LAUNCHES)


def linear_attention(query, key, value, log_decay, initial_state, resets, *, scale: float,
                     chunk_size: int, interpret: bool = False,
                     block_sizes: BlockSizes | None = None):
  """Causal linear attention by the Triton-language kernels, with its VJP: the arguments,
  results and refusals of `pallas_triton.linear_attention` (its docstring), except that
  `interpret` runs Triton's interpreter (CPU)."""
  return chunked_plan.call_with_plan(
      _linear_attention, query, key, value, log_decay, initial_state, resets, scale,
      chunk_size, interpret, block_sizes,
      vector_chunk_cap=lambda key_dim: chunked_plan.VECTOR_16BIT_CHUNK,
      default_blocks=default_block_sizes)


# The scalar-gate gradient kernel, which loops over value blocks, at key and value dims
# 128 in 16-bit (H100, B 64, T 1k, H 16; docs/perf/runs/2026-12-07f-h100-triton-backward-profile.md):
# 1.77 ms at 32 columns per step, 8 warps, 3 stages; 1.97-2.21 at 64 columns and 8 warps;
# 4.0-5.0 at 128 columns (the shared default, a whole [K, V] state per step: spills).
_LOOPED_GRADIENT = {(128, 2): dict(gradient_block_v=32, gradient_num_warps=8,
                                   gradient_num_stages=3)}


def default_block_sizes(key_dim, value_dim, dtype, vector=False) -> BlockSizes:
  """`BlockSizes.get_default`, with the looped scalar-gate gradient kernel's own settings
  where measured (`_LOOPED_GRADIENT`)."""
  blocks = BlockSizes.get_default(key_dim, value_dim, dtype, vector)
  looped = _LOOPED_GRADIENT.get(chunked_plan.tuning_key(key_dim, value_dim, dtype))
  if vector or not looped:
    return blocks
  return dataclasses.replace(blocks, **looped)
