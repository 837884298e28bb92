"""The vector gate (GLA) on Hopper: `pallas_mosaic_gpu`'s forward kernel and state passes
over operands that carry the decay, with the Triton-language kernels' per-chunk gradients.

Per value head and chunk of C = 64 tokens (notation of `pallas_mosaic_gpu`), b `[C, K]`
the cumulative log decay inside the chunk (≤ 0, falling in every key channel), h the
state entering it:

  o_i = scale · [ [rel_i = 0] (q_i ⊙ e^{b_i})ᵀ h
                  + Σ_{j ≤ i in i's run} ((q_i ⊙ e^{b_i}) · (k_j ⊙ e^{−b_j})) v_j ],
  h  ← [no reset] e^{b_C} ⊙ h + Σ_{j: rel_j = rel_C} (k_j ⊙ e^{b_C − b_j}) v_jᵀ.

With the decays moved into the operands (XLA, per value head, in the inputs' dtype) this
is the scalar gate's forward with no scalar decay, the state update's keys an operand of
their own and the state's decay a vector over key channels (`pallas_mosaic_gpu._kernel`
with `vector`). The state passes are `pallas_mosaic_gpu_states`' kernel over
X = k ⊙ e^{b_C − b} with the weights [rel = rel_C] (in reverse X = q ⊙ e^{b} with
scale · [rel = 0]), every exponent ≤ 0.

The factored scores need e^{−b_j} ≤ e^{60} (`chunked_plan.FACTORED_RANGE`; bfloat16 holds
it, float16 tops out at e^{11}). A call whose gate falls further than that inside some
chunk, in some channel, runs the Triton-language kernels instead (`triton`, whose exact
sub-block form serves any decay, at its 16-bit vector chunk of 32): one `lax.cond` over
the whole call, both branches compiled. The backward's per-chunk gradients and
decay-gradient sums are the Triton-language kernels' (`triton_vector`; right at chunk 64,
where only their outputs were wrong: `chunked_plan.VECTOR_16BIT_CHUNK`).

Scope: bfloat16, key and value dims 64 and 128, chunk 64; the Triton-language kernels
(jax-triton) for the backward and the fallback. `pallas_mosaic_gpu.linear_attention`
checks and calls `linear_attention` here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_attention import chunked_plan, common, pallas_mosaic_gpu, triton
from pallas_kernels.linear_attention.pallas_mosaic_gpu_states import weighted_state_call

CHUNK = pallas_mosaic_gpu.CHUNK


def factored(g, chunk: int = CHUNK):
  """Whether every chunk's log decay g `[B, T, H, K]` falls by at most
  `chunked_plan.FACTORED_RANGE` in every channel (a scalar bool array)."""
  batch, seq = g.shape[:2]
  g = jnp.pad(g, [(0, 0), (0, -seq % chunk), (0, 0), (0, 0)])
  falls = g.reshape(batch, -1, chunk, *g.shape[2:]).sum(axis=2)
  return jnp.all(falls >= -chunked_plan.FACTORED_RANGE)


def _by_chunk(x):
  """`[B, T, ...]` → `[B, N, C, ...]`."""
  return x.reshape(x.shape[0], -1, CHUNK, *x.shape[2:])


def _chunk_decay(b, rel):
  """e^{b_C} per chunk and key channel, 0 where the chunk holds a reset: `[B, H, N, K]`."""
  last = _by_chunk(b)[:, :, -1]  # [B, N, H, K]
  passes = common.run_masks(_by_chunk(rel)).passes  # [B, N, 1]
  return jnp.moveaxis(jnp.where(passes[..., None], jnp.exp(last), 0.0), 1, 2)


def _token_weights(mask, heads, scale=1.0):
  """A per-token mask `[B, T]` as the state pass's weights `[B, H, T]` f32."""
  w = jnp.where(mask, jnp.float32(scale), 0.0)
  return jnp.broadcast_to(w[:, None], (w.shape[0], heads, w.shape[1]))


def _operands(x, b, exponent):
  """x `[B, T, Hk, K]` per value head times e^{exponent(b)}, in x's dtype."""
  x = common.expand_heads(x, b.shape[2] // x.shape[2])
  return (x.astype(jnp.float32) * jnp.exp(exponent(b))).astype(x.dtype)


def _from_chunk_end(b):
  """b_C − b `[B, T, H, K]` (≤ 0)."""
  chunks = _by_chunk(b)
  return (chunks[:, :, -1:] - chunks).reshape(b.shape)


def _output_call(q, k, v, b, rel, starts, plan, *, blocks):
  """`chunked_plan.Launches.output`: the scalar gate's kernel over the factored operands."""
  outgoing = common.run_masks(_by_chunk(rel)).outgoing.reshape(rel.shape)
  k_tail = jnp.where(outgoing[:, :, None, None], _operands(k, b, _from_chunk_end), 0)
  return pallas_mosaic_gpu.output_call(
      _operands(q, b, lambda b: b), _operands(k, b, lambda b: -b), v, None, rel, starts,
      plan, blocks, vector_operands=(k_tail, _chunk_decay(b, rel)))


def _state_call(x, y, b, rel, start, plan, *, reverse, write_states, blocks):
  """`chunked_plan.Launches.state`: X = q ⊙ e^{b} over dO (reverse) or k ⊙ e^{b_C − b}
  over v, through `weighted_state_call`."""
  heads = y.shape[2]
  runs = common.run_masks(_by_chunk(rel))
  if reverse:
    x, w = _operands(x, b, lambda b: b), _token_weights(runs.incoming.reshape(rel.shape),
                                                         heads, plan.scale)
  else:
    x, w = _operands(x, b, _from_chunk_end), _token_weights(
        runs.outgoing.reshape(rel.shape), heads)
  return weighted_state_call(x, y, w, _chunk_decay(b, rel), start, plan, reverse=reverse,
                             write_states=write_states, slots=blocks.slots,
                             value_blocks=blocks.value_blocks)


@functools.lru_cache(maxsize=None)
def _kernel(blocks):
  """The VJP function of `chunked_plan.with_vjp` for these Mosaic GPU block sizes."""
  return chunked_plan.with_vjp(chunked_plan.Launches(
      output=functools.partial(_output_call, blocks=blocks),
      state=functools.partial(_state_call, blocks=blocks),
      gradients=triton.LAUNCHES.gradients,
      decay_gradient=triton.LAUNCHES.decay_gradient,
      chunk_cumsum=triton.LAUNCHES.chunk_cumsum))


def linear_attention(query, key, value, g, initial_state, resets, *, scale: float,
                     pieces: int, blocks, interpret: bool):
  """The vector gate g `[B, T, H, K]` f32 through the factored Mosaic GPU kernels, or,
  where some chunk falls too far to factor, through `triton.linear_attention`.

  query, key `[B, T, Hk, K]`, value `[B, T, H, V]` bfloat16; initial_state
  `[B, H, K, V]` f32; resets `[B, T]` bool; pieces: sequence pieces (as
  `pallas_mosaic_gpu.linear_attention` resolved them); blocks: its `BlockSizes`, resolved.
  Returns out `[B, T, H, V]` and the final state f32.
  """
  batch, seq, _, key_dim = key.shape
  heads, value_dim = value.shape[2:]
  triton_blocks = dataclasses.replace(
      triton.default_block_sizes(key_dim, value_dim, query.dtype, vector=True),
      pieces=pieces)
  plan = chunked_plan.make_plan(batch, seq, heads, key_dim, value_dim, query.dtype, True,
                                scale, CHUNK, triton_blocks, interpret)
  blocks = dataclasses.replace(blocks, pieces=plan.pieces)

  def mosaic(query, key, value, g, initial_state, resets):
    return _kernel(blocks)(query, key, value, g, initial_state, resets, plan)

  def exact(query, key, value, g, initial_state, resets):
    out, final = triton.linear_attention(query, key, value, g, initial_state, resets,
                                         scale=scale, chunk_size=CHUNK,
                                         interpret=interpret)
    return out.astype(query.dtype), final.astype(jnp.float32)

  return lax.cond(factored(g), mosaic, exact, query, key, value, g, initial_state, resets)
