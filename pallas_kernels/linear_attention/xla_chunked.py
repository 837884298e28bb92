"""Chunked causal linear attention in plain XLA (the Lightning Attention-2 split): the
"xla" backend of `attn_jax.ops.linear_attention`, which runs everywhere.

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
carried state reaches only the chunk's tokens still in the run that crossed into it
(`common.run_masks`).

A non-finite q, k or v reaches only the outputs that see it (its own run, from its token
on; docs/reliability.md): the chunked products, whose masks are multiplications by 0
(0 · NaN is NaN), run on finite copies, and NaN comes back through `where` where it
belongs.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.linear_attention import common
from pallas_kernels.nonfinite import mark_linear, zero_nonfinite

SUBCHUNK = 16


def linear_attention(query, key, value, log_decay, initial_state, resets, *, scale: float,
                     chunk_size: int):
  """Causal linear attention in XLA, chunked, in the calling convention of every
  backend's `linear_attention`.

  Args:
    query, key: `[batch, seq, heads, key_dim]`, repeated to the value heads
      (`common.expand_heads`); value: `[batch, seq, value_heads, value_dim]`.
    log_decay: any decay form of `common.per_token_log_decay` (None, fixed per value
      head, scalar or vector gate per token), ≤ 0.
    initial_state: the state before token 0, `[batch, value_heads, key_dim, value_dim]`
      float32; resets: `[batch, seq]` bool, True where the state restarts from zero.
    scale: the output scale; chunk_size: any positive int (a vector gate's chunk is
      rounded up to whole sub-chunks of 16).

  Returns:
    out `[batch, seq, value_heads, value_dim]` and the final state, both float32; NaN
    where a non-finite input reaches (see the module docstring).
  """
  batch, seq = key.shape[:2]
  value_heads = value.shape[2]
  q, k = (common.expand_heads(x, value_heads // key.shape[2]) for x in (query, key))
  log_decay = common.per_token_log_decay(log_decay, batch, seq, value_heads)
  (q, bad_q), (k, bad_k), (value, bad_v) = (zero_nonfinite(x) for x in (q, k, value))
  out, final = chunked_linear_attention(q, k, value, log_decay=log_decay, scale=scale,
                                        initial_state=initial_state, resets=resets,
                                        chunk_size=chunk_size)
  return mark_linear(out, final, bad_q, bad_k | bad_v, resets)


def chunked_linear_attention(query, key, value, *, log_decay, scale, initial_state,
                             resets, chunk_size):
  """Causal linear attention, chunked, for finite inputs; the arguments as in
  `reference.linear_attention_reference`.

  Returns out `[batch, seq, heads, value_dim]` float32 and the final state.
  """
  batch, seq, heads, key_dim = key.shape
  vector_gate = log_decay.ndim == 4
  chunk = chunk_size
  if vector_gate and chunk > SUBCHUNK:
    chunk = -(-chunk // SUBCHUNK) * SUBCHUNK
  pad = -seq % chunk
  n = (seq + pad) // chunk

  # Padding tokens have zero q, k, v, no decay and no reset: they join the last run and
  # leave the state as it is.
  padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  f32 = lambda x: padded(x.astype(jnp.float32))
  split = lambda x: x.reshape(batch, n, chunk, *x.shape[2:])
  q, k, v = split(f32(query)), split(f32(key)), split(f32(value))
  b = split(common.cumsum_in_chunks(f32(log_decay), chunk))  # [b, n, c, h(, k)]
  rel = split(common.cumsum_in_chunks(padded(resets.astype(jnp.int32)), chunk))  # [b, n, c]
  runs = common.run_masks(rel)
  same_run = rel[..., :, None] == rel[..., None, :]  # [b, n, c, c]
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  intra_mask = same_run & causal

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
  k_state = jnp.where(runs.outgoing[..., None, None], k_state, 0.0)
  state_increment = jnp.einsum("bnchk,bnchv->bnhkv", k_state, v)
  carry_decay = jnp.where(runs.passes[..., None], chunk_decay, 0.0)[..., None]
  final, states_before = common.affine_scan(
      jnp.moveaxis(carry_decay, 1, 0), jnp.moveaxis(state_increment, 1, 0),
      initial_state.astype(jnp.float32))
  states_before = jnp.moveaxis(states_before, 0, 1)  # [b, n, h, k, v]
  q_inter = jnp.where(runs.incoming[..., None, None], q_inter, 0.0)
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
