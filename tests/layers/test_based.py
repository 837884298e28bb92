"""Based: Taylor-feature linear attention summed with sliding-window softmax attention."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util


def test_window_branch_masks_and_linear_branch_reaches_everything():
  m = util.build("based")  # window 3
  x = util.inputs(seed=21)
  x_changed = x.at[:, 0].add(1.0)
  window, changed_window = util.forward(m.window, x), util.forward(m.window, x_changed)
  np.testing.assert_allclose(changed_window[:, 3:], window[:, 3:], atol=1e-6)
  assert not np.allclose(changed_window[:, 2], window[:, 2])
  # The whole mixer still sees token 0 from the last position: the linear branch.
  whole, changed_whole = util.forward(m, x), util.forward(m, x_changed)
  assert np.abs(np.asarray(changed_whole - whole)[:, -1]).min() > 0


def test_taylor_branch_is_normalised_second_order_exp():
  m = util.build("based", short_conv_size=None, window_size=None)
  assert m.window is None
  x = util.inputs(seed=22)
  xn = np.asarray(x, np.float64)
  proj = lambda p: np.einsum("bsd,dhe->bshe", xn, util.param(p.kernel))
  q, k, v = proj(m.linear.query), proj(m.linear.key), proj(m.linear.value)
  s = np.einsum("bihd,bjhd->bhij", q, k) / 2.0  # feature_dim 4: qᵀk / √4
  weights = (1 + s + s ** 2 / 2) * np.tril(np.ones((util.SEQ, util.SEQ)))
  o = np.einsum("bhij,bjhe->bihe", weights, v) / (
      weights.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
  expected = np.einsum("bshe,hed->bsd", o, util.param(m.linear.out.kernel))
  assert util.rel_err(util.forward(m, x), expected) < 1e-5


def test_cache_does_not_grow():
  m = util.build("based")
  cache = m.init_cache(util.BATCH, max_len=10_000)
  assert cache["window"]["key"].shape[1] == 3
  assert cache["linear"]["state"].shape == (util.BATCH, util.HEADS, 1 + 4 + 10, 9)


@pytest.mark.parametrize("options, argument", [
    (dict(window_size=0), "window_size"),
    (dict(feature_dim=0), "feature_dim"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("based", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
