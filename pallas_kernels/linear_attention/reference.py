"""Linear attention by its recurrent definition, one token at a time: the naive reference.

`S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ`, `o_t = scale · S_tᵀ q_t`, with the state reset to zero
where the segment id changes. Slow (a scan over tokens) and exact; tests compare every
chunked implementation and kernel with it (flash-linear-attention's `naive.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_attention_reference(query, key, value, *, log_decay, scale, initial_state,
                               resets):
  """Causal linear attention by recurrence over tokens, in float32.

  Args:
    query, key: `[batch, seq, heads, key_dim]`, heads equal to the value heads.
    value: `[batch, seq, heads, value_dim]`.
    log_decay: `[batch, seq, heads]` or `[batch, seq, heads, key_dim]`, float32 ≤ 0.
    scale: float.
    initial_state: `[batch, heads, key_dim, value_dim]` float32.
    resets: `[batch, seq]` bool: the state is zeroed before this token.

  Returns:
    out `[batch, seq, heads, value_dim]` float32 and the final state.
  """
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = f32(query), f32(key), f32(value)
  decay = jnp.exp(f32(log_decay))
  if decay.ndim == 3:
    decay = decay[..., None]
  decay = jnp.broadcast_to(decay, k.shape)

  def step(state, xs):
    q_t, k_t, v_t, a_t, reset_t = xs  # [b, h, k], ..., [b]
    state = jnp.where(reset_t[:, None, None, None], 0.0, a_t[..., None] * state)
    state = state + k_t[..., None] * v_t[..., None, :]
    return state, scale * jnp.einsum("bhkv,bhk->bhv", state, q_t)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  final, out = jax.lax.scan(step, f32(initial_state),
                            tuple(map(time_major, (q, k, v, decay, resets))))
  return time_major(out), final
