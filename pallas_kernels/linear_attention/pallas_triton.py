"""Chunked causal linear attention with decays and gates: Pallas kernels, Triton lowering.

The recurrence (per value head; Katharopoulos et al. 2020, Lightning Attention-2, RetNet,
GLA, Mamba-2 SSD):

  S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(g_t), g_t ≤ 0,

with S zeroed before every token where `resets` is set. g is a scalar per token (fixed per
head and "no decay" are broadcast to this form by the wrapper) or a vector over the key
dimension (GLA). The sequence is cut into chunks of C tokens; b_i is the cumulative log
decay inside a chunk (b_i = Σ_{j≤i} g_j, falling, ≤ 0) and h_n the state entering chunk n:

  o_i     = scale · [ Σ_{j≤i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j + (q_i ⊙ e^{b_i})ᵀ h_n ]
  h_{n+1} = e^{b_C} ⊙ h_n + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ

For a scalar gate every exponent is ≤ 0, so nothing overflows however strong the decay.
A vector gate's pairwise decay e^{b_i − b_j} differs per key column, so it cannot sit
outside a matmul. A chunk whose log decay falls by at most FACTORED_RANGE (60) in every
channel is factored, `(q_i e^{b_i}) · (k_j e^{−b_j})` (the key factor ≤ e^60, finite;
GLA's gates fall by about 0.1-1 per token, so chunks of 64 take this form), and costs a
scalar gate's matmuls. A chunk with stronger decay is split into row blocks of 16 (as in
fla's GLA kernels): pairs in different blocks go through a reference point r (b just
before the later block, or at the end of the earlier one), `(q_i e^{b_i − r}) · (k_j
e^{r − b_j})`, both factors ≤ 1; pairs inside one block use the exact [16, K] decay, one
key row at a time — every exponent ≤ 0 again, at several times the cost.

Resets are masks, never decays (log 0 would poison the factorisations): `rel`, the number
of resets so far inside the chunk, tells a token's run (`common`). Token i reads the
incoming state only while rel_i = 0; key j feeds the outgoing state only if it is in the
chunk's last run; the state passes a chunk only if the chunk has no reset; pairs (i, j)
interact only within one run.

Kernels. The forward is one pass, Lightning Attention-2's: `_fused_output_kernel`, one
program per (batch, head, sequence piece, value block), walks the chunks in order with
the state on chip and writes o, so the chunk states never touch memory. The backward
uses the classic design of flash-linear-attention `ops/common/chunk_h.py` and
`ops/gla/chunk.py`, written anew:

  1. `_state_kernel` (here): one program per (batch, head, sequence piece, key block,
     value block) walks the chunks in order (fori_loop), storing each chunk's incoming
     state h_n and the piece's end state. Run in reverse over q and dO it is also the
     backward state pass: dh_n, the gradient with respect to the state leaving chunk n.
  2. `pallas_triton_gradients`: the gradient kernel, one program per (batch, head, chunk,
     value block), gives dq, dk, dv of the chunk from h_n and dh_n and the parts of the
     decay gradient, which a last kernel sums within each chunk.

The composition (padding, sequence pieces run in parallel and chained by a scan, the
custom VJP) is `chunked_plan`'s, with this module's launches (`LAUNCHES`); the tile
arithmetic the kernels share is `pallas_triton_tiles`'.

Precision: inputs are read in their dtype, the dot operands are cast to it (bf16/f16
tensor-core matmuls; f32 inputs use IEEE f32 dots, not TF32), and everything accumulates
in f32; the carried state is f32. The chunk states h_n and dh_n that the backward writes
to memory (it recomputes them rather than keeping the forward's), and the per-head dq and
dk, are stored in the inputs' dtype when it is 16-bit, since the dots read them in it.

Limits: key_dim, value_dim, chunk_size and block sizes must be powers of two (Triton
tensor shapes), and at least 16 when compiled (tl.dot); interpret mode takes smaller ones.
"No decay" runs as a zero scalar gate (no cheaper special case). The output and gradient
kernels hold whole key rows (and, for gradients, the whole [K, V] state) per program.

The naive reference is `reference.linear_attention_reference`; the tests compare with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.linear_attention import chunked_plan
from pallas_kernels.linear_attention.chunked_plan import BlockSizes, storage_dtype
from pallas_kernels.linear_attention.pallas_triton_gradients import (gradient_call,
                                                                     log_decay_gradient)
from pallas_kernels.linear_attention.pallas_triton_tiles import (chunk_rows_spec, dot,
                                                                 earlier, factored, gate,
                                                                 pairs, pallas_call,
                                                                 scalar_scores,
                                                                 vector_diag)


def _state_update(s, x, y, b, b_last, rel, rel_last, *, reverse, scale):
  """One chunk of the state recurrence (see `_state_kernel`): s `[bk, bv]` f32; x, y the
  chunk's `[C, bk]` and `[C, bv]` rows; b `[C, bk|1]`, b_last `[1, bk|1]`, rel `[C, 1]`."""
  if reverse:
    weight = jnp.where(rel == 0, scale * jnp.exp(b), 0.0)
  else:
    weight = jnp.where(rel == rel_last, jnp.exp(b_last - b), 0.0)
  decay = jnp.where(rel_last == 0, jnp.exp(b_last), 0.0).reshape(-1, 1)  # rows of s
  return decay * s + dot(x * weight, y, "tn", x.dtype)


def _state_kernel(x_ref, y_ref, b_ref, rel_ref, start_ref, *out_refs, chunk, chunks,
                  reverse, scale):
  """The chunk-state recurrence over one sequence piece, for one state tile.

  Forward (x = k, y = v, chunks in order): stores h_n, then
    h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ   (j in the chunk's last run).
  Backward (x = q, y = dO, chunks in reverse): stores dh_n (w.r.t. the state leaving
  chunk n), then dh ← e^{b_C} ⊙ dh + scale Σ_i (q_i ⊙ e^{b_i}) dO_iᵀ (i before any reset).
  The decay factor is zero when the chunk holds a reset. `out_refs` is (states, end) or
  (end,) when only the piece's end is wanted.
  """
  *states_ref, end_ref = out_refs

  def body(t, s):
    j = chunks - 1 - t if reverse else t
    if states_ref:
      states_ref[0][j] = s.astype(states_ref[0].dtype)
    rows = pl.ds(j * chunk, chunk)
    return _state_update(s, x_ref[rows, :], y_ref[rows, :], gate(b_ref, rows),
                         gate(b_ref, pl.ds(j * chunk + chunk - 1, 1)).reshape(1, -1),
                         rel_ref[rows][:, None], rel_ref[j * chunk + chunk - 1],
                         reverse=reverse, scale=scale)

  end_ref[...] = lax.fori_loop(0, chunks, body, start_ref[...])


def _vector_block_output(q_ref, k_ref, v_ref, b_ref, rel_ref, s, base, chunk, start, sub):
  """Vector gate: o (before `scale`) of the rows start … start + sub − 1 of the chunk of
  `chunk` rows that begins at row `base` of the refs, from the state entering the chunk
  s `[K, bv]`: q·s, the exact diagonal block, and the chunk's earlier rows through a
  reference point (the whole chunk is read and masked: Triton tiles are powers of two).
  """
  rows = pl.ds(base + start, sub)
  q, b, rel = q_ref[rows, :], b_ref[rows, :], rel_ref[rows]
  dtype = q.dtype
  # Tokens still in the run that entered the chunk read the carried state.
  out = dot(jnp.where(rel[:, None] == 0, q * jnp.exp(b), 0.0), s, "nn", dtype)
  scores, _, _ = vector_diag(q, b, rel, k_ref, b_ref, base + start)
  out += dot(scores, v_ref[rows, :], "nn", dtype)
  if start > 0:
    whole = pl.ds(base, chunk)
    r = b_ref[pl.ds(base + start - 1, 1), :]
    q_factor, k_r = earlier(b, r, k_ref[whole, :], b_ref[whole, :], start)
    same_run = rel[:, None] == rel_ref[whole][None, :]
    scores = jnp.where(same_run, dot(q * q_factor, k_r, "nt", dtype), 0.0)
    out += dot(scores, v_ref[whole, :], "nn", dtype)
  return out


def _fused_output_kernel(q_ref, k_ref, v_ref, b_ref, rel_ref, start_ref, o_ref, end_ref, *,
                         chunk, chunks, scale, sub):
  """The whole forward for one sequence piece and one value block: walks the chunks in
  order carrying h `[K, bv]` on chip (f32), writing
    o_i = scale · [ (q_i ⊙ e^{b_i})ᵀ h_n + Σ_{j≤i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j ]
  and then h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ, with the masks of
  `_state_kernel`; end_ref gets the state leaving the piece. A scalar gate takes a chunk
  as one `[C, C]` score tile, a vector gate in row blocks of `sub`
  (`_vector_block_output`).
  """
  vector = len(b_ref.shape) == 2

  def body(t, s):
    base = t * chunk
    rows = pl.ds(base, chunk)
    k, v, rel = k_ref[rows, :], v_ref[rows, :], rel_ref[rows]
    b = gate(b_ref, rows)  # [C, K] | [C, 1]
    b_last = gate(b_ref, pl.ds(base + chunk - 1, 1)).reshape(1, -1)
    rel_last = rel_ref[base + chunk - 1]
    dtype = k.dtype
    if vector:
      factors = factored(b_last)

      @pl.when(factors)
      def _factored_chunk():
        q = q_ref[rows, :]
        q_decayed = q * jnp.exp(b)
        scores = jnp.where(pairs(rel), dot(q_decayed, k * jnp.exp(-b), "nt", dtype), 0.0)
        out = dot(jnp.where(rel[:, None] == 0, q_decayed, 0.0), s, "nn", dtype)
        out += dot(scores, v, "nn", dtype)
        o_ref[rows, :] = (scale * out).astype(o_ref.dtype)

      @pl.when(jnp.logical_not(factors))
      def _exact_chunk():
        for start in range(0, chunk, sub):
          out = _vector_block_output(q_ref, k_ref, v_ref, b_ref, rel_ref, s, base, chunk,
                                     start, sub)
          o_ref[pl.ds(base + start, sub), :] = (scale * out).astype(o_ref.dtype)
    else:
      q = q_ref[rows, :]
      scores, _ = scalar_scores(q, b, rel, k, b_ref[rows])
      out = dot(jnp.where(rel[:, None] == 0, q * jnp.exp(b), 0.0), s, "nn", dtype)
      out += dot(scores, v, "nn", dtype)
      o_ref[rows, :] = (scale * out).astype(o_ref.dtype)
    return _state_update(s, k, v, b, b_last, rel[:, None], rel_last, reverse=False,
                         scale=scale)

  end_ref[...] = lax.fori_loop(0, chunks, body, start_ref[...])


def _chunk_cumsum_kernel(g_ref, b_ref):
  """b = the cumulative sum of g over one chunk's rows `[C, K]`, f32."""
  b_ref[...] = jnp.cumsum(g_ref[...], axis=0)


def _state_call(x, y, b, rel, start, plan, *, reverse, write_states):
  """Launches `_state_kernel`; x `[B, T, Hx, K]` (Hx divides H), y `[B, T, H, V]`,
  start `[B, H, P, K, V]`. Returns ([h_n `[B, H, N, K, V]`,] ends `[B, H, P, K, V]`)."""
  batch, _, x_heads, key_dim = x.shape
  heads, value_dim = y.shape[2:]
  ratio = heads // x_heads
  bk, bv, piece = plan.block_k, plan.block_v, plan.chunks_per_piece * plan.chunk
  if b.ndim == 4:
    b_spec = pl.BlockSpec((None, piece, None, bk), lambda n, h, p, i, j: (n, p, h, i))
  else:
    b_spec = pl.BlockSpec((None, piece, None), lambda n, h, p, i, j: (n, p, h))
  tile = lambda length: pl.BlockSpec((None, None, length, bk, bv),
                                     lambda n, h, p, i, j: (n, h, p, i, j))
  in_specs = [
      pl.BlockSpec((None, piece, None, bk), lambda n, h, p, i, j: (n, p, h // ratio, i)),
      pl.BlockSpec((None, piece, None, bv), lambda n, h, p, i, j: (n, p, h, j)),
      b_spec,
      pl.BlockSpec((None, piece), lambda n, h, p, i, j: (n, p)),
      tile(None),
  ]
  out_specs = [tile(None)]
  out_shape = [jax.ShapeDtypeStruct(start.shape, jnp.float32)]
  if write_states:
    out_specs.insert(0, tile(plan.chunks_per_piece))
    # Stored in the inputs' 16-bit dtype (the kernels' dots read them in it anyway).
    out_shape.insert(0, jax.ShapeDtypeStruct(
        (batch, heads, plan.chunks, key_dim, value_dim), storage_dtype(x.dtype)))
  kernel = functools.partial(_state_kernel, chunk=plan.chunk, chunks=plan.chunks_per_piece,
                             reverse=reverse, scale=plan.scale)
  return pallas_call(
      plan, kernel, "linear_attention_state_bwd" if reverse else "linear_attention_state_fwd",
      grid=(batch, heads, plan.pieces, key_dim // bk, value_dim // bv),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape)(x, y, b, rel, start)


def _fused_output_call(q, k, v, b, rel, starts, plan):
  """Launches `_fused_output_kernel` over (batch, head, piece, value block); starts
  `[B, H, P, K, V]`. Returns o and the state leaving each piece `[B, H, P, K, V]`."""
  batch, _, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  ratio = heads // key_heads
  bv, piece = plan.block_v, plan.chunks_per_piece * plan.chunk
  qk = pl.BlockSpec((None, piece, None, key_dim), lambda n, h, p, j: (n, p, h // ratio, 0))
  vo = pl.BlockSpec((None, piece, None, bv), lambda n, h, p, j: (n, p, h, j))
  if b.ndim == 4:
    bb = pl.BlockSpec((None, piece, None, key_dim), lambda n, h, p, j: (n, p, h, 0))
  else:
    bb = pl.BlockSpec((None, piece, None), lambda n, h, p, j: (n, p, h))
  state = pl.BlockSpec((None, None, None, key_dim, bv), lambda n, h, p, j: (n, h, p, 0, j))
  kernel = functools.partial(_fused_output_kernel, chunk=plan.chunk,
                             chunks=plan.chunks_per_piece, scale=plan.scale, sub=plan.sub)
  return pallas_call(
      plan, kernel, "linear_attention_fused_fwd",
      grid=(batch, heads, plan.pieces, value_dim // bv),
      in_specs=[qk, qk, vo, bb, pl.BlockSpec((None, piece), lambda n, h, p, j: (n, p)),
                state],
      out_specs=[vo, state],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct(starts.shape, jnp.float32)],
  )(q, k, v, b, rel, starts)


def _chunk_cumsum(g, plan):
  """b: the cumulative sum of g `[B, T, H, K]` (T whole chunks) inside each chunk."""
  spec = chunk_rows_spec(g, plan.chunk)
  return pallas_call(plan, _chunk_cumsum_kernel, "linear_attention_chunk_cumsum",
                     grid=(g.shape[0], plan.chunks, g.shape[2]), in_specs=[spec],
                     out_specs=spec, out_shape=jax.ShapeDtypeStruct(g.shape, jnp.float32))(g)


LAUNCHES = chunked_plan.Launches(output=_fused_output_call, state=_state_call,
                                 gradients=gradient_call, decay_gradient=log_decay_gradient,
                                 chunk_cumsum=_chunk_cumsum)


_linear_attention = chunked_plan.with_vjp(LAUNCHES)


def linear_attention(query, key, value, log_decay, initial_state, resets, *, scale: float,
                     chunk_size: int, interpret: bool = False,
                     block_sizes: BlockSizes | None = None):
  """Causal linear attention by the chunked Pallas/Triton kernels, with its VJP.

  Args:
    query, key: `[batch, seq, heads, key_dim]`.
    value: `[batch, seq, value_heads, value_dim]`, value_heads a multiple r of heads;
      query/key head h serves value heads h·r … h·r + r − 1.
    log_decay: None (no decay), `[value_heads]` (fixed per head), `[batch, seq,
      value_heads]` (scalar gate per token) or `[batch, seq, value_heads, key_dim]`
      (vector gate over keys); float, ≤ 0.
    initial_state: `[batch, value_heads, key_dim, value_dim]` float32.
    resets: `[batch, seq]` bool: the state is zeroed before these tokens.
    scale: multiplies every output.
    chunk_size: tokens per chunk, a power of two (≥ 16 when compiled).
    interpret: run the kernels in the Pallas interpreter (CPU).
    block_sizes: None for `BlockSizes.get_default` (`chunked_plan.BlockSizes`).

  Returns:
    out `[batch, seq, value_heads, value_dim]` in the query's dtype and the final state
    `[batch, value_heads, key_dim, value_dim]` float32.

  Key and value dims of any size run: they are zero-padded to `chunked_plan.padded_dim`.

  Raises:
    NotImplementedError: naming the argument the kernels do not serve (a chunk size or
      block that is not a power of two, or below 16 when compiled; an empty sequence).
  """
  return chunked_plan.call_with_plan(
      _linear_attention, query, key, value, log_decay, initial_state, resets, scale,
      chunk_size, interpret, block_sizes,
      vector_chunk_cap=lambda key_dim: chunked_plan.VECTOR_16BIT_CHUNK if key_dim <= 32
      else None)
