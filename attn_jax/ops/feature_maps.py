"""Feature maps φ for linear attention, applied to queries and keys before the op.

Each takes `[..., dim]` and returns `[..., feature_dim]` in the input's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


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
  """Second-order Taylor map of exp(qᵀk/√d) (Based; Arora et al., 2024).

  φ(x) = [1, x / d^{1/4}, (x_i x_j · w_ij)_{i ≤ j}], w_ii = 1 / (√2 · √d) and
  w_ij = 1 / √d for i < j (the symmetric second-order terms once, as Based's
  `TaylorExp`), so that φ(q)ᵀφ(k) = 1 + qᵀk/√d + (qᵀk)²/(2d) ≈ exp(qᵀk/√d).
  Feature dim 1 + d + d(d+1)/2: 153 for d = 16, where the full outer product
  (1 + d + d²) would carry 273 features in every state.
  """
  d = x.shape[-1]
  i, j = np.triu_indices(d)
  weight = np.where(i == j, 1.0 / (math.sqrt(2.0) * math.sqrt(d)), 1.0 / math.sqrt(d))
  pairs = x[..., i] * x[..., j] * weight.astype(x.dtype)
  ones = jnp.ones((*x.shape[:-1], 1), dtype=x.dtype)
  return jnp.concatenate([ones, x / d ** 0.25, pairs], axis=-1)


FEATURE_MAPS = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "taylor_exp": taylor_exp,
}
