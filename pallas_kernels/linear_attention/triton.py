"""Chunked causal linear attention in the Triton language (`@triton.jit`), forward.

The algorithm and notation are `pallas_triton`'s (read its module docstring): per value
head the state S_t = a_t S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t, cut into chunks of C
tokens; b_i is the cumulative log decay inside a chunk, h_n the state entering chunk n,

  o_i     = scale · [ Σ_{j≤i} e^{b_i − b_j} (q_i · k_j) v_j + e^{b_i} q_iᵀ h_n ]
  h_{n+1} = e^{b_C} h_n + Σ_j e^{b_C − b_j} k_j v_jᵀ,

with resets as masks (`rel`, the resets so far inside the chunk: token i reads h_n only
while rel_i = 0, key j feeds h_{n+1} only from the chunk's last run, h passes a chunk only
if it holds no reset, pairs interact only within one run).

This file holds the scalar gate (fixed decay and "no decay" broadcast to it): every
exponent above is ≤ 0. `_fused_output_kernel` is `pallas_triton._fused_output_kernel`
written in Triton: one program per (value block, sequence piece, batch × head) walks the
piece's chunks in order with h `[K, BV]` on chip (f32) and writes o, so the chunk states
never touch memory (Lightning Attention-2's one-pass forward). The kernels are launched
by `pallas_kernels.triton_call` — jax_triton on a GPU, Triton's interpreter on CPU — and
replace the Pallas Triton lowering that JAX 0.11 deprecates.

Shared with `pallas_triton` for now (to move to a backend-neutral `common.py`): the plan
(`_make_plan`), the padding and cumulative decays (`_prepare`), and, for P > 1 pieces,
the piece starts (`_piece_starts`, still its Pallas state kernel).

Precision as in `pallas_triton`: dot operands in the inputs' dtype (f32 inputs: IEEE f32
dots, not TF32), f32 accumulation, f32 carried state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.linear_attention import pallas_triton
from pallas_kernels.triton_call import triton_call


@triton.jit
def _fused_output_kernel(q_ptr, k_ptr, v_ptr, b_ptr, rel_ptr, start_ptr, seq, chunks, scale,
                         o_ptr, end_ptr, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr,
                         PIECES: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BV: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
  """The forward of one sequence piece and one value block.

  q, k `[B, T, HK, K]`, v `[B, T, H, V]`, b `[B, T, H]` f32, rel `[B, T]` i32, start
  `[B, H, P, K, V]` f32 (the state entering each piece); T = seq, P · chunks · C tokens.
  Writes o `[B, T, H, V]` and end `[B, H, P, K, V]`, the state leaving each piece.
  """
  block_v, piece, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h = batch_head // HEADS, batch_head % HEADS
  hk = h // (HEADS // KEY_HEADS)  # the key head this value head reads
  dtype = q_ptr.dtype.element_ty
  i = tl.arange(0, C)  # rows of a chunk
  kk = tl.arange(0, K)
  vv = block_v * BV + tl.arange(0, BV)
  state = ((n * HEADS + h) * PIECES + piece).to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]
  s = tl.load(start_ptr + state)  # h [K, BV], f32, carried over the chunks

  for t in range(0, chunks):
    row0 = (n.to(tl.int64) * seq + (piece * chunks + t) * C)  # first row of the chunk
    rows = row0 + i
    q = tl.load(q_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
    k = tl.load(k_ptr + (rows[:, None] * KEY_HEADS + hk) * K + kk[None, :])
    v = tl.load(v_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :])
    b = tl.load(b_ptr + rows * HEADS + h)  # [C] f32
    rel = tl.load(rel_ptr + rows)  # [C] i32
    b_last = tl.load(b_ptr + (row0 + C - 1) * HEADS + h)
    rel_last = tl.load(rel_ptr + row0 + C - 1)

    # Intra-chunk: pairs j ≤ i of one run, decay e^{b_i − b_j} ≤ 1.
    pairs = (i[:, None] >= i[None, :]) & (rel[:, None] == rel[None, :])
    decay = tl.exp(tl.where(pairs, b[:, None] - b[None, :], -float("inf")))
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
    # Inter-chunk: tokens still in the run that entered the chunk read h_n.
    q_decayed = tl.where(rel[:, None] == 0, q.to(tl.float32) * tl.exp(b)[:, None], 0.0)
    out = tl.dot(q_decayed.to(dtype), s.to(dtype), input_precision=PRECISION)
    out += tl.dot(scores.to(dtype), v, input_precision=PRECISION)
    tl.store(o_ptr + (rows[:, None] * HEADS + h) * V + vv[None, :],
             (scale * out).to(o_ptr.dtype.element_ty))

    # h ← e^{b_C} h + Σ_j e^{b_C − b_j} k_j v_jᵀ over the chunk's last run.
    weight = tl.where(rel == rel_last, tl.exp(b_last - b), 0.0)
    keys = (k.to(tl.float32) * weight[:, None]).to(dtype)
    carry = tl.where(rel_last == 0, tl.exp(b_last), 0.0)
    s = carry * s + tl.dot(tl.trans(keys), v, input_precision=PRECISION)

  tl.store(end_ptr + state, s)


def _fused_output_call(q, k, v, b, rel, starts, plan):
  """Launches `_fused_output_kernel` over (value block, piece, batch × head); arguments
  and results as `pallas_triton._fused_output_call`."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  precision = "ieee" if q.dtype == jnp.float32 else "tf32"  # tf32: ignored for 16-bit
  return triton_call(
      _fused_output_kernel, q, k, v, b, rel, starts, seq, plan.chunks_per_piece,
      np.float32(plan.scale),
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct(starts.shape, jnp.float32)],
      grid=(value_dim // plan.block_v, plan.pieces, batch * heads),
      interpret=plan.interpret, num_warps=plan.num_warps, num_stages=plan.num_stages,
      name="linear_attention_fused_fwd", HEADS=heads, KEY_HEADS=key_heads,
      PIECES=plan.pieces, K=key_dim, V=value_dim, BV=plan.block_v, C=plan.chunk,
      PRECISION=precision)


def linear_attention_forward(query, key, value, log_decay, initial_state, resets, *,
                             scale: float, chunk_size: int, interpret: bool = False,
                             block_sizes: pallas_triton.BlockSizes | None = None):
  """Causal linear attention with a scalar gate, forward only, by the Triton kernels.

  Args:
    query, key: `[batch, seq, heads, key_dim]`.
    value: `[batch, seq, value_heads, value_dim]`, value_heads a multiple r of heads.
    log_decay: None (no decay), `[value_heads]` (fixed per head) or `[batch, seq,
      value_heads]` (scalar gate per token); float, ≤ 0.
    initial_state: `[batch, value_heads, key_dim, value_dim]`.
    resets: `[batch, seq]` bool: the state is zeroed before these tokens.
    scale: multiplies every output.
    chunk_size: tokens per chunk, a power of two (≥ 16 when compiled).
    interpret: run in Triton's interpreter (CPU).
    block_sizes: None for `pallas_triton.BlockSizes.get_default`.

  Returns:
    out `[batch, seq, value_heads, value_dim]` in the query's dtype and the final state
    `[batch, value_heads, key_dim, value_dim]` float32.

  Raises:
    NotImplementedError: a vector gate (not written yet), or what `pallas_triton`'s plan
      refuses (sizes that are not powers of two, below 16 when compiled; empty sequence).
  """
  batch, seq, key_heads, key_dim = key.shape
  heads, value_dim = value.shape[2:]
  g = pallas_triton.per_token_log_decay(log_decay, batch, seq, key_heads, heads, key_dim)
  if g.ndim == 4:
    raise NotImplementedError("log_decay of shape [batch, seq, heads, key_dim] (a vector "
                              "gate): the Triton-language kernels serve scalar gates so far.")
  plan = pallas_triton._make_plan(  # pylint: disable=protected-access
      batch, seq, heads, key_dim, value_dim, query.dtype, False, scale, chunk_size,
      block_sizes, interpret)
  q, k, v, b, rel, _, decay = pallas_triton._prepare(  # pylint: disable=protected-access
      query, key, value, g, resets.astype(bool), plan)
  h0 = initial_state.astype(jnp.float32)
  starts = pallas_triton._piece_starts(  # pylint: disable=protected-access
      k, v, b, rel, h0, decay, plan, reverse=False,
      state_call=pallas_triton._state_call)  # pylint: disable=protected-access
  out, ends = _fused_output_call(q, k, v, b, rel, starts, plan)
  return out[:, :seq], ends[:, :, -1]
