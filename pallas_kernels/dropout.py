"""Inverted dropout, the one mask rule every dropout in attn_jax follows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x, rate: float, key):
  """`x` with each element zeroed with probability `rate` (the mask drawn from the PRNG
  `key`) and the rest divided by 1 - rate, so that its expectation is `x`; same shape and
  dtype."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))
