"""Ring attention: softmax attention over a sequence sharded along one mesh axis.

Each of the P devices on the `sequence` axis holds one contiguous block of n = T / P
queries, keys and values. Keys and values travel around the ring (`ppermute` to the next
device); at step s device i holds key block j = i − s (mod P), attends its queries to it,
and folds the partial result into its running output by the log-sum-exp of each part
(Liu et al., 2023, "Ring Attention with Blockwise Transformers"; the merge is the one of
flash attention's online softmax, Dao et al., 2022):

  lse = log(e^{lse_a} + e^{lse_b}),   o = e^{lse_a − lse} o_a + e^{lse_b − lse} o_b.

With a causal mask, device i skips the blocks j > i (a `lax.cond`, so no compute is
spent), so the load is unbalanced (device P − 1 does P blocks, device 0 one); the
striped / zig-zag layouts that balance it reorder the tokens and are not implemented.

A causal sliding window no longer than the local block needs only the previous block:
one `ppermute` brings its keys and values (a halo), and queries attend to
`[previous block, own block]`, whose end-aligned geometry is exactly the global one.

The per-block work is `ops.dot_product_attention`, so it runs whichever kernel serves the
block; sinks are merged once at the end (every block call would count them again).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attn_jax import ops

# Segment id of halo slots that do not exist (before the first block): matches no query.
_NO_SEGMENT = jnp.iinfo(jnp.int32).min


def ring_attention(query, key, value, *, axis_name, scale=None, is_causal=False,
                   local_window_size=None, q_segment_ids=None, kv_segment_ids=None,
                   logits_soft_cap=None, sinks=None, return_residuals=False,
                   implementation=None):
  """Softmax attention of this device's query block against the whole sharded sequence.

  Call inside `shard_map` (or `pmap`) with `axis_name` bound; every input is the local
  block of a sequence split evenly and in order along `axis_name`.

  Args:
    query: `[batch, n, q_heads, head_dim]`, this device's queries (global positions
      `i·n … i·n + n − 1`, i the index along `axis_name`).
    key, value: `[batch, n, kv_heads, head_dim]`, the keys/values at the same positions.
    axis_name: the mesh axis the sequence is split along.
    scale, is_causal, logits_soft_cap, sinks, implementation: as in
      `ops.dot_product_attention`.
    local_window_size: None, or a causal window `(left, 0)` (an int w means `(w, w)`,
      which is non-causal) with `left ≤ n`.
    q_segment_ids, kv_segment_ids: `[batch, n]` local blocks of the segment ids.
    return_residuals: also return the log-sum-exp `[batch, q_heads, n]` float32.

  Returns:
    `[batch, n, q_heads, head_dim]` (and the log-sum-exp), equal to the rows
    `i·n … i·n + n − 1` of unsharded attention.

  Raises:
    NotImplementedError: for a non-causal window, or a window longer than the block.
  """
  n = query.shape[1]
  if key.shape[1] != n:
    raise NotImplementedError(f"ring attention needs self-attention blocks of one length; "
                              f"got query block {n} and key block {key.shape[1]}.")
  mask = ops.AttentionMask.create(n, n, is_causal=is_causal,
                                  local_window_size=local_window_size)
  left, right = mask.left, mask.right
  if right not in (None, 0) or right is None and left is not None:
    raise NotImplementedError(
        f"sequence parallelism supports global attention and causal sliding windows; got "
        f"local_window_size={local_window_size!r} with is_causal={is_causal}.")
  causal = mask.is_causal
  if left is not None and left > n:
    raise NotImplementedError(
        f"the sliding window reaches {left} tokens back but each sequence shard holds "
        f"{n}; use fewer sequence shards (mesh 'sequence' axis) or a shorter window.")
  common = dict(scale=scale, logits_soft_cap=logits_soft_cap, implementation=implementation)
  if left is not None:
    out, lse = _halo_attention(query, key, value, q_segment_ids, kv_segment_ids,
                               axis_name=axis_name, left=left, common=common)
  else:
    out, lse = _ring(query, key, value, q_segment_ids, kv_segment_ids,
                     axis_name=axis_name, causal=causal, common=common)
  if sinks is not None:
    sink = sinks.astype(jnp.float32)[None, :, None]  # [1, heads, 1]
    total = _logaddexp(lse, jnp.broadcast_to(sink, lse.shape))
    out = out * _moveaxis_lse(jnp.exp(lse - _finite(total)))
    lse = total
  out = out.astype(query.dtype)
  return (out, lse) if return_residuals else out


def _ring(query, key, value, q_ids, kv_ids, *, axis_name, causal, common):
  """P steps of blockwise attention, passing key/value blocks to the next device."""
  size = lax.axis_size(axis_name)
  index = lax.axis_index(axis_name)
  perm = [(d, (d + 1) % size) for d in range(size)]
  with_ids = q_ids is not None

  def block(k, v, ids, *, diagonal):
    o, lse = ops.dot_product_attention(
        query, k, v, is_causal=causal and diagonal, q_segment_ids=q_ids,
        kv_segment_ids=ids if with_ids else None, return_residuals=True, **common)
    return o.astype(jnp.float32), lse

  out, lse = block(key, value, kv_ids, diagonal=True)
  if size == 1:
    return out, lse

  def step(carry, s):
    k, v, ids, out, lse = carry
    k, v = lax.ppermute(k, axis_name, perm), lax.ppermute(v, axis_name, perm)
    ids = lax.ppermute(ids, axis_name, perm) if with_ids else ids
    if causal:  # block j = i − s is in the future of every query here when s > i
      skip = lambda: (jnp.zeros_like(out), jnp.full_like(lse, -jnp.inf))
      o_s, lse_s = lax.cond(s <= index, lambda: block(k, v, ids, diagonal=False), skip)
    else:
      o_s, lse_s = block(k, v, ids, diagonal=False)
    out, lse = _merge(out, lse, o_s, lse_s)
    return (k, v, ids, out, lse), None

  ids0 = kv_ids if with_ids else jnp.zeros((), jnp.int32)
  (_, _, _, out, lse), _ = lax.scan(step, (key, value, ids0, out, lse),
                                    jnp.arange(1, size))
  return out, lse


def _halo_attention(query, key, value, q_ids, kv_ids, *, axis_name, left, common):
  """Causal window ≤ n: attend to `[previous block, own block]` (2n keys)."""
  size = lax.axis_size(axis_name)
  index = lax.axis_index(axis_name)
  batch, n = query.shape[:2]
  perm = [(d, d + 1) for d in range(size - 1)]  # device 0 receives zeros
  prev_k, prev_v = lax.ppermute(key, axis_name, perm), lax.ppermute(value, axis_name, perm)
  if q_ids is None:
    q_ids = jnp.zeros((batch, n), jnp.int32)
    kv_ids = q_ids
  prev_ids = lax.ppermute(kv_ids, axis_name, perm)
  prev_ids = jnp.where(index == 0, _NO_SEGMENT, prev_ids)
  k2 = jnp.concatenate([prev_k, key], axis=1)
  v2 = jnp.concatenate([prev_v, value], axis=1)
  ids2 = jnp.concatenate([prev_ids, kv_ids], axis=1)
  out, lse = ops.dot_product_attention(
      query, k2, v2, is_causal=True, local_window_size=(left, 0), q_segment_ids=q_ids,
      kv_segment_ids=ids2, return_residuals=True, **common)
  return out.astype(jnp.float32), lse


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _logaddexp(a, b):
  """log(e^a + e^b) with a zero (not NaN) gradient where both are −inf."""
  m = _finite(jnp.maximum(a, b))
  total = jnp.exp(a - m) + jnp.exp(b - m)
  seen = total > 0
  return jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def _moveaxis_lse(x):
  """`[batch, heads, q]` → `[batch, q, heads, 1]`, to scale outputs."""
  return jnp.moveaxis(x, 1, 2)[..., None]


def _merge(out_a, lse_a, out_b, lse_b):
  """Merges two partial attentions over disjoint key sets by their log-sum-exps."""
  lse = _logaddexp(lse_a, lse_b)
  safe = _finite(lse)
  out = (out_a * _moveaxis_lse(jnp.exp(lse_a - safe))
         + out_b * _moveaxis_lse(jnp.exp(lse_b - safe)))
  return out, lse
