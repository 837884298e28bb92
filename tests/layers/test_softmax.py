"""Softmax and sliding-window attention: masks, options, GQA/MQA, the window cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util


def test_causal_outputs_ignore_later_tokens():
  m = util.build("softmax")
  x = util.inputs(seed=5)
  y = util.forward(m, x)
  y_changed = util.forward(m, x.at[:, -1].add(1.0))
  np.testing.assert_allclose(y_changed[:, :-1], y[:, :-1], atol=1e-6)
  assert not np.allclose(y_changed[:, -1], y[:, -1])


def test_sliding_window_masks_tokens_outside_the_window():
  m = util.build("swa")  # window 3: query p sees p - 2 … p
  x = util.inputs(seed=6)
  y = util.forward(m, x)
  y_changed = util.forward(m, x.at[:, 0].add(1.0))
  np.testing.assert_allclose(y_changed[:, 3:], y[:, 3:], atol=1e-6)
  assert not np.allclose(y_changed[:, 2], y[:, 2])


def test_sliding_window_cache_holds_only_the_window():
  m = util.build("swa")
  cache = m.init_cache(util.BATCH, max_len=1000)
  assert cache["key"].shape == (util.BATCH, 3, util.HEADS, util.D_MODEL // util.HEADS)
  # Decoding past the ring buffer's length is covered by the registry test (8 > 3).


def test_all_options_together_decode_like_the_parallel_path():
  # MQA, qk-norm, soft cap, sinks, rope scaling and a non-default base.
  m = util.build("softmax", num_kv_heads=1, qk_norm=True, logits_soft_cap=2.0, sinks=True,
                 rope_base=500.0, rope_scaling=2.0)
  x = util.inputs(seed=7)
  cache = m.init_cache(util.BATCH, util.SEQ)
  assert cache["key"].shape == (util.BATCH, util.SEQ, 1, util.D_MODEL // util.HEADS)
  y_steps, _ = util.decode_all(m, x, cache)
  assert util.rel_err(y_steps, util.forward(m, x)) < 1e-5


def test_nope_is_permutation_equivariant_without_a_causal_mask():
  m = util.build("softmax", rope=False, causal=False)
  x = util.inputs(seed=8)
  perm = np.array([3, 1, 7, 0, 2, 6, 5, 4])
  np.testing.assert_allclose(util.forward(m, x[:, perm]), util.forward(m, x)[:, perm],
                             atol=1e-5)


@pytest.mark.parametrize("options, argument", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(window_size=0), "window_size"),
    (dict(window_size=-4), "window_size"),
    (dict(head_dim=5), "head_dim must be even"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    (dict(rope_base=1.0), "rope_base"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("softmax", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)


def test_swa_needs_a_window():
  for window in (None, 0):
    with pytest.raises(ValueError, match="window_size"):
      layers.make_mixer("swa", d_model=16, num_heads=2, rngs=nnx.Rngs(0),
                        window_size=window)


def test_decode_checks_its_input():
  m = util.build("softmax")
  cache = m.init_cache(util.BATCH, 4)
  with pytest.raises(ValueError, match="x_t must be"):
    m.decode(jnp.zeros((util.BATCH, 2, util.D_MODEL)), cache)
  with pytest.raises(ValueError, match="no decode path"):
    util.build("softmax", causal=False).init_cache(util.BATCH, 4)
