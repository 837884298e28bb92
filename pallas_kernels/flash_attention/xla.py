"""Softmax attention in plain XLA: the reference every attention kernel is checked against.

It materialises the `[batch, heads, q_seq, kv_seq]` logits, so it is meant for checking,
for small shapes and for platforms no kernel serves; kernels are the fast path. It reads
the mask as a dense array (`AttentionMask.dense`), and keeps a non-finite key or value to
the outputs that see it (`pallas_kernels.nonfinite`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.dropout import dropout
from pallas_kernels.flash_attention.mask import AttentionMask
from pallas_kernels.nonfinite import zero_nonfinite


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, mask: AttentionMask, scale: float,
                    logits_soft_cap: float | None, return_residuals: bool,
                    dropout_rate: float = 0.0, dropout_rng=None):
  """Softmax attention with the kernels' arguments (`pallas_triton.flash_attention`), on
  any platform; as called by `ops.dot_product_attention`, arguments already validated.
  With `dropout_rate` > 0, each attention weight is dropped with that probability
  (`dropout_rng` draws the mask) and the kept ones divided by 1 - rate; the log-sum-exp
  is the undropped one.

  Returns:
    out `[batch, q_seq, q_heads, v_dim]` in the query's dtype, and with `return_residuals`
    the log-sum-exp `[batch, q_heads, q_seq]` float32 (sink included; -inf for a row that
    sees no key and has no sink).
  """
  batch, q_len, q_heads, _ = query.shape
  kv_heads = key.shape[2]
  groups = q_heads // kv_heads
  # Query head h reads key/value head h // groups: split q heads into (kv_heads, groups).
  q = query.reshape(batch, q_len, kv_heads, groups, query.shape[-1])
  # A non-finite key or value reaches only the queries that see it: the products run on
  # finite copies (0 · NaN is NaN, in the forward and in the gradient), and the outputs
  # of the queries that see such a key come back as NaN through `where`.
  key, bad_key = zero_nonfinite(key)  # [b, k, h, d], [b, k, h]
  value, bad_value = zero_nonfinite(value)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key,
                      preferred_element_type=jnp.float32) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  visible = mask.dense(q_segment_ids, kv_segment_ids)  # [batch or 1, q_seq, kv_seq]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)

  row_max = jnp.max(logits, axis=-1)
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1)
    row_max = jnp.maximum(row_max, sink)
  # The max only keeps exp() in range; the result does not depend on it.
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  probs = jnp.exp(logits - row_max[..., None])
  denom = jnp.sum(probs, axis=-1)
  if sinks is not None:
    denom = denom + jnp.exp(sink - row_max)
  seen = denom > 0
  safe_denom = jnp.where(seen, denom, 1.0)
  if dropout_rate:  # on the unnormalised weights: the same as after dividing by denom
    probs = dropout(probs, dropout_rate, dropout_rng)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(value.dtype), value,
                   preferred_element_type=jnp.float32)
  out = out / jnp.moveaxis(safe_denom, -1, 1)[..., None]
  # [b, q, kv_heads]; a reduction, not a dot (no extra matmul on the CPU's thread pool)
  sees_bad = jnp.any(visible[..., None] & (bad_key | bad_value)[:, None], axis=2)
  out = jnp.where(sees_bad[:, :, :, None, None], jnp.nan, out)
  out = out.reshape(batch, q_len, q_heads, value.shape[-1]).astype(query.dtype)
  if not return_residuals:
    return out
  lse = jnp.where(seen, row_max + jnp.log(safe_denom), -jnp.inf)
  lse = jnp.where(jnp.moveaxis(sees_bad, 1, 2)[:, :, None], jnp.nan, lse)
  return out, lse.reshape(batch, q_heads, q_len)
