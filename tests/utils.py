"""Helpers shared by the tests: random inputs and error measures."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

_counter = itertools.count()


def fresh_keys(n):
  """n new PRNG keys, different on every call (fresh inputs for every check)."""
  return jax.random.split(jax.random.key(next(_counter) + 1000), n)


def normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def rel_err(x, ref):
  """‖x − ref‖ / ‖ref‖ in float64 (RMS-relative error); NaN never passes."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if np.isnan(x).any():
    return np.inf
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
