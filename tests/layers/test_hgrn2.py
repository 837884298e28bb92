"""HGRN2: a gated linear RNN with outer-product state, keys tied to the forget gate."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_first_state_is_one_minus_forget_times_input():
  m = util.build("hgrn2")  # lower bound 0.2, convolution width 3 without activation
  x = util.inputs(seed=19).at[:, 1:].set(0.0)
  _, caches = util.decode_all(m, x, m.init_cache(util.BATCH))
  states = np.asarray(caches["state"], np.float64)
  x0 = np.asarray(x[:, 0], np.float64)
  # At the first token a width-3 convolution is its last tap times the input.
  f = np.einsum("bd,dhe->bhe", x0, util.param(m.forget.kernel)) * util.param(
      m.convs["f"].kernel)[-1]
  i = np.einsum("bd,dhe->bhe", x0, util.param(m.input.kernel)) * util.param(
      m.convs["i"].kernel)[-1]
  g = 0.2 + 0.8 * _sigmoid(f)
  np.testing.assert_allclose(states[0], (1 - g)[..., None] * i[:, :, None], rtol=1e-4)
  # Once the convolution sees only zeros, f = 0: the state decays by 0.2 + 0.8 · ½.
  np.testing.assert_allclose(states[3], 0.6 * states[2], rtol=1e-5)


def test_lower_bound_bounds_the_forget_gate():
  m = util.build("hgrn2")
  f = np.linspace(-30, 30, 7, dtype=np.float32)
  g = np.exp(np.asarray(m.log_forget(f)))
  assert np.all(g >= 0.2 - 1e-6) and np.all(g <= 1)


@pytest.mark.parametrize("options, argument", [
    (dict(lower_bound=1.0), "lower_bound"),
    (dict(lower_bound=-0.1), "lower_bound"),
    (dict(causal=False), "causal=False is not supported"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("hgrn2", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
