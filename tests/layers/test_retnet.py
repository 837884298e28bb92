"""Retention: a fixed, different decay per head (multi-scale)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax.layers.retnet import retention_log_decay
from tests.layers import util


def test_retention_decays_per_head():
  gamma = np.exp(retention_log_decay(4))
  np.testing.assert_allclose(gamma, 1 - 2.0 ** -np.arange(5, 9))
  m = util.build("retnet")
  x = util.inputs(seed=16).at[:, 1].set(0.0)  # a token, then nothing
  _, caches = util.decode_all(m, x, m.init_cache(util.BATCH))
  states = np.asarray(caches["state"], np.float64)  # [step, batch, heads, k, v]
  np.testing.assert_allclose(states[1], gamma[:2, None, None] * states[0], rtol=1e-5)
  assert states.shape[-1] == 2 * states.shape[-2]  # values twice as wide as keys


def test_group_norm_is_per_head():
  m = util.build("retnet")
  assert m.group_norm.scale.shape == (util.HEADS, 2 * util.D_MODEL // util.HEADS)
  assert m.group_norm.axes == (-1,)


@pytest.mark.parametrize("options, argument", [
    (dict(value_factor=0), "value_factor"),
    (dict(causal=False), "causal=False is not supported"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("retnet", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)

