"""Multi-head latent attention (DeepSeek-AI, 2024, "DeepSeek-V2", arXiv:2405.04434, §2.1).

Keys and values are rebuilt from one low-rank latent per token, and only the latent is
cached:

    c_kv = RMSNorm(W_dkv x)                 [kv_lora_rank]       (cached)
    k_rope = RoPE(W_kr x)                   [rope_head_dim]      (cached, shared by heads)
    k_h = [W_uk,h c_kv ; k_rope],  v_h = W_uv,h c_kv
    c_q = RMSNorm(W_dq x) (when q_lora_rank is set),  q_h = [W_uq,h c_q ; RoPE(W_qr,h c_q)]

RoPE acts on a separate ("decoupled") slice of q and k, so W_uk can be absorbed into the
query when decoding: `q_hᵀ k_h = (W_uk,hᵀ q_nope,h)ᵀ c_kv + q_rope,hᵀ k_rope`. The parallel
path builds full keys and values (`ops.dot_product_attention` with head dims
`nope + rope` for q/k and `v_head_dim` for v); the decode path runs the absorbed form as
multi-query attention over the cached latents (one kv head of width
`kv_lora_rank + rope_head_dim`, values = the latents) and applies W_uv afterwards. The
cache holds `kv_lora_rank + rope_head_dim` numbers per token, against
`2 · heads · head_dim` for multi-head attention.

Reproduced: the compressions, decoupled RoPE, the latent norms, the absorbed decode, the
softmax scale `(nope + rope)^-0.5`. Not reproduced: DeepSeek's YaRN scaling of RoPE and of
the softmax scale. Cross attention uses no RoPE (the rope slices stay unrotated).
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax import ops
from attn_jax.layers import kv_policy
from attn_jax.layers.common import (Norm, Projection, apply_rope, check_positive_int,
                                    check_rope)
from attn_jax.layers.mixer import Mixer, kv_cache_init, kv_cache_update


class MultiHeadLatentAttention(Mixer):
  """DeepSeek-V2 multi-head latent attention; all four patterns.

  Args:
    d_model, num_heads, rngs: as every mixer.
    head_dim: the non-rotated q/k head dim (`qk_nope_head_dim`, default d_model // heads).
    rope_head_dim: the decoupled RoPE dim (default head_dim // 2, as d_h^R = d_h / 2).
    v_head_dim: value head dim (default head_dim).
    kv_lora_rank: latent width d_c (default 4 · head_dim, as 512 = 4 · 128).
    q_lora_rank: query compression d_c' (default None: a full-rank query projection, as
      DeepSeek-V2-Lite).
    causal, rope_base, rope_scaling, dtype, param_dtype, implementation: as
      `SoftmaxAttention`.

  Decode cache: `latent [batch, max_len, kv_lora_rank]`,
  `k_rope [batch, max_len, rope_head_dim]`, `slot_pos`, `pos`. A sinks_window KV-cache
  policy shrinks it; a per_head policy does not apply (every head reads the one latent).
  """

  NAME = "mla"
  CACHE_POLICY = True

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, rope_head_dim=None,
               v_head_dim=None, kv_lora_rank=None, q_lora_rank=None, causal=True,
               rope_base=10000.0, rope_scaling=1.0, dtype=None, param_dtype=jnp.float32,
               implementation=None):
    super().__init__(d_model, num_heads, causal=causal, dtype=dtype)
    self.head_dim = self._head_dim(head_dim)
    default = lambda value, fallback: fallback if value is None else value
    self.rope_head_dim = check_positive_int(
        "rope_head_dim", default(rope_head_dim, max(self.head_dim // 2, 2)))
    check_rope(self.rope_head_dim, rope_base, rope_scaling, name="rope_head_dim")
    self.v_head_dim = check_positive_int("v_head_dim", default(v_head_dim, self.head_dim))
    self.kv_lora_rank = check_positive_int("kv_lora_rank",
                                           default(kv_lora_rank, 4 * self.head_dim))
    self.q_lora_rank = check_positive_int("q_lora_rank", q_lora_rank, allow_none=True)
    self.rope_base, self.rope_scaling = rope_base, rope_scaling
    self.implementation = implementation
    h, nope, rope, r = self.num_heads, self.head_dim, self.rope_head_dim, self.kv_lora_rank
    p = dict(rngs=rngs, param_dtype=param_dtype)
    if self.q_lora_rank is None:
      self.q_down, self.q_norm = None, None
      self.q_up = Projection((d_model,), (h, nope + rope), ("embed", "heads", "head_dim"),
                             **p)
    else:
      self.q_down = Projection((d_model,), (self.q_lora_rank,), ("embed", "q_lora"), **p)
      self.q_norm = Norm((self.q_lora_rank,), ("q_lora",), **p)
      self.q_up = Projection((self.q_lora_rank,), (h, nope + rope),
                             ("q_lora", "heads", "head_dim"), **p)
    self.kv_down = Projection((d_model,), (r,), ("embed", "kv_lora"), **p)
    self.kv_norm = Norm((r,), ("kv_lora",), **p)
    self.k_rope = Projection((d_model,), (rope,), ("embed", "head_dim"), **p)
    self.k_up = Projection((r,), (h, nope), ("kv_lora", "heads", "head_dim"), **p)
    self.v_up = Projection((r,), (h, self.v_head_dim), ("kv_lora", "heads", "head_dim"),
                           **p)
    self.out = Projection((h, self.v_head_dim), (d_model,), ("heads", "head_dim", "embed"),
                          **p)
    self.scale = (nope + rope) ** -0.5

  def _rope(self, t, positions):
    if positions is None:
      return t
    return apply_rope(t, positions, base=self.rope_base, scaling=self.rope_scaling)

  def _query(self, x, positions):
    """`(q_nope [b, s, h, nope], q_rope [b, s, h, rope])`."""
    c = x if self.q_down is None else self.q_norm(self.q_down(x))
    q = self.q_up(c)
    return q[..., :self.head_dim], self._rope(q[..., self.head_dim:], positions)

  def _latent(self, src, positions):
    """`(c_kv [b, s, kv_lora_rank], k_rope [b, s, rope])`: what the cache holds."""
    k_rope = self._rope(self.k_rope(src)[:, :, None], positions)[:, :, 0]
    return self.kv_norm(self.kv_down(src)), k_rope

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None):
    """`x [batch, seq, d_model]` (and `context`) → `[batch, seq, d_model]`."""
    x, src, kv_ids, positions = self._sources(x, context, segment_ids, context_segment_ids)
    q_nope, q_rope = self._query(x, positions)
    latent, k_rope = self._latent(src, positions)
    k_nope, v = self.k_up(latent), self.v_up(latent)
    k_rope = jnp.broadcast_to(k_rope[:, :, None], k_nope.shape[:3] + k_rope.shape[-1:])
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, k_rope], axis=-1)
    o = ops.dot_product_attention(q, k, v, scale=self.scale, is_causal=self.causal,
                                  q_segment_ids=segment_ids, kv_segment_ids=kv_ids,
                                  implementation=self.implementation)
    return self.out(o)

  def init_cache(self, batch_size, max_len, dtype=None, policy=None):
    """The compressed cache: `kv_lora_rank + rope_head_dim` numbers per token.

    `policy`: None (full) or a sinks_window KV-cache policy (`kv_policy.layer_policy`).
    A per_head policy raises a ValueError: the latent is shared by all heads, so no head
    can keep more of it than another.
    """
    self._check_decode()
    layer = kv_policy.layer_policy(policy)
    if layer.kind == "per_head":
      where = "" if layer.layer is None else f" (layer {layer.layer})"
      raise ValueError(f"the per_head cache policy does not apply to {self.NAME!r}"
                       f"{where}: its cached latent is shared by all heads. Use full or "
                       "sinks_window:sinks=S,window=W.")
    return kv_cache_init(batch_size, max_len,
                         {"latent": (self.kv_lora_rank,), "k_rope": (self.rope_head_dim,)},
                         dtype or self.dtype or jnp.float32, policy=layer)

  def decode(self, x_t, cache):
    """One token by the absorbed form: `(y_t [batch, 1, d_model], new cache)`."""
    self._check_decode()
    x_t = self._cast_step(x_t)
    batch = x_t.shape[0]
    positions = jnp.broadcast_to(cache["pos"], (batch, 1))
    q_nope, q_rope = self._query(x_t, positions)
    latent, k_rope = self._latent(x_t, positions)
    cache, (view,) = kv_cache_update(cache, {"latent": latent, "k_rope": k_rope})
    # Absorb W_uk into the query: q_latent,h = W_uk,hᵀ q_nope,h  [b, 1, h, kv_lora_rank].
    w_uk = self.k_up.kernel[...].astype(q_nope.dtype)  # [kv_lora_rank, h, nope]
    q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk)
    q = jnp.concatenate([q_latent, q_rope], axis=-1)
    latents, k_rope = (view.entries[n].astype(q.dtype) for n in ("latent", "k_rope"))
    k = jnp.concatenate([latents, k_rope], axis=-1)[:, :, None]
    o_latent = ops.dot_product_attention(
        q, k, latents[:, :, None], scale=self.scale,
        q_segment_ids=jnp.ones((batch, 1), jnp.int32), kv_segment_ids=view.kv_ids,
        implementation=self.implementation)  # [b, 1, h, kv_lora_rank]
    w_uv = self.v_up.kernel[...].astype(o_latent.dtype)  # [kv_lora_rank, h, v_head_dim]
    o = jnp.einsum("bshr,rhv->bshv", o_latent, w_uv)
    return self.out(o), cache
