"""Chunked causal linear attention in plain XLA (the Lightning Attention-2 split).

The sequence is cut into chunks of C tokens. Inside a chunk the output is a masked,
decay-weighted quadratic form (like attention without softmax); across chunks a state
`S [key_dim, value_dim]` carries the past:

  b_i     = Σ_{j ≤ i in chunk} log a_j                 (cumulative log decay, ≤ 0, falling)
  o_i     = scale · [ Σ_{j ≤ i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j  +  (q_i ⊙ e^{b_i})ᵀ S_prev ]
  S_next  = e^{b_C} ⊙ S_prev + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ

Every exponent above is ≤ 0, so nothing overflows in float32 however strong the decay
(the `q e^{b} · k e^{−b}` factorisation would overflow at a few hundred nats). For a
per-key vector gate the intra-chunk term is computed in sub-chunks of 16 tokens: between
sub-chunks through a reference point at the start of the later one (both factors ≤ 1),
within a sub-chunk by the exact `[16, 16, key_dim]` decay tensor.

Segment resets are masks, not decays: a token only sees tokens of its own run, and the
carried state reaches only the chunk's tokens still in the run that crossed into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUBCHUNK = 16


def chunked_linear_attention(query, key, value, *, log_decay, scale, initial_state,
                             resets, chunk_size):
  """Causal linear attention, chunked; the arguments as in `linear_attention_reference`.

  Returns out `[batch, seq, heads, value_dim]` float32 and the final state.
  """
  batch, seq, heads, key_dim = key.shape
  vector_gate = log_decay.ndim == 4
  chunk = chunk_size
  if vector_gate and chunk > SUBCHUNK:
    chunk = -(-chunk // SUBCHUNK) * SUBCHUNK
  pad = -seq % chunk
  n = (seq + pad) // chunk

  def split(x, fill=0):
    x = x.astype(jnp.float32) if x.dtype != bool else x
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(batch, n, chunk, *x.shape[2:])

  # Padding tokens have zero q, k, v and no decay: they leave the state as it is.
  q, k, v, g = split(query), split(key), split(value), split(log_decay)
  run = jnp.cumsum(resets.astype(jnp.int32), axis=1)  # run index of each token
  run = split(run, fill=-1)
  run = jnp.where(run < 0, run.max(axis=(1, 2), keepdims=True), run)  # pad joins last run
  run_before = jnp.concatenate(  # run of the token just before each chunk
      [jnp.zeros((batch, 1), run.dtype), run[:, :-1, -1]], axis=1)
  linked = run == run_before[:, :, None]  # [b, n, c]: token still in the incoming run
  same_run = run[..., :, None] == run[..., None, :]  # [b, n, c, c]
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  intra_mask = same_run & causal

  b = jnp.cumsum(g, axis=2)  # [b, n, c, h] or [b, n, c, h, k]
  b_last = b[:, :, -1:]
  if vector_gate:
    scores = _vector_gate_scores(q, k, b, chunk)
    q_inter = q * jnp.exp(b)
    k_state = k * jnp.exp(b_last - b)
    chunk_decay = jnp.exp(b_last[:, :, 0])  # [b, n, h, k]
  else:
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [b, n, c(i), c(j), h]
    diff = jnp.where(causal[:, :, None], diff, -jnp.inf)
    scores = jnp.einsum("bnihk,bnjhk->bnijh", q, k) * jnp.exp(diff)
    q_inter = q * jnp.exp(b)[..., None]
    k_state = k * jnp.exp(b_last - b)[..., None]
    chunk_decay = jnp.exp(b_last[:, :, 0])[..., None]  # [b, n, h, 1]
  scores = jnp.where(intra_mask[..., None], scores, 0.0)
  o_intra = jnp.einsum("bnijh,bnjhv->bnihv", scores, v)

  # State carried across chunks; a reset inside a chunk cuts the incoming state off.
  in_last_run = run == run[:, :, -1:]
  k_state = jnp.where(in_last_run[..., None, None], k_state, 0.0)
  state_increment = jnp.einsum("bnchk,bnchv->bnhkv", k_state, v)
  carry_decay = jnp.where(linked[:, :, -1, None, None], chunk_decay, 0.0)[..., None]

  def step(state, xs):
    decay, increment = xs
    return decay * state + increment, state

  final, states_before = jax.lax.scan(
      step, initial_state.astype(jnp.float32),
      (jnp.moveaxis(carry_decay, 1, 0), jnp.moveaxis(state_increment, 1, 0)))
  states_before = jnp.moveaxis(states_before, 0, 1)  # [b, n, h, k, v]
  q_inter = jnp.where(linked[..., None, None], q_inter, 0.0)
  o_inter = jnp.einsum("bnchk,bnhkv->bnchv", q_inter, states_before)
  out = scale * (o_intra + o_inter)
  return out.reshape(batch, n * chunk, heads, -1)[:, :seq], final


def _vector_gate_scores(q, k, b, chunk):
  """Σ_k q_ik k_jk e^{b_ik − b_jk} for j ≤ i in each chunk: `[b, n, c(i), c(j), h]`."""
  s = min(SUBCHUNK, chunk)
  m = chunk // s
  shape = q.shape[:2] + (m, s) + q.shape[3:]
  qs, ks, bs = (x.reshape(shape) for x in (q, k, b))  # [b, n, m, s, h, k]
  # Between sub-chunks I > J: reference point r_I = b just before sub-chunk I.
  ref = jnp.concatenate([jnp.zeros_like(bs[:, :, :1, :1]), bs[:, :, :-1, -1:]], axis=2)
  q_ref = qs * jnp.exp(bs - ref)  # ≤ |q|
  earlier = jnp.tril(jnp.ones((m, m), bool), -1)  # [I, J]: J < I
  k_exp = ref[:, :, :, None] - bs[:, :, None, :]  # [b, n, I, J, s, h, k]
  k_exp = jnp.where(earlier[:, :, None, None, None], k_exp, -jnp.inf)
  k_ref = ks[:, :, None] * jnp.exp(k_exp)
  between = jnp.einsum("bnIihk,bnIJjhk->bnIiJjh", q_ref, k_ref)
  # Within a sub-chunk: the exact decay tensor.
  diff = bs[:, :, :, :, None] - bs[:, :, :, None, :]  # [b, n, m, s(i), s(j), h, k]
  lower = jnp.tril(jnp.ones((s, s), bool))
  diff = jnp.where(lower[:, :, None, None], diff, -jnp.inf)
  within = jnp.einsum("bnmihk,bnmjhk,bnmijhk->bnmijh", qs, ks, jnp.exp(diff))
  between = between + _diag_blocks(within, m)
  return between.reshape(q.shape[:2] + (chunk, chunk) + q.shape[3:4])


def _diag_blocks(within, m):
  """`[b, n, m, s, s, h]` → `[b, n, m, s, m, s, h]` with block I placed at (I, I)."""
  eye = jnp.eye(m, dtype=within.dtype)
  return jnp.einsum("bnIijh,IJ->bnIiJjh", within, eye)
