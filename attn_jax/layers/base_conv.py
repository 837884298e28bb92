"""BaseConv (Arora et al., 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models", arXiv:2312.04927): a gated convolution, the simplest mixer that Zoology
proves can emulate any other gated convolution.

    y = conv(u) ⊙ (W u + b) + u

`conv` is either a short causal depthwise convolution (kernel_size ≥ 1, with bias) or an
implicit long convolution (kernel_size = -1: Hyena's filter, `long_conv.ImplicitFilter`
with order 16, plus a skip of weight 1: `conv(u) = h * u + u`). As Zoology's
`zoology/mixers/base_conv.py` (`use_act=False`); `kernel_size` may be a list with one
entry per layer, picked by `layer_index`, as in Zoology's Figure 2 configs
(`[3, -1, 3, -1]`: short then long). The `+ u` skip is the mixer's own, inside the
block's residual, as there.

BaseConv has no heads: `num_heads` is accepted (every mixer takes it) and unused.
Causal self-attention only (a convolution reads one sequence, in order).
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.layers.common import Projection, ShortConv, identity
from attn_jax.layers.long_conv import (ImplicitFilter, causal_long_conv, history_init,
                                       history_step)
from attn_jax.layers.mixer import Mixer


class BaseConv(Mixer):
  """Zoology's BaseConv mixer.

  Args:
    d_model, num_heads, rngs: as every mixer (num_heads unused).
    kernel_size: width of the short convolution, or -1 for the implicit long convolution;
      or a list of these, one per layer (`layer_index` picks).
    max_len: the longest sequence the long convolution serves (Zoology's `l_max`; its
      filter depends on it).
    filter_order: width of the long filter's MLP (16, Zoology's default).
    layer_index: this layer's index in the model (set by the model builder).
    dtype, param_dtype: compute and parameter dtypes.

  Decode cache: the short convolution's last `kernel_size - 1` inputs, or for the long
  convolution every input so far (`[batch, max_len, d_model]`).
  """

  NAME = "base_conv"
  PATTERNS = ("causal_self",)

  def __init__(self, d_model, num_heads, *, rngs, kernel_size=3, max_len=2048,
               filter_order=16, layer_index=0, causal=True, dtype=None,
               param_dtype=jnp.float32):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    if isinstance(kernel_size, (list, tuple)):
      if not 0 <= layer_index < len(kernel_size):
        raise ValueError(f"kernel_size lists {len(kernel_size)} layers' sizes but this is "
                         f"layer {layer_index}: give one size per layer, or one int.")
      kernel_size = kernel_size[layer_index]
    if not isinstance(kernel_size, int) or not (kernel_size >= 1 or kernel_size == -1):
      raise ValueError(f"kernel_size must be a positive int (short convolution) or -1 "
                       f"(implicit long convolution); got {kernel_size!r}.")
    self.kernel_size = kernel_size
    self.max_len = max_len
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.projection = Projection((d_model,), (d_model,), ("embed", "embed"),
                                 use_bias=True, **p)
    if kernel_size == -1:
      self.long_filter = ImplicitFilter(d_model, "embed", max_len=max_len,
                                        order=filter_order, **p)
      self.short_conv = None
    else:
      self.short_conv = ShortConv((d_model,), ("embed",), size=kernel_size,
                                  activation=identity, use_bias=True, **p)
      self.long_filter = None

  def _combine(self, u, conv):
    return (conv * self.projection(u).astype(jnp.float32) + u).astype(u.dtype)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """`x [batch, seq, d_model]` → like x."""
    self._pattern(x, context, segment_ids, context_segment_ids)
    u = self._cast(x)
    if self.long_filter is not None:
      h = self.long_filter(u.shape[1])
      conv = causal_long_conv(u, h, segment_ids) + u.astype(jnp.float32)
    else:
      conv, _ = self.short_conv(u, segment_ids=segment_ids)
    return self._combine(u, conv.astype(jnp.float32))

  def init_cache(self, batch_size, max_len):
    """The convolution's inputs so far, and `pos`."""
    self._check_decode()
    dtype = self.dtype or jnp.float32
    if self.long_filter is not None:
      if max_len > self.max_len:
        raise ValueError(f"init_cache(max_len={max_len}) exceeds the mixer's max_len "
                         f"({self.max_len}): its long filter is that long.")
      conv = history_init(batch_size, max_len, (self.d_model,), dtype)
    else:
      conv = self.short_conv.init_state(batch_size, dtype)
    return {"conv": conv, "pos": jnp.zeros((), jnp.int32)}

  def decode(self, x_t, cache):
    """One token: `x_t [batch, 1, d_model]` → `(y_t, new cache)`."""
    self._check_decode()
    u = self._cast_step(x_t)
    if self.long_filter is not None:
      h = self.long_filter(cache["conv"].shape[1])
      conv, state = history_step(cache["conv"], u, h, cache["pos"])
      conv = conv + u.astype(jnp.float32)
    else:
      conv, state = self.short_conv(u, state=cache["conv"])
    return self._combine(u, conv.astype(jnp.float32)), {"conv": state,
                                                          "pos": cache["pos"] + 1}
