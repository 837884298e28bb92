"""Mamba-2: per-token scalar decay per head, one B/C group, convolution, D skip."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax.layers import mamba2
from tests.layers import util


def _softplus(x):
  return np.log1p(np.exp(x))


def _silu(x):
  return x / (1 + np.exp(-x))


def test_state_update_is_scalar_decay_plus_rank_one():
  m = util.build("mamba2")  # conv width 4 with bias, state_size 4
  # After four zero tokens the convolution outputs SiLU(bias): the update is exactly
  # S ← a S + B (Δ x)ᵀ with a = exp(−softplus(b_Δ) · exp(A_log)) one scalar per head.
  x = util.inputs(seed=20).at[:, 1:].set(0.0)
  _, caches = util.decode_all(m, x, m.init_cache(util.BATCH))
  states = np.asarray(caches["state"], np.float64)  # [step, batch, heads, N, P]
  dt = _softplus(util.param(m.dt_bias))  # [heads]
  a = np.exp(-dt * np.exp(util.param(m.a_log)))
  b = _silu(util.param(m.convs["b"].bias))[0]  # [N], shared by the heads
  xs = _silu(util.param(m.convs["x"].bias))  # [heads, P]
  expected = a[:, None, None] * states[4] + b[None, :, None] * (dt[:, None] * xs)[:, None]
  np.testing.assert_allclose(states[5], expected, rtol=1e-4, atol=1e-6)
  assert states.shape[-2:] == (m.state_size, m.head_dim)


def test_initialisers():
  key = jax.random.key(0)
  dt = _softplus(np.asarray(mamba2.dt_bias_init(0.01, 0.05)(key, (64,)), np.float64))
  assert np.all((0.01 - 1e-6 <= dt) & (dt <= 0.05 + 1e-6)) and np.ptp(dt) > 0.02
  a = np.exp(np.asarray(mamba2.a_log_init(key, (64,))))
  assert np.all((1 <= a) & (a <= 16))


@pytest.mark.parametrize("options, argument", [
    (dict(state_size=0), "state_size"),
    (dict(conv_size=0), "conv_size"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(expand=0), "expand"),
    (dict(causal=False), "causal=False is not supported"),
])
def test_bad_configuration(options, argument):
  with pytest.raises(ValueError, match=argument):
    layers.make_mixer("mamba2", d_model=16, num_heads=2, rngs=nnx.Rngs(0), **options)


def test_cross_attention_is_not_defined():
  m = util.build("mamba2")
  with pytest.raises(ValueError, match="causal_cross"):
    m(util.inputs(), context=util.inputs())
