"""Argument checks shared by the attention ops; errors name the argument and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_qkv(query, key, value, *, grouped, step=False):
  """Raises ValueError unless query, key and value fit one attention call.

  Shapes: query `[batch, q_seq, q_heads, head_dim]`, key `[batch, seq, heads, head_dim]`,
  value `[batch, seq, value_heads, value_dim]`, all of one floating dtype (with
  `step=True`, one decoding token: the same without the seq axis). q_seq may differ from
  seq; the ops that need them equal say so first, with the reason.

  Args:
    query, key, value: the arrays.
    grouped: which side's heads are grouped over the key's, a multiple of them:
      "query" (GQA/MQA softmax attention: value_heads = heads, q_heads = r · heads) or
      "value" (linear attention's multi-value heads, as Mamba-2: q_heads = heads,
      value_heads = r · heads).
    step: the arrays are `[batch, heads, dim]`.
  """
  if grouped not in ("query", "value"):
    raise ValueError(f"grouped must be 'query' or 'value'; got {grouped!r}.")
  rank = 3 if step else 4
  layout = "[batch, heads, dim]" if step else "[batch, seq, heads, dim]"
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != rank:
      raise ValueError(f"{name} must be {layout} (rank {rank}); got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point; got {x.dtype}.")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f"query, key and value must share one dtype; got {query.dtype}, "
                     f"{key.dtype}, {value.dtype}.")
  # Compared as [batch, seq, heads, dim]; a step's arrays hold one token.
  q, k, v = ((x.shape[:1] + (1,) + x.shape[1:]) if step else x.shape
             for x in (query, key, value))
  if grouped == "value":
    if q[:1] + q[2:] != k[:1] + k[2:]:
      raise ValueError(f"query and key must agree in batch, heads and head_dim (the same "
                       f"shape{'' if step else ' but for seq'}); got query {query.shape} "
                       f"and key {key.shape}.")
    if v[:2] != k[:2]:
      raise ValueError(f"value must have the key's batch{'' if step else ' and seq'}; got "
                       f"key {key.shape} and value {value.shape}.")
  else:
    if k[:3] != v[:3]:
      raise ValueError(f"key and value must agree in [batch, kv_seq, kv_heads]; got key "
                       f"{key.shape} and value {value.shape}.")
    if (q[0], q[3]) != (k[0], k[3]):
      raise ValueError(f"query and key must agree in batch and head_dim; got query "
                       f"{query.shape} and key {key.shape}.")
  many = q[2] if grouped == "query" else v[2]
  if many % k[2]:
    raise ValueError(f"{grouped} heads ({many}) must be a multiple of the key heads "
                     f"({k[2]}); got key {key.shape} and {grouped} "
                     f"{(query if grouped == 'query' else value).shape}.")


def segment_ids_int32(*named):
  """Segment id arrays as int32 ids that are equal exactly where the given ids are.

  named: `(name, ids, shape)` triples, ids `[batch, seq]` integers. Segment ids are only
  compared for equality, so ids that do not fit int32 (64-bit ids, as document hashes
  often are) are renumbered (`unique`, one numbering for all arrays), never truncated:
  NumPy arrays on the host before JAX would cast them, 64-bit JAX arrays (x64 mode) on
  the device. Raises ValueError naming the array for a wrong shape or dtype."""
  arrays = []
  for name, ids, shape in named:
    ids = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    if ids.shape != tuple(shape) or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be integers of shape (batch, seq) = {tuple(shape)}; "
                       f"got {ids.dtype} {ids.shape}.")
    arrays.append(ids)
  int32 = np.iinfo(np.int32)
  host = not any(isinstance(ids, jax.Array) for ids in arrays)
  if host:
    wide = any(ids.size and (ids.min() < int32.min or ids.max() > int32.max)
               for ids in arrays)
  else:
    wide = any(jnp.iinfo(ids.dtype).max > int32.max or jnp.iinfo(ids.dtype).min < int32.min
               for ids in arrays)
  if not wide:  # each array on its own: no concatenation to reshard when sharded
    return tuple(jnp.asarray(ids).astype(jnp.int32) for ids in arrays)
  xp = np if host else jnp
  flat = xp.concatenate([xp.ravel(xp.asarray(ids)) for ids in arrays])
  flat = (np.unique(flat, return_inverse=True)[1] if host else
          jnp.unique(flat, return_inverse=True, size=flat.size)[1])
  flat = jnp.asarray(flat).reshape(-1).astype(jnp.int32)
  out, start = [], 0
  for ids in arrays:
    out.append(flat[start:start + ids.size].reshape(ids.shape))
    start += ids.size
  return tuple(out)
