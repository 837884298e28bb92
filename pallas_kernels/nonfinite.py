"""Keeping a non-finite input to the outputs that see it (the guarantee of
docs/reliability.md): products run on finite copies, since a mask applied as a
multiplication by 0 turns a NaN or Inf anywhere in the tile into NaN, and each op puts
NaN back, through `where`, exactly where its mask says the bad row is seen. The XLA paths
do this always; `attn_jax.ops.nonfinite_guard` does it around the kernels."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def zero_nonfinite(x):
  """`(x with its non-finite entries zeroed, [b, s, h] bool: the rows that held one)` for
  x `[b, s, h, d]`."""
  finite = jnp.isfinite(x)
  return jnp.where(finite, x, 0), ~jnp.all(finite, axis=-1)


def _seen_in_run(bad, resets):
  """`[batch, seq, heads]` bool: some token s ≤ t of t's run (segment) is `bad`; bad
  `[batch, seq, heads]`, resets `[batch, seq]` (True where a run starts)."""
  count = jnp.cumsum(bad.astype(jnp.int32), axis=1)
  before = count - bad  # bad tokens before t
  starts = resets.at[:, 0].set(True)[..., None]
  base = lax.cummax(jnp.where(starts, before, 0), axis=1)  # bad tokens before t's run
  return count > base


def mark_linear(out, final, bad_q, bad_kv, resets):
  """Causal linear attention's outputs with NaN where a bad row reaches: out
  `[b, s, h, v]` at the bad queries and from a bad key or value to the end of its run;
  the final state `[b, h, k, v]` when the last run holds a bad key or value. bad_q and
  bad_kv are `[b, s, h]` over the value heads."""
  seen = _seen_in_run(bad_kv, resets)
  out = jnp.where((bad_q | seen)[..., None], jnp.nan, out)
  final = jnp.where(seen[:, -1, :, None, None], jnp.nan, final)
  return out, final
