"""Based (Arora et al., 2024, "Simple linear attention language models balance the
recall-throughput tradeoff", arXiv:2402.18668).

Based pairs two cheap mixers that cover each other's weakness:

* global linear attention with the 2nd-order Taylor feature map of exp,
  `φ(q)ᵀφ(k) = 1 + qᵀk/√d + (qᵀk)²/(2d)`, on small projected q, k (feature_dim 16, so
  φ has 1 + 16 + 136 = 153 features: the symmetric second-order terms once, as Based's
  `TaylorExp`), normalised as in Katharopoulos et al.: it recalls
  across the whole context with a constant-size state;
* exact softmax attention in a small sliding window (64–128 tokens) for precise local
  shifts and comparisons.

Here the two run on the same input and their outputs are summed, in one mixer whose
decode cache holds both the linear state and the window's ring buffer (memory constant in
the sequence length). The paper interleaves them as separate layers (with gated
convolutions); `window_size=None` leaves the Taylor branch alone, so a model can
interleave `"based"` and `"swa"` layers exactly as the paper does. Optional short
convolution on q, k, v (Based's BaseConv layers are a model-level block, not reproduced).

Patterns: causal and non-causal self-attention (the two branches read one sequence).
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.layers.common import Projection, check_positive_int
from attn_jax.layers.linear import qkv_convs, qkv_projections
from attn_jax.layers.mixer import LinearAttentionInputs, Mixer, RecurrentMixer
from attn_jax.layers.softmax import SlidingWindowAttention
from attn_jax.ops import feature_maps


class TaylorLinearAttention(RecurrentMixer):
  """Based's linear attention branch: Taylor features of q, k in `feature_dim`, normalised.

  Decode state: `[batch, heads, 1 + f + f(f+1)/2, head_dim + 1]` float32, f = feature_dim
  (153 features at f = 16, as Based counts them).
  """

  NAME = "based"
  PATTERNS = ("causal_self", "noncausal_self")

  def __init__(self, d_model, num_heads, *, rngs, feature_dim=16, head_dim=None,
               causal=True, short_conv_size=None, chunk_size=64, dtype=None,
               param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, short_conv_size=short_conv_size,
                     normalize=True, scale=1.0, chunk_size=chunk_size,
                     implementation=implementation, dtype=dtype)
    self.feature_dim = check_positive_int("feature_dim", feature_dim)
    self.head_dim = self._head_dim(head_dim)
    h, f, hd = self.num_heads, self.feature_dim, self.head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.query, self.key, self.value = qkv_projections(d_model, h, f, hd, **p)
    self.out = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"), **p)
    self.convs = qkv_convs(self.short_conv_size, (h, f), (h, hd), **p)

  def _state_shape(self):
    f = self.feature_dim
    return self.num_heads, 1 + f + f * (f + 1) // 2, self.head_dim

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q, k, v, conv_state = self._conv_qkv(x, src, segment_ids, conv_state)
    phi = feature_maps.taylor_exp
    return LinearAttentionInputs(phi(q), phi(k), v, conv_state)

  def _output(self, o, x, aux):
    return self.out(o.astype(x.dtype))


class Based(Mixer):
  """Based: Taylor linear attention + sliding-window softmax attention, summed.

  Args:
    d_model, num_heads, rngs: as every mixer (both branches use num_heads heads).
    feature_dim: projected q/k width before the Taylor map (16).
    window_size: the softmax branch's window (64): w keys including the query itself
      (`SlidingWindowAttention`, `ops.sliding_window`), or None for the linear branch
      alone.
    head_dim: value head dim of both branches (default d_model // num_heads).
    causal: causal (default) or bidirectional self-attention.
    short_conv_size: optional causal convolution on the linear branch's q, k, v.
    chunk_size, dtype, param_dtype, implementation: passed to the branches; `rope`,
      `rope_base`, `num_kv_heads` go to the window branch.

  Decode cache: `{"linear": state, "window": ring buffer of window_size slots, "pos"}`.
  """

  NAME = "based"
  PATTERNS = ("causal_self", "noncausal_self")
  CACHE_POLICY = True

  def __init__(self, d_model, num_heads, *, rngs, feature_dim=16, window_size=64,
               head_dim=None, causal=True, short_conv_size=None, chunk_size=64,
               dtype=None, param_dtype=jnp.float32, implementation=None, **window_options):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    if window_size is not None:
      check_positive_int("window_size", window_size)
    common = dict(rngs=rngs, head_dim=head_dim, causal=causal, dtype=dtype,
                  param_dtype=param_dtype, implementation=implementation)
    self.linear = TaylorLinearAttention(d_model, num_heads, feature_dim=feature_dim,
                                        short_conv_size=short_conv_size,
                                        chunk_size=chunk_size, **common)
    self.window = None if window_size is None else SlidingWindowAttention(
        d_model, num_heads, window_size=window_size, **common, **window_options)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """`x [batch, seq, d_model]` → `[batch, seq, d_model]`; self-attention only."""
    self._pattern(x, context, segment_ids, context_segment_ids)
    y = self.linear(x, segment_ids=segment_ids)
    if self.window is not None:
      y = y + self.window(x, segment_ids=segment_ids)
    return y

  def init_cache(self, batch_size, max_len, policy=None):
    """The linear branch's state and the window's ring buffer (under the KV-cache
    `policy`, as `SlidingWindowAttention.init_cache`)."""
    self._check_decode()
    cache = {"linear": self.linear.init_cache(batch_size), "pos": jnp.zeros((), jnp.int32)}
    if self.window is not None:
      cache["window"] = self.window.init_cache(batch_size, max_len, policy=policy)
    return cache

  def decode(self, x_t, cache):
    """One token through both branches: `(y_t [batch, 1, d_model], new cache)`."""
    self._check_decode()
    y, linear = self.linear.decode(x_t, cache["linear"])
    new = {"linear": linear, "pos": cache["pos"] + 1}
    if self.window is not None:
      y_window, new["window"] = self.window.decode(x_t, cache["window"])
      y = y + y_window
    return y, new
