"""Hyena (Poli et al., 2023, "Hyena Hierarchy: Towards Larger Convolutional Language
Models", arXiv:2302.10866), order 2, as in Zoology's `zoology/mixers/hyena.py`:

    x1, x2, v = split(shortconv₃(W_in u + b_in))         (3 · d_model channels)
    y = W_out ((h * (v ⊙ x1) + D ⊙ (v ⊙ x1)) ⊙ x2) + b_out

`h` is the implicit long filter (`long_conv.ImplicitFilter`, order 64), applied as a
causal FFT convolution; D (`filter_bias`, standard normal at the start) is its skip.
With `num_heads` > 1 the channels split into heads of `d_model / num_heads` and the filter
has one channel per head dimension, shared by the heads (Zoology's reference runs one
head; its reshape does not separate several). Dropout is 0 there and left out here.

Causal self-attention only (a causal convolution reads one sequence, in order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers.common import Projection, ShortConv, identity, partitioned
from attn_jax.layers.long_conv import (ImplicitFilter, causal_long_conv, history_init,
                                       history_step)
from attn_jax.layers.mixer import Mixer


class Hyena(Mixer):
  """The Hyena operator of order 2.

  Args:
    d_model, num_heads, rngs: as every mixer; num_heads must divide d_model.
    max_len: the longest sequence (Zoology's `l_max`; the filter depends on it).
    filter_order: width of the implicit filter's MLP (64).
    short_conv_size: width of the short convolution over the three branches (3).
    dtype, param_dtype: compute and parameter dtypes.

  Decode cache: the short convolution's last `short_conv_size - 1` inputs
  (`[batch, size - 1, 3, heads, head_dim]`) and every gated value so far
  (`[batch, max_len, heads, head_dim]`): a long convolution has no constant-size state.
  """

  NAME = "hyena"
  PATTERNS = ("causal_self",)

  def __init__(self, d_model, num_heads, *, rngs, max_len=2048, filter_order=64,
               short_conv_size=3, causal=True, dtype=None, param_dtype=jnp.float32):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    self.head_dim = self._head_dim(None)
    self.max_len = max_len
    h, hd = self.num_heads, self.head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.in_proj = Projection((d_model,), (3, h, hd), ("embed", None, "heads", "head_dim"),
                              use_bias=True, **p)
    self.short_conv = ShortConv((3, h, hd), (None, "heads", "head_dim"),
                                size=short_conv_size, activation=identity, use_bias=True,
                                **p)
    self.long_filter = ImplicitFilter(hd, "head_dim", max_len=max_len, order=filter_order,
                                      **p)
    self.filter_bias = nnx.Param(partitioned(nnx.initializers.normal(1.0), ("head_dim",))(
        rngs.params(), (hd,), param_dtype))
    self.out_proj = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"),
                               use_bias=True, **p)

  def _branches(self, u, segment_ids, state):
    """`(x2, v ⊙ x1, new short-conv state)`, the first two `[batch, seq, heads, head_dim]`."""
    z, state = self.short_conv(self.in_proj(u), segment_ids=segment_ids, state=state)
    x1, x2, v = z[:, :, 0], z[:, :, 1], z[:, :, 2]
    return x2, v * x1, state

  def _output(self, conv, gated, x2, dtype):
    skip = self.filter_bias[...].astype(jnp.float32) * gated.astype(jnp.float32)
    y = (conv + skip) * x2.astype(jnp.float32)
    return self.out_proj(y.astype(dtype))

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """`x [batch, seq, d_model]` → like x."""
    self._pattern(x, context, segment_ids, context_segment_ids)
    u = self._cast(x)
    x2, gated, _ = self._branches(u, segment_ids, None)
    h = self.long_filter(u.shape[1])[:, None]  # [seq, 1, head_dim]: shared by the heads
    conv = causal_long_conv(gated, h, segment_ids)
    return self._output(conv, gated, x2, u.dtype)

  def init_cache(self, batch_size, max_len):
    """The short convolution's last inputs, the gated values so far, and `pos`."""
    self._check_decode()
    if max_len > self.max_len:
      raise ValueError(f"init_cache(max_len={max_len}) exceeds the mixer's max_len "
                       f"({self.max_len}): its long filter is that long.")
    dtype = self.dtype or jnp.float32
    return {"conv": self.short_conv.init_state(batch_size, dtype),
            "history": history_init(batch_size, max_len, (self.num_heads, self.head_dim),
                                    dtype),
            "pos": jnp.zeros((), jnp.int32)}

  def decode(self, x_t, cache):
    """One token: `x_t [batch, 1, d_model]` → `(y_t, new cache)`."""
    self._check_decode()
    u = self._cast_step(x_t)
    x2, gated, conv_state = self._branches(u, None, cache["conv"])
    h = self.long_filter(cache["history"].shape[1])[:, None]  # [max_len, 1, head_dim]
    conv, history = history_step(cache["history"], gated, h, cache["pos"])
    y = self._output(conv, gated, x2, u.dtype)
    return y, {"conv": conv_state, "history": history, "pos": cache["pos"] + 1}
