"""GLA: a data-dependent gate that decays each key channel separately."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util


def test_gate_decays_each_key_channel():
  m = util.build("gla")  # short convolution of width 3
  # One token, then zeros: from step 3 on the convolution sees only zeros, so q, k, v
  # vanish and the state only decays, by the gate of a zero input: σ(b)^(1/τ).
  x = util.inputs(seed=17).at[:, 1:].set(0.0)
  _, caches = util.decode_all(m, x, m.init_cache(util.BATCH))
  states = np.asarray(caches["state"], np.float64)  # [step, batch, heads, key, value]
  gate = (1 / (1 + np.exp(-util.param(m.decay_up.bias)))) ** (1 / 16)  # [heads, key]
  np.testing.assert_allclose(states[3], gate[..., None] * states[2], rtol=1e-5)
  assert np.ptp(gate) > 0  # channels decay at different rates


def test_gate_depends_on_the_input_and_is_low_rank():
  m = util.build("gla")
  assert m.decay_down.kernel.shape == (util.D_MODEL, 4)
  g = np.asarray(m.log_decay(util.inputs(seed=18)))
  assert g.shape == (util.BATCH, util.SEQ, util.HEADS, 4) and np.all(g <= 0)
  assert np.ptp(g, axis=1).min() > 0  # varies over tokens


@pytest.mark.parametrize("options, argument", [
    (dict(gate_rank=0), "gate_rank"),
    (dict(gate_temperature=0.0), "gate_temperature"),
    (dict(causal=False), "causal=False is not supported"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("gla", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
