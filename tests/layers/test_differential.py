"""Differential attention is the difference of two softmax attentions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax.layers.differential import lambda_init
from tests.layers import util


def _softmax_attention(q, k, v):
  """Causal softmax attention in numpy: q, k `[b, s, h, d]`, v `[b, s, h, e]`."""
  logits = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
  seq = q.shape[1]
  logits = np.where(np.tril(np.ones((seq, seq), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhij,bjhe->bihe", p, v)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared_lambda", "per_head_lambda"])
def test_output_is_difference_of_two_softmax_attentions(per_head):
  m = util.build("diff", rope=False, layer_index=3, lambda_per_head=per_head)
  assert m.lambda_q1.shape == ((util.HEADS, 4) if per_head else (4,))
  x = util.inputs(seed=9)
  xn = np.asarray(x, np.float64)
  q = np.einsum("bsd,dhte->bshte", xn, util.param(m.query.kernel))
  k = np.einsum("bsd,dhte->bshte", xn, util.param(m.key.kernel))
  v = np.einsum("bsd,dhe->bshe", xn, util.param(m.value.kernel))
  a1 = _softmax_attention(q[..., 0, :], k[..., 0, :], v)
  a2 = _softmax_attention(q[..., 1, :], k[..., 1, :], v)
  dot = lambda a, b: np.sum(util.param(a) * util.param(b), -1)
  lam = (np.exp(dot(m.lambda_q1, m.lambda_k1)) - np.exp(dot(m.lambda_q2, m.lambda_k2))
         + lambda_init(3))
  o = a1 - np.broadcast_to(lam, (util.HEADS,))[:, None] * a2
  o = o / np.sqrt(np.mean(o ** 2, -1, keepdims=True) + 1e-5) * util.param(m.norm.scale)
  o = o * (1 - lambda_init(3))
  expected = np.einsum("bshe,hed->bsd", o, util.param(m.out.kernel))
  assert util.rel_err(util.forward(m, x), expected) < 1e-5


def test_lambda_init_schedule():
  assert lambda_init(0) == pytest.approx(0.2)
  assert lambda_init(10) == pytest.approx(0.8 - 0.6 * math.exp(-3.0))


def test_cache_holds_two_key_halves_and_double_width_values():
  cache = util.build("diff").init_cache(util.BATCH, 5)
  assert cache["key"].shape == (util.BATCH, 5, util.HEADS, 2, 4)
  assert cache["value"].shape == (util.BATCH, 5, util.HEADS, 8)


@pytest.mark.parametrize("options, argument", [
    (dict(layer_index=-1), "layer_index"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=3), "head_dim must be even"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("diff", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)
