"""Linear attention (Katharopoulos) and Efficient Attention (Shen) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from tests.layers import util


def _elu_plus_one(x):
  return np.where(x > 0, x + 1, np.exp(x))


def _heads(m, x, context=None):
  xn = np.asarray(x, np.float64)
  src = xn if context is None else np.asarray(context, np.float64)
  proj = lambda p, t: np.einsum("bsd,dhe->bshe", t, util.param(p.kernel))
  return proj(m.query, xn), proj(m.key, src), proj(m.value, src)


def _out(m, o):
  return np.einsum("bshe,hed->bsd", o, util.param(m.out.kernel))


@pytest.mark.parametrize("causal", [True, False])
def test_normalised_elu_linear_attention(causal):
  m = util.build("linear", short_conv_size=None, causal=causal)
  x = util.inputs(seed=11)
  q, k, v = _heads(m, x)
  fq, fk = _elu_plus_one(q), _elu_plus_one(k)
  weights = np.einsum("bihd,bjhd->bhij", fq, fk)
  if causal:
    weights = weights * np.tril(np.ones((util.SEQ, util.SEQ)))
  o = np.einsum("bhij,bjhe->bihe", weights, v) / (weights.sum(-1).transpose(0, 2, 1)[..., None]
                                                  + 1e-6 * 8 ** 0.5)
  assert util.rel_err(util.forward(m, x), _out(m, o)) < 1e-5


def test_noncausal_cross_attention_with_a_longer_context():
  m = util.build("linear", short_conv_size=None, causal=False)
  x, context = util.inputs(seed=12), util.inputs(seq=13, seed=13)
  q, k, v = _heads(m, x, context)
  fq, fk = _elu_plus_one(q), _elu_plus_one(k)
  state = np.einsum("bjhd,bjhe->bhde", fk, v)
  norm = np.einsum("bihd,bjhd->bih", fq, fk)[..., None]
  o = np.einsum("bihd,bhde->bihe", fq, state) / (norm + 1e-6 * 8 ** 0.5)
  assert util.rel_err(util.forward_cross(m, x, context), _out(m, o)) < 1e-5


def test_causal_cross_attention_needs_equal_lengths():
  m = util.build("linear")
  with pytest.raises(ValueError, match="context must have the length of x"):
    m(util.inputs(), context=util.inputs(seq=5))


def test_efficient_attention_is_softmax_features_times_softmax_keys():
  m = util.build("efficient")
  x = util.inputs(seed=14)
  q, k, v = _heads(m, x)
  softmax = lambda t, axis: np.exp(t - t.max(axis, keepdims=True)) / np.exp(
      t - t.max(axis, keepdims=True)).sum(axis, keepdims=True)
  rho_q, rho_k = softmax(q, -1), softmax(k, 1)  # over features; over positions
  o = np.einsum("bihd,bhde->bihe", rho_q, np.einsum("bjhd,bjhe->bhde", rho_k, v))
  assert util.rel_err(util.forward(m, x), _out(m, o)) < 1e-5


def test_efficient_attention_is_noncausal_only():
  with pytest.raises(ValueError, match="causal=True is not supported by 'efficient'"):
    layers.make_mixer("efficient", d_model=16, num_heads=2, rngs=nnx.Rngs(0), causal=True)


@pytest.mark.parametrize("options, argument", [
    (dict(feature_map="softplus"), "feature_map"),
    (dict(short_conv_size=0), "short_conv_size"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("linear", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
