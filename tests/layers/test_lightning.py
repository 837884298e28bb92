"""Lightning attention: TransNormerLLM's decay schedule, per head and layer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax.layers.lightning import alibi_slopes, lightning_log_decay
from tests.layers import util


def test_decay_schedule():
  np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(alibi_slopes(2), [2.0 ** -4, 2.0 ** -8])
  assert len(alibi_slopes(6)) == 6
  # Layer l of L scales the slopes by 1 − l/(L − 1) (+1e-5): the last layer barely decays.
  np.testing.assert_allclose(lightning_log_decay(2, 1, 3),
                             -np.array(alibi_slopes(2)) * (0.5 + 1e-5))
  np.testing.assert_allclose(lightning_log_decay(2, 2, 3), -np.array(alibi_slopes(2)) * 1e-5)


def test_state_decays_by_the_head_decay():
  m = util.build("lightning")  # layer 1 of 3
  x = util.inputs(seed=15).at[:, 1].set(0.0)  # a token, then nothing
  _, caches = util.decode_all(m, x, m.init_cache(util.BATCH))
  states = np.asarray(caches["state"], np.float64)  # [step, batch, heads, k, v]
  decay = np.exp(np.array(lightning_log_decay(util.HEADS, 1, 3)))
  np.testing.assert_allclose(states[1], decay[:, None, None] * states[0], rtol=1e-5)
  assert np.all(jnp.abs(states[0]) > 0)


@pytest.mark.parametrize("options, argument", [
    (dict(layer_index=3, num_layers=3), "layer_index"),
    (dict(num_layers=0), "num_layers"),
    (dict(causal=False), "causal=False is not supported"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("lightning", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
