"""Feature maps: shapes and the kernels they approximate."""

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.ops import feature_maps
from tests.utils import fresh_keys, normal


def test_taylor_exp_inner_product_is_second_order_exp():
  kq, kk = fresh_keys(2)
  q, k = normal(kq, (5, 16)), normal(kk, (5, 16))
  phi_q, phi_k = feature_maps.taylor_exp(q), feature_maps.taylor_exp(k)
  assert phi_q.shape == (5, 1 + 16 + 136)  # 153, Based's count (16·17/2 second-order)
  x = jnp.sum(q * k, -1) / 4.0  # qᵀk / √d
  np.testing.assert_allclose(jnp.sum(phi_q * phi_k, -1), 1 + x + x * x / 2, rtol=1e-5)


def test_positive_maps_are_positive():
  (key,) = fresh_keys(1)
  x = normal(key, (100,)) * 5
  assert (feature_maps.elu_plus_one(x) > 0).all()
  assert (feature_maps.relu(x) >= 0).all()
  assert (feature_maps.identity(x) == x).all()
  assert set(feature_maps.FEATURE_MAPS) == {"identity", "elu_plus_one", "relu", "taylor_exp"}
  jax.grad(lambda x: feature_maps.taylor_exp(x).sum())(x[:8])
