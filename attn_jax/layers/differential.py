"""Differential attention (Ye et al., 2024, "Differential Transformer", arXiv:2410.05258).

Each head splits its query and key into two halves and takes the difference of two
softmax maps over one shared value:

    DiffAttn(X) = (softmax(Q₁K₁ᵀ/√d) − λ · softmax(Q₂K₂ᵀ/√d)) V,
    λ = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init,
    λ_init = 0.8 − 0.6 · exp(−0.3 · layer_index)        (layer_index counted from 0)

followed by a per-head RMSNorm ("GroupNorm") of the 2d-wide head output, a factor
`(1 − λ_init)`, and the output projection. Head dim d defaults to `d_model / (2 · heads)`
as in the paper, so the parameter count matches a Transformer with 2·heads heads.

Reproduced: the two maps, the re-parameterised λ with the paper's λ_init schedule, the
shared-scale RMSNorm and (1 − λ_init); GQA by `num_kv_heads`; RoPE on both halves; all
four patterns (each map is an `ops.dot_product_attention` call, so every mask, packing
and the decode cache come from it). λ is one set of vectors `[head_dim]` per layer,
shared by its heads, as in the official code (`microsoft/unilm`,
`Diff-Transformer/multihead_diffattn.py`); `lambda_per_head=True` learns one set per head
(`[heads, head_dim]`), which checkpoints saved before the shared default have.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from attn_jax import ops
from attn_jax.layers.common import (Norm, Projection, apply_rope, check_divides,
                                    check_positive_int, check_rope, partitioned)
from attn_jax.layers.mixer import Mixer, attend_views, kv_cache_init, kv_cache_update


def lambda_init(layer_index):
  """The paper's λ_init schedule, `0.8 − 0.6 · exp(−0.3 · layer_index)` (0-based)."""
  return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialAttention(Mixer):
  """Differential attention; all four patterns.

  Args:
    d_model, num_heads, rngs: as every mixer.
    num_kv_heads: key/value heads (GQA), must divide num_heads.
    head_dim: width d of each half (default `d_model // (2 · num_heads)`); values are 2d.
    layer_index: the layer's depth (0-based), for λ_init.
    lambda_per_head: one λ per head instead of the paper's one per layer.
    causal, rope, rope_base, rope_scaling, dtype, param_dtype, implementation: as
      `SoftmaxAttention`.
    window_size: None (global) or w ≥ 1 keys including the query itself, as
      `SoftmaxAttention` (`ops.sliding_window`).

  Decode cache: `key [batch, slots, kv_heads, 2, head_dim]` and
  `value [batch, slots, kv_heads, 2 · head_dim]`: `4 · kv_heads · head_dim` per token;
  a KV-cache policy shrinks it as `SoftmaxAttention`'s.
  """

  NAME = "diff"
  CACHE_POLICY = True

  def __init__(self, d_model, num_heads, *, rngs, num_kv_heads=None, head_dim=None,
               layer_index=0, lambda_per_head=False, causal=True, window_size=None,
               rope=True, rope_base=10000.0, rope_scaling=1.0, dtype=None,
               param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    self.num_kv_heads = check_positive_int(
        "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
    check_divides("num_kv_heads", self.num_kv_heads, "num_heads", num_heads)
    self.head_dim = self._head_dim(head_dim, divisor=2)
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
      raise ValueError(f"layer_index must be an int ≥ 0; got {layer_index!r}.")
    self.lambda_init = lambda_init(layer_index)
    self.window_size = check_positive_int("window_size", window_size, allow_none=True)
    self.rope, self.rope_base, self.rope_scaling = bool(rope), rope_base, rope_scaling
    if self.rope:
      check_rope(self.head_dim, rope_base, rope_scaling)
    self.implementation = implementation
    h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
    proj = dict(rngs=rngs, param_dtype=param_dtype)
    self.query = Projection((d_model,), (h, 2, d), ("embed", "heads", None, "head_dim"),
                            **proj)
    self.key = Projection((d_model,), (kvh, 2, d), ("embed", "kv_heads", None, "head_dim"),
                          **proj)
    self.value = Projection((d_model,), (kvh, 2 * d), ("embed", "kv_heads", "head_dim"),
                            **proj)
    self.out = Projection((h, 2 * d), (d_model,), ("heads", "head_dim", "embed"), **proj)
    self.lambda_per_head = bool(lambda_per_head)
    shape, names = ((h, d), ("heads", "head_dim")) if self.lambda_per_head else ((d,),
                                                                                 ("head_dim",))
    init = partitioned(nnx.initializers.normal(0.1), names)
    self.lambda_q1 = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.lambda_k1 = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.lambda_q2 = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.lambda_k2 = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.norm = Norm((2 * d,), ("head_dim",), rngs=rngs, eps=1e-5, param_dtype=param_dtype)

  def lambda_(self):
    """`[heads]` float32: λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init (the same for
    every head unless `lambda_per_head`)."""
    dot = lambda a, b: jnp.sum(a[...].astype(jnp.float32) * b[...].astype(jnp.float32), -1)
    lam = (jnp.exp(dot(self.lambda_q1, self.lambda_k1))
           - jnp.exp(dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)
    return jnp.broadcast_to(lam, (self.num_heads,))

  def _qkv(self, x, src, positions):
    q, k, v = self.query(x), self.key(src), self.value(src)
    if self.rope and positions is not None:
      rope = lambda t: apply_rope(t.reshape(t.shape[:2] + (-1, self.head_dim)), positions,
                                  base=self.rope_base, scaling=self.rope_scaling
                                  ).reshape(t.shape)
      q, k = rope(q), rope(k)
    return q, k, v

  def _maps(self, q, k, v, heads=None, **mask):
    """`(A₁ − λ A₂) V` float32 for the query heads `heads` (int32; None: all) of q."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    attend = lambda i: ops.dot_product_attention(q[..., i, :], k[..., i, :], v,
                                                 implementation=self.implementation,
                                                 **mask)
    lam = self.lambda_().astype(jnp.float32)
    lam = (lam if heads is None else jnp.take(lam, heads))[:, None]
    return attend(0).astype(jnp.float32) - lam * attend(1).astype(jnp.float32)

  def _output(self, o, dtype):
    """Per-head norm, `(1 − λ_init)`, output projection."""
    o = self.norm(o) * (1.0 - self.lambda_init)
    return self.out(o.astype(dtype))

  def _differential(self, q, k, v, **mask):
    return self._output(self._maps(q, k, v, **mask), q.dtype)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """`x [batch, seq, d_model]` (and `context`) → `[batch, seq, d_model]`."""
    x, src, kv_ids, positions = self._sources(x, context, segment_ids, context_segment_ids)
    q, k, v = self._qkv(x, src, positions)
    return self._differential(q, k, v, is_causal=self.causal,
                              local_window_size=ops.sliding_window(self.window_size,
                                                                   causal=self.causal),
                              q_segment_ids=segment_ids, kv_segment_ids=kv_ids)

  def init_cache(self, batch_size, max_len, dtype=None, policy=None):
    """KV cache of `max_len` slots (`min(max_len, window_size)` with a window), shrunk by
    a KV-cache `policy` as `SoftmaxAttention.init_cache`."""
    self._check_decode()
    kvh, d = self.num_kv_heads, self.head_dim
    return kv_cache_init(batch_size, max_len, {"key": (kvh, 2, d), "value": (kvh, 2 * d)},
                         dtype or self.dtype or jnp.float32, window_size=self.window_size,
                         policy=policy, num_kv_heads=kvh)

  def decode(self, x_t, cache):
    """One token against the cache: `(y_t [batch, 1, d_model], new cache)`."""
    self._check_decode()
    x_t = self._cast_step(x_t)
    batch = x_t.shape[0]
    q, k, v = self._qkv(x_t, x_t, jnp.broadcast_to(cache["pos"], (batch, 1)))
    cache, views = kv_cache_update(cache, {"key": k, "value": v},
                                   window_size=self.window_size)
    q_ids = jnp.ones((batch, 1), jnp.int32)
    o = attend_views(q, views, self.num_kv_heads, lambda q, view, heads: self._maps(
        q, view.entries["key"], view.entries["value"], heads, q_segment_ids=q_ids,
        kv_segment_ids=view.kv_ids))
    return self._output(o, q.dtype), cache
