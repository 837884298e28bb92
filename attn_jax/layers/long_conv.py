"""Long convolutions for Hyena and BaseConv: the causal convolution and the implicit filter.

A long convolution mixes every earlier token of a channel through a filter as long as the
sequence, `y_t = Σ_{s ≤ t} h_{t−s} ⊙ u_s`. Hyena (Poli et al., 2023) parametrises the
filter implicitly: a small MLP with sine activations maps a positional encoding of each
lag to one filter value per channel, and an exponential window makes it decay with the
lag, so the number of parameters does not grow with the sequence. Follows Zoology's code
(`zoology/mixers/hyena.py: Filter`, `zoology/mixers/convolution.py:
ImplicitLongConvolution`): positional encoding `[t, cos(2π f s / L), −sin(2π f s / L)]`
with t = s / (L − 1) and `(emb_dim − 1) / 2` bands, Linear → Sin → (Linear → Sin) ×
`inner_layers` → Linear (no bias), one trainable frequency vector shared by the sines,
and the fixed modulation `exp(−t |δ_c|)` with δ spread from log(target)/slow_decay_pct to
log(target)/fast_decay_pct over the channels. Weights start as Zoology's models start
them (its `_init_weights` reaches every `nn.Linear`, the filter's too): normal with std
0.02, biases zero. The positional encoding is a constant here; Hyena trains it at a
learning rate of 1e-5, which we leave out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.layers.common import check_positive_int, partitioned, segment_positions


def causal_long_conv(u, h, segment_ids=None):
  """`y[b, t, c] = Σ_{s ≤ t} h[t − s, c] · u[b, s, c]`, in float32.

  Args:
    u: `[batch, seq, *channels]`.
    h: `[≥ seq, *channels]`, the filter by lag (its first seq lags are used).
    segment_ids: None, or `[batch, seq]` integers: s then runs over t's segment only.

  Returns:
    `[batch, seq, *channels]` float32. Without segment ids by FFT (size 2·seq, exact
    zero padding, O(seq log seq)); with them by one step per lag (O(seq²), for packed
    training of moderate lengths).
  """
  seq = u.shape[1]
  u = u.astype(jnp.float32)
  h = h[:seq].astype(jnp.float32)
  if segment_ids is None:
    n = 2 * seq
    spectrum = jnp.fft.rfft(u, n=n, axis=1) * jnp.fft.rfft(h, n=n, axis=0)[None]
    return jnp.fft.irfft(spectrum, n=n, axis=1)[:, :seq]
  # Lag l reaches token t from t − l, inside t's segment iff l ≤ t's position in it.
  position = segment_positions(segment_ids, *segment_ids.shape)
  extra = (1,) * (u.ndim - 2)

  def add_lag(lag, y):
    shifted = jnp.roll(u, lag, axis=1)
    inside = (position >= lag).reshape(position.shape + extra)
    return y + jnp.where(inside, shifted, 0.0) * h[lag]

  return jax.lax.fori_loop(0, seq, add_lag, jnp.zeros_like(u))


class ImplicitFilter(nnx.Module):
  """Hyena's implicit long filter: `filter(length)` → `[length, channels]` float32.

  Args:
    channels: filter channels; `channel_name` their logical axis ("embed", "head_dim").
    max_len: the longest sequence (Zoology's `l_max`): lag s is encoded at t = s / (max_len
      − 1), so the filter depends on it, and no longer filter exists.
    order: width of the MLP (Hyena 64, BaseConv's implicit convolution 16).
    emb_dim: width of the positional encoding, odd ≥ 3 (3).
    inner_layers: hidden Linear → Sin layers after the first (2).
    frequency: initial frequency of the sines (1).
    fast_decay_pct, slow_decay_pct, target: the modulation: channel c's window falls to
      `target` at t = the channel's decay fraction, spread from slow to fast.
    init_std: standard deviation of the initial weights (Zoology's 0.02).
  """

  def __init__(self, channels, channel_name, *, max_len, rngs, order=64, emb_dim=3,
               inner_layers=2, frequency=1.0, fast_decay_pct=0.3, slow_decay_pct=1.5,
               target=1e-2, init_std=0.02, param_dtype=jnp.float32):
    self.channels = check_positive_int("channels", channels)
    self.max_len = check_positive_int("max_len", max_len)
    order = check_positive_int("filter_order", order)
    self.emb_dim = check_positive_int("emb_dim", emb_dim)
    if emb_dim < 3 or emb_dim % 2 == 0:
      raise ValueError(f"emb_dim must be odd and ≥ 3 (time, then cosine and sine bands); "
                       f"got {emb_dim}.")
    inner_layers = check_positive_int("inner_layers", inner_layers + 1) - 1
    if not (0 < fast_decay_pct and 0 < slow_decay_pct and 0 < target < 1):
      raise ValueError(f"need fast_decay_pct, slow_decay_pct > 0 and 0 < target < 1; got "
                       f"{fast_decay_pct}, {slow_decay_pct}, {target}.")
    widths = [self.emb_dim] + [order] * (inner_layers + 1)

    def param(init, shape, names):
      return nnx.Param(partitioned(init, names)(rngs.params(), shape, param_dtype))

    normal = nnx.initializers.normal(init_std)
    self.kernels = nnx.List([param(normal, (a, b), (None, None))
                             for a, b in zip(widths[:-1], widths[1:])])
    self.biases = nnx.List([param(nnx.initializers.zeros, (b,), (None,))
                            for b in widths[1:]])
    self.final = param(normal, (order, self.channels), (None, channel_name))
    self.frequency = param(nnx.initializers.constant(frequency), (order,), (None,))
    fast, slow = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
    self.decay_rates = tuple(np.abs(np.linspace(slow, fast, self.channels)).tolist())

  def encoding(self, length):
    """`([length, emb_dim], t [length, 1])`: the positional encoding of lags 0 … length−1."""
    t = np.linspace(0.0, 1.0, self.max_len)[:length, None]
    bands = (self.emb_dim - 1) // 2
    angle = 2 * np.pi * np.arange(self.max_len)[:length, None] / self.max_len
    f = np.linspace(1e-4, bands - 1, bands)[None]
    z = np.concatenate([t, np.cos(f * angle), -np.sin(f * angle)], axis=-1)
    return jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32)

  def __call__(self, length):
    if length > self.max_len:
      raise ValueError(f"sequence length {length} exceeds the long convolution's max_len "
                       f"({self.max_len}); build the mixer with max_len ≥ {length}.")
    z, t = self.encoding(length)
    frequency = self.frequency[...].astype(jnp.float32)
    for kernel, bias in zip(self.kernels, self.biases):
      z = jnp.sin(frequency * (z @ kernel[...].astype(jnp.float32)
                               + bias[...].astype(jnp.float32)))
    h = z @ self.final[...].astype(jnp.float32)
    return h * jnp.exp(-t * jnp.asarray(self.decay_rates, jnp.float32))


def history_init(batch_size, max_len, channels, dtype):
  """A decode buffer of every input so far: zeros `[batch, max_len, *channels]`."""
  return jnp.zeros((check_positive_int("batch_size", batch_size),
                    check_positive_int("max_len", max_len)) + tuple(channels), dtype)


def history_step(history, u_t, h, pos):
  """One decode step of `causal_long_conv`: writes u_t (`[batch, 1, *channels]`) at slot
  `pos` and returns `(y_t [batch, 1, *channels] float32, new history)`. Past the
  buffer's end (pos ≥ max_len) there is no filter to apply: y_t is NaN."""
  max_len = history.shape[1]
  history = jax.lax.dynamic_update_slice_in_dim(history, u_t.astype(history.dtype), pos,
                                                axis=1)
  lag = pos - jnp.arange(max_len)  # slot s holds token s, reached at lag pos − s
  taps = jnp.take(h.astype(jnp.float32), jnp.clip(lag, 0, h.shape[0] - 1), axis=0)
  taps = jnp.where((lag >= 0).reshape((max_len,) + (1,) * (h.ndim - 1)), taps, 0.0)
  y = jnp.sum(history.astype(jnp.float32) * taps[None], axis=1, keepdims=True)
  return jnp.where(pos < max_len, y, jnp.nan), history
