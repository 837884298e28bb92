"""Causal linear attention over a sequence sharded along one mesh axis, by state passing.

The recurrence `S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ` is affine in the state, so over a whole
block of n tokens it is `S_end = A ⊙ S_start + E`, with A the product of the block's
decays (zero when a segment starts inside the block) and E the block's state from a zero
start. Each device on the `sequence` axis:

  1. runs chunked linear attention on its block from a zero state, giving the block's
     outputs and E (the intra-shard part);
  2. all-gathers every block's (A, E) and scans them, from the given initial state, to
     the state S_i entering its block (the P-step scan is tiny: P states);
  3. adds what S_i contributes to its tokens before the first segment start:
     `o_t += scale · (q_t ⊙ e^{b_t})ᵀ S_i`, `b_t = Σ_{u ≤ t} log a_u` within the block.

This is the state passing of LASP (Sun et al., 2024, "Linear Attention Sequence
Parallelism") with an all-gather instead of a chain of point-to-point sends: one
collective of P small states instead of P − 1 dependent hops. Every exponent is ≤ 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.linear_attention import common


def state_passing_linear_attention(local_fn, query, key, value, log_decay, initial_state,
                                   resets, *, axis_name, scale):
  """Causal linear attention of this device's block, given the whole sharded sequence.

  Call inside `shard_map` with `axis_name` bound; the sequence is split evenly and in
  order along it. Arguments follow the dispatch level of `ops.linear_attention`
  (normalisation, if any, is a column of ones already appended to `value`).

  Args:
    local_fn: `local_fn(query, key, value, log_decay, initial_state, resets)` →
      `(out, final_state)`, causal linear attention of one block (e.g. the dispatcher).
    query, key: `[batch, n, heads, key_dim]` local blocks.
    value: `[batch, n, value_heads, value_dim]`, value_heads a multiple of heads.
    log_decay: None, `[value_heads]`, `[batch, n, value_heads]` or
      `[batch, n, value_heads, key_dim]` (local block), ≤ 0.
    initial_state: `[batch, value_heads, key_dim, value_dim]` float32, the state before
      the first token of the whole sequence (the same on every device).
    resets: `[batch, n]` bool local block of the global resets (True where a segment
      starts, including at a block's first token when the segment changes there).
    axis_name: the mesh axis the sequence is split along.
    scale: the output scale.

  Returns:
    out `[batch, n, value_heads, value_dim]` (local block, the dtype of `local_fn`'s
    output) and the final state of the whole sequence (the same on every device).
  """
  batch, n, heads, key_dim = key.shape
  value_heads = value.shape[2]
  zero = lax.pcast(jnp.zeros_like(initial_state), axis_name, to="varying")
  out, block_state = local_fn(query, key, value, log_decay, zero, resets)
  # The block is one chunk to the common bookkeeping: b over the block, and its runs.
  g = common.per_token_log_decay(log_decay, batch, n, value_heads)
  g = g[..., None] if g.ndim == 3 else g  # [b, n, vh, 1 | k]
  cum = common.cumsum_in_chunks(g, n)
  runs = common.run_masks(common.cumsum_in_chunks(resets.astype(jnp.int32), n))  # [b, n]
  block_decay = jnp.where(runs.passes[:, :, None], jnp.exp(cum[:, -1]), 0.0)  # [b, vh, 1|k]

  # The state entering each block: S_{j+1} = A_j ⊙ S_j + E_j, from the initial state.
  all_decay = lax.all_gather(block_decay, axis_name)  # [P, b, vh, 1 | k]
  all_state = lax.all_gather(block_state, axis_name)  # [P, b, vh, k, v]
  start = lax.pcast(initial_state.astype(jnp.float32), axis_name, to="varying")
  final, entering = common.affine_scan(all_decay[..., None], all_state, start)
  index = lax.axis_index(axis_name)
  incoming = entering[index]  # [b, vh, k, v]
  # Every device holds the same final state; the masked sum makes that visible to JAX.
  last = index == lax.axis_size(axis_name) - 1
  final = lax.psum(jnp.where(last, final, 0.0), axis_name)

  # What the incoming state adds to the tokens before the block's first reset.
  q = common.expand_heads(query.astype(jnp.float32), value_heads // heads)
  q = q * jnp.exp(cum) * runs.incoming[:, :, None, None]
  extra = scale * jnp.einsum("bthk,bhkv->bthv", q, incoming)
  out = (out.astype(jnp.float32) + extra).astype(out.dtype)
  return out, final
