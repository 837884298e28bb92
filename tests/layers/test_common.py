"""The shared pieces: RoPE, segment positions, the short convolution, norms, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from attn_jax.layers import common


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32) for _ in range(2))
  score = lambda i, j: float(jnp.sum(
      common.apply_rope(q, jnp.array([[i]])) * common.apply_rope(k, jnp.array([[j]]))))
  assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
  # Linear interpolation: position p with scaling s rotates like position p / s.
  scaled = common.apply_rope(q, jnp.array([[6]]), scaling=2.0)
  np.testing.assert_allclose(scaled, common.apply_rope(q, jnp.array([[3]])), atol=1e-6)


def test_segment_positions_restart_per_segment():
  ids = jnp.array([[4, 4, 4, 9, 9, 1], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(common.segment_positions(ids, 2, 6),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def _abstract(module_fn):
  """A module built abstractly, parameters filled with fixed random numbers."""
  graphdef, state = nnx.split(nnx.eval_shape(module_fn))
  rng = np.random.default_rng(1)
  return nnx.merge(graphdef, jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), state))


def test_short_conv_is_causal_depthwise_and_resumable():
  conv = _abstract(lambda: common.ShortConv((3,), ("heads",), size=3, rngs=nnx.Rngs(0),
                                            activation=common.identity))
  x = np.random.default_rng(2).standard_normal((1, 7, 3)).astype(np.float32)
  w = np.asarray(conv.kernel[...])
  padded = np.concatenate([np.zeros((1, 2, 3), np.float32), x], axis=1)
  expected = sum(padded[:, j:j + 7] * w[j] for j in range(3))
  y, state = conv(jnp.asarray(x))
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_allclose(state, x[:, -2:])
  # Resuming from the state equals running the whole sequence.
  y_head, head_state = conv(jnp.asarray(x[:, :4]))
  y_tail, _ = conv(jnp.asarray(x[:, 4:]), state=head_state)
  np.testing.assert_allclose(np.concatenate([y_head, y_tail], 1), expected, atol=1e-5)
  # With segment ids no tap reaches into the previous segment.
  ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
  y_seg, _ = conv(jnp.asarray(x), segment_ids=ids)
  np.testing.assert_allclose(y_seg[:, 3:], conv(jnp.asarray(x[:, 3:]))[0], atol=1e-5)


def test_norms():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 4)), jnp.float32)
  rms = common.Norm((4,), ("head_dim",), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(jnp.mean(rms(x) ** 2, -1), 1.0, atol=1e-4)
  group = common.Norm((3, 4), ("heads", "head_dim"), kind="layer", rngs=nnx.Rngs(0))
  y = group(x)
  np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-5)
  whole = common.Norm((3, 4), ("heads", "head_dim"), axes=2, use_scale=False,
                      rngs=nnx.Rngs(0))
  np.testing.assert_allclose(jnp.mean(whole(x) ** 2, (-2, -1)), 1.0, atol=1e-4)
  with pytest.raises(ValueError, match="kind"):
    common.Norm((4,), ("head_dim",), kind="batch", rngs=nnx.Rngs(0))


def test_parameters_shard_by_rules_under_a_mesh():
  mesh = jax.make_mesh((2, 4), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rules = (("embed", None), ("heads", "tensor"), ("head_dim", None))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    proj = common.Projection((8,), (4, 2), ("embed", "heads", "head_dim"),
                             rngs=nnx.Rngs(0))
  assert proj.kernel[...].sharding.spec == P(None, "tensor", None)
  # Without a mesh the same layer builds unsharded, names kept as metadata.
  plain = common.Projection((8,), (4, 2), ("embed", "heads", "head_dim"), rngs=nnx.Rngs(0))
  assert plain.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
  assert len(plain.kernel[...].sharding.device_set) == 1


def test_checks_name_the_argument():
  with pytest.raises(ValueError, match="window_size must be a positive int"):
    common.check_positive_int("window_size", 0)
  with pytest.raises(ValueError, match="num_kv_heads \\(3\\) must divide num_heads"):
    common.check_divides("num_kv_heads", 3, "num_heads", 4)
  with pytest.raises(ValueError, match="head_dim must be even"):
    common.check_rope(5, 10000.0, 1.0)
