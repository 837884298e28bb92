"""Attention maps captured from any model without touching its code.

    with capture_attention(layers=[0, 1]) as maps:
      model(tokens)                       # eagerly: not under jit or remat
    maps[1][0]                            # layer 1's first map [batch, heads, q, k]

A hook in the ops' dispatcher (`attn_jax.ops.dispatch.add_hook`) sees every
`dot_product_attention` and `linear_attention` call with its validated arguments, records
the map it implies, and lets the call run unchanged. The model's blocks name the layer
of each call (`layer_scope`); a call outside any block is recorded under layer -1.

- Softmax family: the attention probabilities `[batch, q_heads, q_len, kv_len]` float32,
  exactly as the XLA path weighs the values (scale, soft cap, mask, segments; a sink's
  share is left out, so such rows sum to less than 1). Differential attention records
  its two maps, Based its window branch (and its linear branch below).
- Linear family: the implicit attention matrix `[batch, value_heads, seq, seq]`,
  `scale · Σ_k q_tk k_sk e^{b_tk − b_sk}` for s ≤ t in t's segment (b the cumulative log
  decay): the weight of v_s in o_t before any normalisation (for `normalize=True`
  mixers divide a row by its sum). Quadratic in the sequence: small T only.

A map is recorded only for the layers (and heads) asked for, so memory follows the
request.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from attn_jax.layers.scope import current_layer
from attn_jax.ops import dispatch
from pallas_kernels.linear_attention.common import expand_heads, per_token_log_decay

_ACTIVE = contextvars.ContextVar("attn_jax_capture", default=None)


class _Request:
  def __init__(self, layers, heads):
    self.layers = None if layers is None else {int(i) for i in layers}
    self.heads = None if heads is None else list(heads)
    self.maps: dict[int, list[jax.Array]] = {}

  def wants(self, layer):
    return self.layers is None or layer in self.layers

  def add(self, layer, probabilities):
    if self.heads is not None:
      probabilities = probabilities[:, jnp.asarray(self.heads)]
    self.maps.setdefault(layer, []).append(probabilities)


@contextlib.contextmanager
def capture_attention(layers=None, heads=None):
  """Records attention maps of the op calls made inside; yields `{layer: [maps]}`.

  Args:
    layers: layer indices to record (None: all).
    heads: head indices to keep of each map (None: all).

  Raises:
    ValueError (from the model call): an op runs under a transformation (jit, remat,
      grad), where its values are not concrete; call the model eagerly.
  """
  dispatch.add_hook(_hook)
  request = _Request(layers, heads)
  token = _ACTIVE.set(request)
  try:
    yield request.maps
  finally:
    _ACTIVE.reset(token)


def _hook(op_name, run, implementation, *args, **kwargs):
  request = _ACTIVE.get()
  layer = current_layer()
  if request is None or not request.wants(layer):
    return NotImplemented
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
    raise ValueError("capture_attention records concrete maps: call the model eagerly "
                     "(not under jax.jit, nnx.jit, remat or grad; a loaded model with "
                     "remat set needs model.remat = 'none').")
  if op_name == "dot_product_attention":
    request.add(layer, softmax_probabilities(*args, **kwargs))
  elif op_name == "linear_attention":
    request.add(layer, linear_attention_matrix(*args, **kwargs))
  return NotImplemented  # the call itself runs as it would have


def softmax_probabilities(query, key, value, q_segment_ids, kv_segment_ids, sinks, *,
                          mask, scale, logits_soft_cap, **unused):
  """`[batch, q_heads, q_len, kv_len]` float32: how `dot_product_attention` weighs v."""
  del value, unused
  q_heads, kv_heads = query.shape[2], key.shape[2]
  key = jnp.repeat(key, q_heads // kv_heads, axis=2)  # query head h reads h // groups
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  visible = mask.dense(q_segment_ids, kv_segment_ids)[:, None]
  logits = jnp.where(visible, logits, -jnp.inf)
  if sinks is not None:  # a column with no value: its share is not any key's
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None],
                            logits.shape[:3] + (1,))
    logits = jnp.concatenate([logits, sink], axis=-1)
  top = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probabilities = weights / jnp.where(total > 0, total, 1.0)
  return probabilities[..., :key.shape[1]]


def linear_attention_matrix(query, key, value, log_decay, initial_state, resets, *,
                            scale, **unused):
  """`[batch, value_heads, seq, seq]` float32: the weight of v_s in o_t (see above)."""
  del initial_state, unused
  batch, seq, heads, _ = key.shape
  value_heads = value.shape[2]
  q, k = (expand_heads(x.astype(jnp.float32), value_heads // heads) for x in (query, key))
  g = per_token_log_decay(log_decay, batch, seq, value_heads)
  b = jnp.cumsum(g[..., None] if g.ndim == 3 else g, axis=1)  # [b, seq, heads, 1 | key_dim]
  t, s = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
  run = jnp.cumsum(resets.astype(jnp.int32), axis=1)
  visible = (s <= t)[None] & (run[:, :, None] == run[:, None, :])  # [batch, t, s]
  exponent = b[:, :, None] - b[:, None, :]  # [batch, t, s, heads, 1 | key_dim]
  exponent = jnp.where(visible[..., None, None], exponent, -jnp.inf)
  weights = jnp.einsum("bthk,bshk,btshk->bhts", q, k,
                       jnp.exp(jnp.broadcast_to(exponent, exponent.shape[:4] + q.shape[-1:])))
  return scale * weights
