"""Feature maps φ for linear attention, applied to queries and keys before the op.

Each takes `[..., dim]` and returns `[..., feature_dim]` in the input's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def identity(x):
  """φ(x) = x (Lightning/TransNormer, RetNet, GLA use raw or normalised q, k)."""
  return x


def elu_plus_one(x):
  """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020, "Transformers are RNNs")."""
  return jax.nn.elu(x) + 1


def relu(x):
  """φ(x) = max(x, 0) (e.g. cosFormer's and ReLU linear attention's feature map)."""
  return jax.nn.relu(x)


def taylor_exp(x):
  """Second-order Taylor map of exp(qᵀk) (Based; Arora et al., 2024).

  φ(x) = [1, x / d^{1/4}, vec(x xᵀ) / (√2 · √d)] so that
  φ(q)ᵀφ(k) = 1 + qᵀk/√d + (qᵀk)²/(2d) ≈ exp(qᵀk/√d). Feature dim 1 + d + d².
  """
  d = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  ones = jnp.ones((*x.shape[:-1], 1), dtype=x.dtype)
  return jnp.concatenate(
      [ones, x / d ** 0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], axis=-1)


FEATURE_MAPS = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "taylor_exp": taylor_exp,
}
