"""Keeping a non-finite input to the outputs that see it (the XLA paths' guarantee,
docs/reliability.md): products run on finite copies, since a mask applied as a
multiplication by 0 turns a NaN or Inf anywhere in the tile into NaN, and each op puts
NaN back, through `where`, exactly where its mask says the bad row is seen."""

from __future__ import annotations

import jax.numpy as jnp


def zero_nonfinite(x):
  """`(x with its non-finite entries zeroed, [b, s, h] bool: the rows that held one)` for
  x `[b, s, h, d]`."""
  finite = jnp.isfinite(x)
  return jnp.where(finite, x, 0), ~jnp.all(finite, axis=-1)
