"""Long convolutions (Hyena, BaseConv) against float64 NumPy references of Zoology's code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import layers
from attn_jax.layers.long_conv import ImplicitFilter, causal_long_conv
from tests.layers import util


def _direct_conv(u, h, segment_ids=None):
  """float64 `y[b, t] = Σ_{s ≤ t, same segment} h[t − s] u[b, s]` over trailing channels."""
  u, h = np.asarray(u, np.float64), np.asarray(h, np.float64)
  y = np.zeros_like(u)
  for b in range(u.shape[0]):
    for t in range(u.shape[1]):
      for s in range(t + 1):
        if segment_ids is None or segment_ids[b, s] == segment_ids[b, t]:
          y[b, t] += h[t - s] * u[b, s]
  return y


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("segments", [False, True])
def test_causal_long_conv_matches_direct_sum(dtype, segments):
  rng = np.random.default_rng(0)
  u = rng.standard_normal((2, 13, 3)).astype(np.float32)
  h = rng.standard_normal((16, 3)).astype(np.float32)
  ids = np.array([[0] * 5 + [1] * 8, [4] * 13]) if segments else None
  y = causal_long_conv(jnp.asarray(u, dtype), jnp.asarray(h), ids)
  expected = _direct_conv(np.asarray(jnp.asarray(u, dtype), np.float64), h[:13], ids)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_implicit_filter_encoding_and_modulation():
  f = ImplicitFilter(4, "embed", max_len=11, order=8, rngs=nnx.Rngs(0))
  z, t = f.encoding(11)
  s = np.arange(11)
  np.testing.assert_allclose(t[:, 0], s / 10, rtol=1e-6)  # t = s / (max_len − 1)
  angle = 1e-4 * 2 * np.pi * s / 11  # one band at frequency 1e-4, as Zoology's
  np.testing.assert_allclose(z, np.stack([s / 10, np.cos(angle), -np.sin(angle)], -1),
                             rtol=1e-6, atol=1e-7)
  # Channel c decays at |δ_c|, from log(0.01)/1.5 to log(0.01)/0.3.
  np.testing.assert_allclose(f.decay_rates, np.linspace(3.0701, 15.3506, 4), rtol=1e-4)
  assert f(7).shape == (7, 4)
  with pytest.raises(ValueError, match="max_len"):
    f(12)
  with pytest.raises(ValueError, match="emb_dim"):
    ImplicitFilter(4, "embed", max_len=8, emb_dim=4, rngs=nnx.Rngs(0))


def _params(m):
  return {jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param))}


def _filter64(m, length):
  """The filter of `m.long_filter` in float64, from its parameters, as Zoology's Filter."""
  f = m.long_filter
  z, t = (np.asarray(a, np.float64) for a in f.encoding(length))
  freq = np.asarray(f.frequency[...], np.float64)
  for kernel, bias in zip(f.kernels, f.biases):
    z = np.sin(freq * (z @ np.asarray(kernel[...], np.float64) + np.asarray(bias[...])))
  return z @ np.asarray(f.final[...], np.float64) * np.exp(-t * np.asarray(f.decay_rates))


def _short_conv64(conv, x):
  """Causal depthwise convolution with bias (PyTorch Conv1d, padding k − 1, truncated)."""
  kernel = np.asarray(conv.kernel[...], np.float64)
  size = kernel.shape[0]
  padded = np.concatenate([np.zeros((x.shape[0], size - 1) + x.shape[2:]), x], axis=1)
  y = sum(kernel[j] * padded[:, j:j + x.shape[1]] for j in range(size))
  return y + np.asarray(conv.bias[...], np.float64)


def _dense64(proj, x):
  kernel = np.asarray(proj.kernel[...], np.float64)
  y = np.tensordot(x, kernel, axes=proj.num_in)
  return y + np.asarray(proj.bias[...], np.float64)


@pytest.mark.parametrize("kernel_size", [3, -1])
def test_base_conv_matches_zoology_forward(kernel_size):
  m = util.build("base_conv", kernel_size=kernel_size)
  x = np.asarray(util.inputs(seed=5), np.float64)
  if kernel_size == -1:
    conv = _direct_conv(x, _filter64(m, x.shape[1])) + x  # fft_conv's `y + u`
  else:
    conv = _short_conv64(m.short_conv, x)
  expected = conv * _dense64(m.projection, x) + x
  y = util.forward(m, jnp.asarray(x, jnp.float32))
  assert util.rel_err(y, expected) < 1e-5


def test_hyena_matches_zoology_forward():
  m = util.build("hyena")
  x = np.asarray(util.inputs(seed=6), np.float64)
  z = _short_conv64(m.short_conv, _dense64(m.in_proj, x))  # [b, t, 3, heads, head_dim]
  x1, x2, v = z[:, :, 0], z[:, :, 1], z[:, :, 2]
  v = v * x1
  h = _filter64(m, x.shape[1])[:, None]
  y = (_direct_conv(v, h) + np.asarray(m.filter_bias[...]) * v) * x2
  expected = np.tensordot(y, np.asarray(m.out_proj.kernel[...], np.float64), axes=2)
  expected = expected + np.asarray(m.out_proj.bias[...])
  assert util.rel_err(util.forward(m, jnp.asarray(x, jnp.float32)), expected) < 1e-5


def test_base_conv_kernel_size_per_layer():
  make = lambda **o: layers.make_mixer("base_conv", d_model=8, num_heads=1,
                                       rngs=nnx.Rngs(0), max_len=16, **o)
  assert make(kernel_size=[3, -1], layer_index=0).short_conv.size == 3
  assert make(kernel_size=[3, -1], layer_index=1).long_filter is not None
  with pytest.raises(ValueError, match="kernel_size lists 2 layers"):
    make(kernel_size=[3, -1], layer_index=2)
  with pytest.raises(ValueError, match="kernel_size"):
    make(kernel_size=0)


@pytest.mark.parametrize("name", ["base_conv", "hyena"])
def test_decode_cache_cannot_outgrow_the_filter(name):
  m = util.build(name)
  with pytest.raises(ValueError, match="max_len"):
    m.init_cache(1, 17)
  with pytest.raises(ValueError, match="max_len"):
    util.forward(m, util.inputs(seq=17))
