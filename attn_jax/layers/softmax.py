"""Softmax attention (MHA, GQA, MQA) and sliding-window (local) attention.

`SoftmaxAttention` follows "Attention Is All You Need" (Vaswani et al., 2017) with the
now-standard options: grouped-query and multi-query attention by `num_kv_heads`
(Ainslie et al., 2023; Shazeer, 2019), rotary positions (Su et al., 2021) with a
configurable base and linear position interpolation (Chen et al., 2023) or none (NoPE,
Kazemnejad et al., 2023), per-head RMS qk-norm (Dehghani et al., 2023), logits soft-capping
(Gemma 2) and learned attention sinks (an extra softmax column per head with no value, as
in gpt-oss; Xiao et al., 2024 use a sink token instead).

`SlidingWindowAttention` is the same module with a window: each query sees itself and
the `window_size - 1` tokens before it (and, non-causally, as many after), the local
attention of Longformer (Beltagy et al., 2020), Mistral, Griffin (De et al., 2024),
Samba (Ren et al., 2024) and Based (Arora et al., 2024). Its decode cache is a ring
buffer of `window_size` slots, so its memory does not grow with the sequence.

Both take a KV-cache policy (`kv_policy`: StreamingLLM's sinks + window, DuoAttention's
per-head caches) in `init_cache`; a query then sees what both its window and the policy
keep.

Attention dropout (`dropout`, as Zoology's attention: 0.1) drops weights in training
only (`scope.dropout_rng`), on the XLA path (the kernels have none).

Not reproduced: biases in the softmax (ALiBi, T5), other RoPE
scalings (NTK, YaRN, Llama 3). Cross attention applies no RoPE (queries and context have
unrelated positions).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attn_jax import ops
from attn_jax.layers import scope
from attn_jax.layers.common import (Norm, Projection, apply_rope, check_divides,
                                    check_positive_int, check_rope, partitioned)
from attn_jax.layers.mixer import Mixer, attend_views, kv_cache_init, kv_cache_update


class SoftmaxAttention(Mixer):
  """Multi-head softmax attention; GQA/MQA by `num_kv_heads`. All four patterns.

  Args:
    d_model: model width; num_heads: query heads.
    rngs: `nnx.Rngs` for the parameters.
    num_kv_heads: key/value heads (default num_heads; 1 is MQA); must divide num_heads.
    head_dim: default `d_model // num_heads`.
    causal: causal (default) or bidirectional.
    window_size: None (global) or w ≥ 1 keys including the query itself: query p sees
      keys `p - w + 1 … p` (… `p + w - 1` when non-causal); `ops.sliding_window` turns it
      into the op's `local_window_size`, `(w - 1, 0)` causal (the op's int w means
      `(w, w)`).
    rope: rotary positions on q and k (self-attention only); False is NoPE.
    rope_base, rope_scaling: RoPE base θ and linear position-interpolation factor.
    qk_norm: RMS-normalise q and k per head before RoPE.
    logits_soft_cap: c > 0 caps logits as `c · tanh(logits / c)`.
    sinks: learn one sink logit per head.
    use_bias: biases on the q/k/v/out projections.
    dropout: attention dropout rate in [0, 1), applied in training only
      (`scope.dropout_rng`); > 0 runs the XLA path (no kernel has dropout).
    dtype: compute dtype (None: the input's); param_dtype: parameter dtype.
    implementation: passed to `ops.dot_product_attention`.

  Decode cache: `key`, `value` `[batch, slots, kv_heads, head_dim]` with `slots = max_len`
  (or `window_size`), `slot_pos`, `pos`: `2 · kv_heads · head_dim` numbers per token.
  A KV-cache policy shrinks it (`init_cache`).
  """

  NAME = "softmax"
  CACHE_POLICY = True

  def __init__(self, d_model, num_heads, *, rngs, num_kv_heads=None, head_dim=None,
               causal=True, window_size=None, rope=True, rope_base=10000.0,
               rope_scaling=1.0, qk_norm=False, logits_soft_cap=None, sinks=False,
               use_bias=False, dropout=0.0, dtype=None, param_dtype=jnp.float32,
               implementation=None):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
        0 <= dropout < 1):
      raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}.")
    self.dropout = float(dropout)
    self.num_kv_heads = check_positive_int(
        "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
    check_divides("num_kv_heads", self.num_kv_heads, "num_heads", num_heads)
    self.head_dim = self._head_dim(head_dim)
    self.window_size = check_positive_int("window_size", window_size, allow_none=True)
    self.rope, self.rope_base, self.rope_scaling = bool(rope), rope_base, rope_scaling
    if self.rope:
      check_rope(self.head_dim, rope_base, rope_scaling)
    if logits_soft_cap is not None and not logits_soft_cap > 0:
      raise ValueError(f"logits_soft_cap must be > 0 or None; got {logits_soft_cap!r}.")
    self.logits_soft_cap = logits_soft_cap
    self.implementation = implementation
    h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
    proj = dict(rngs=rngs, use_bias=use_bias, param_dtype=param_dtype)
    self.query = Projection((d_model,), (h, hd), ("embed", "heads", "head_dim"), **proj)
    self.key = Projection((d_model,), (kvh, hd), ("embed", "kv_heads", "head_dim"), **proj)
    self.value = Projection((d_model,), (kvh, hd), ("embed", "kv_heads", "head_dim"),
                            **proj)
    self.out = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"), **proj)
    norm = lambda: Norm((hd,), ("head_dim",), rngs=rngs, param_dtype=param_dtype)
    self.q_norm = norm() if qk_norm else None
    self.k_norm = norm() if qk_norm else None
    self.sinks = nnx.Param(partitioned(nnx.initializers.zeros, ("heads",))(
        rngs.params(), (h,), param_dtype)) if sinks else None

  def _qkv(self, x, src, positions):
    q, k, v = self.query(x), self.key(src), self.value(src)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope and positions is not None:
      rope = dict(base=self.rope_base, scaling=self.rope_scaling)
      q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
    return q, k, v

  def _attend(self, q, k, v, *, is_causal, window, q_ids, kv_ids, heads=None):
    """Attention of the query heads `heads` (int32; None: all) of q."""
    sinks = None if self.sinks is None else self.sinks[...]
    if sinks is not None and heads is not None:
      sinks = jnp.take(sinks, heads)
    rng = scope.dropout_key() if self.dropout else None  # None: not training
    dropout = {} if rng is None else dict(dropout_rate=self.dropout, dropout_rng=rng)
    return ops.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), is_causal=is_causal,
        local_window_size=window, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
        logits_soft_cap=self.logits_soft_cap, sinks=sinks,
        implementation=self.implementation, **dropout)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """`x [batch, seq, d_model]` (and `context [batch, ctx_seq, d_model]`) → like x."""
    x, src, kv_ids, positions = self._sources(x, context, segment_ids, context_segment_ids)
    q, k, v = self._qkv(x, src, positions)
    o = self._attend(q, k, v, is_causal=self.causal,
                     window=ops.sliding_window(self.window_size, causal=self.causal),
                     q_ids=segment_ids, kv_ids=kv_ids)
    return self.out(o)

  def init_cache(self, batch_size, max_len, dtype=None, policy=None):
    """KV cache of `max_len` slots (`min(max_len, window_size)` with a window).

    `policy`: None (full) or a layer's KV-cache policy (`kv_policy.layer_policy`); a
    sinks_window policy keeps `min(window_size, max_len, sinks + window)` slots, a
    per_head policy full slots for its KV heads and those for the others.
    """
    self._check_decode()
    shape = (self.num_kv_heads, self.head_dim)
    return kv_cache_init(batch_size, max_len, {"key": shape, "value": shape},
                         dtype or self.dtype or jnp.float32, window_size=self.window_size,
                         policy=policy, num_kv_heads=self.num_kv_heads)

  def decode(self, x_t, cache):
    """One token against the cache: `(y_t [batch, 1, d_model], new cache)`."""
    self._check_decode()
    x_t = self._cast_step(x_t)
    positions = jnp.broadcast_to(cache["pos"], (x_t.shape[0], 1))
    q, k, v = self._qkv(x_t, x_t, positions)
    cache, views = kv_cache_update(cache, {"key": k, "value": v},
                                   window_size=self.window_size)
    q_ids = jnp.ones((x_t.shape[0], 1), jnp.int32)
    # The cache's kv_ids mark exactly the visible keys, so no causal or window mask.
    o = attend_views(q, views, self.num_kv_heads, lambda q, view, heads: self._attend(
        q, view.entries["key"], view.entries["value"], is_causal=False, window=None,
        q_ids=q_ids, kv_ids=view.kv_ids, heads=heads))
    return self.out(o), cache


class SlidingWindowAttention(SoftmaxAttention):
  """Softmax attention over a sliding window (`window_size`, default 64, as in Based).

  Same arguments as `SoftmaxAttention`; `window_size` must be a positive int.
  """

  NAME = "swa"

  def __init__(self, d_model, num_heads, *, rngs, window_size=64, **options):
    if window_size is None:
      raise ValueError("window_size must be a positive int for sliding-window attention; "
                       "got None (use 'softmax' for global attention).")
    super().__init__(d_model, num_heads, rngs=rngs, window_size=window_size, **options)
