"""Properties every registered mixer shares, one parametrised test per property."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util

NAMES = sorted(layers.REGISTRY)
EXPECTED = ["base_conv", "based", "diff", "efficient", "gla", "hgrn2", "hyena", "lightning",
            "linear", "mamba2", "mla", "retnet", "softmax", "swa"]


def test_registry_names():
  assert NAMES == EXPECTED


def test_unknown_name_is_a_value_error():
  with pytest.raises(ValueError, match="unknown mixer name 'flash'.*softmax"):
    layers.make_mixer("flash", d_model=16, num_heads=2, rngs=nnx.Rngs(0))


def test_unknown_option_is_a_value_error():
  with pytest.raises(ValueError, match="windw_size"):
    layers.make_mixer("gla", d_model=16, num_heads=2, rngs=nnx.Rngs(0), windw_size=3)


@nnx.jit
def _forward_and_grads(m, x):
  def loss(m):
    y = m(x)
    return jnp.mean(y ** 2), y
  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(m)
  return y, grads


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_finite_gradients(name):
  m = util.build(name)
  x = util.inputs()
  y, grads = _forward_and_grads(m, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.all(np.isfinite(y))
  # bf16 compute (shapes and dtypes by tracing; the numbers in test_bfloat16_compute).
  y_bf16 = nnx.eval_shape(lambda m, x: m(x.astype(jnp.bfloat16)), m, x)
  assert y_bf16.shape == x.shape and y_bf16.dtype == jnp.bfloat16
  params = nnx.state(m, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name", ["softmax", "lightning"])
def test_bfloat16_compute(name):
  m = util.build(name)
  x = util.inputs()
  m_bf16 = util.build(name, dtype=jnp.bfloat16)
  y_bf16 = util.forward(m_bf16, x)
  assert y_bf16.dtype == jnp.bfloat16
  assert util.rel_err(y_bf16, util.forward(m, x)) < 0.05


def test_real_initialisation():
  # The tests build mixers abstractly (util._build); here the initialisers run.
  m = layers.make_mixer("softmax", d_model=util.D_MODEL, num_heads=util.HEADS,
                        rngs=nnx.Rngs(0), **util.OPTIONS["softmax"])
  y = util.forward(m, util.inputs())
  assert y.shape == (util.BATCH, util.SEQ, util.D_MODEL) and np.all(np.isfinite(y))
  for kernel in (m.query.kernel, m.out.kernel):  # fan-in scaled: std ≈ 16^-0.5
    assert 0.15 < float(np.std(kernel[...])) < 0.4
  assert m.query.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


@pytest.mark.parametrize("name", NAMES)
def test_decode_reproduces_parallel(name):
  m = util.build(name)
  x = util.inputs(seed=1)
  if "causal_self" not in m.PATTERNS:
    with pytest.raises(ValueError, match="no decode path"):
      m.init_cache(util.BATCH, util.SEQ)
    return
  cache = m.init_cache(util.BATCH, util.SEQ + 2)
  assert int(cache["pos"]) == 0
  y_steps, caches = util.decode_all(m, x, cache)
  assert int(util.last(caches)["pos"]) == util.SEQ
  y = util.forward(m, x)
  assert util.rel_err(y_steps, y) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_packed_segments_equal_separate_sequences(name):
  m = util.build(name)
  x = util.inputs(seed=2)
  half = util.SEQ // 2
  ids = jnp.array([[3] * half + [7] * half, [0] * half + [1] * half], jnp.int32)
  packed = util.forward(m, x, ids)
  if m.causal:
    # A causal mixer's outputs on a prefix are those of the prefix alone, so the
    # full-length program serves both halves.
    first = util.forward(m, x)[:, :half]
    second = util.forward(m, jnp.roll(x, -half, axis=1))[:, :half]
  else:
    first, second = util.forward(m, x[:, :half]), util.forward(m, x[:, half:])
  assert util.rel_err(packed, jnp.concatenate([first, second], axis=1)) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_attention_patterns_run_or_raise(name):
  # Shapes by tracing; the numbers of the non-default patterns are checked per mechanism.
  cls = layers.REGISTRY[name]
  x, context = util.inputs(seed=3), util.inputs(seq=util.SEQ, seed=4)
  for pattern in layers.PATTERNS:
    causal = pattern.startswith("causal")
    cross = pattern.endswith("cross")
    if pattern not in cls.PATTERNS:
      with pytest.raises(ValueError, match="causal|context"):
        m = util.build(name, causal=causal)
        m(x, context=context if cross else None)
      continue
    m = util.build(name, causal=causal)
    y = nnx.eval_shape(lambda m, x, c: m(x, context=c), m, x, context if cross else None)
    assert y.shape == x.shape and y.dtype == x.dtype, pattern


@pytest.mark.parametrize("name", NAMES)
def test_parameters_carry_logical_axes(name):
  m = util.build(name)
  for path, p in jax.tree_util.tree_leaves_with_path(
      nnx.state(m, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
    names = p.get_metadata().get("out_sharding")
    assert names is not None and len(names) == p.ndim, jax.tree_util.keystr(path)
    assert set(names) <= set(layers.AXES) | {None}, (jax.tree_util.keystr(path), names)


@pytest.mark.parametrize("name", NAMES)
def test_heads_not_dividing_is_a_value_error(name):
  if name == "base_conv":  # no heads: num_heads is unused
    layers.make_mixer(name, d_model=16, num_heads=3, rngs=nnx.Rngs(0))
    return
  with pytest.raises(ValueError, match="num_heads"):
    layers.make_mixer(name, d_model=16, num_heads=3, rngs=nnx.Rngs(0),
                      **({"causal": False} if name == "efficient" else {}))


@pytest.mark.parametrize("name", NAMES)
def test_nonpositive_sizes_are_value_errors(name):
  with pytest.raises(ValueError, match="d_model"):
    layers.make_mixer(name, d_model=0, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads"):
    layers.make_mixer(name, d_model=16, num_heads=0, rngs=nnx.Rngs(0))
