"""Linear attention with feature maps, and Efficient Attention for the non-causal case.

`LinearAttention` follows Katharopoulos et al. (2020), "Transformers are RNNs"
(arXiv:2006.16236): softmax(qᵀk) is replaced by φ(q)ᵀφ(k), so

    o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + ε),

the sums over j ≤ i (causal, an RNN with a `[key_dim, value_dim + 1]` state) or over all
j (non-causal). Feature maps: elu+1 (the paper's), ReLU, identity, or the Taylor map of
Based. All four patterns; causal cross attention pairs query i with context tokens ≤ i.

`EfficientAttention` follows Shen et al. (2021), "Efficient Attention: Attention with
Linear Complexities" (arXiv:1812.01243): `E(Q, K, V) = ρ_q(Q) (ρ_k(K)ᵀ V)` with ρ_q a
softmax over each query's features and ρ_k a softmax over positions for each key feature.
The softmax over positions needs the whole sequence, so it is non-causal only (self and
cross); packed sequences normalise keys per segment.

Not reproduced: Efficient Attention's other normalisation (scaling by 1/√n) and its
use inside convolutional backbones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers.common import Projection, ShortConv
from attn_jax.layers.mixer import PATTERNS, LinearAttentionInputs, RecurrentMixer
from attn_jax.ops import feature_maps


def get_feature_map(name):
  """The feature map function named `name` (see `attn_jax.ops.feature_maps`)."""
  if name not in feature_maps.FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {sorted(feature_maps.FEATURE_MAPS)}; got "
                     f"{name!r}.")
  return feature_maps.FEATURE_MAPS[name]


def feature_dim(fn, dim):
  """Output width of feature map `fn` on `dim` features."""
  return jax.eval_shape(fn, jax.ShapeDtypeStruct((dim,), jnp.float32)).shape[-1]


def qkv_projections(d_model, heads, key_dim, value_dim, *, rngs, param_dtype):
  """Query and key `[d_model] → [heads, key_dim]`, value `→ [heads, value_dim]`."""
  names = ("embed", "heads", "head_dim")
  make = lambda dim: Projection((d_model,), (heads, dim), names, rngs=rngs,
                                param_dtype=param_dtype)
  return make(key_dim), make(key_dim), make(value_dim)


def qkv_convs(size, key_shape, value_shape, *, rngs, param_dtype, key_names=None,
              activation=jax.nn.silu):
  """Short convolutions on q, k and v (H3/Based/GLA style), or None when size is None."""
  if size is None:
    return None
  key_names = key_names or ("heads", "head_dim")
  conv = lambda shape, names: ShortConv(shape, names, size=size, rngs=rngs,
                                        activation=activation, param_dtype=param_dtype)
  return nnx.Dict({"q": conv(key_shape, key_names), "k": conv(key_shape, key_names),
                   "v": conv(value_shape, ("heads", "head_dim"))})


class LinearAttention(RecurrentMixer):
  """Feature-map linear attention (Katharopoulos et al., 2020); all four patterns.

  Args:
    d_model, num_heads, rngs: as every mixer.
    head_dim: q/k/v head dim before the feature map (default d_model // num_heads).
    feature_map: "elu_plus_one" (default), "relu", "identity" or "taylor_exp".
    normalize: divide by φ(q)ᵀ Σ φ(k) (default True; use a positive feature map).
    causal: causal (default) or global.
    short_conv_size: None, or the width of a causal depthwise convolution (with SiLU) on
      q, k and v before the feature map.
    scale: logit scale, None for `feature_dim^-0.5` (it cancels when normalising).
    chunk_size, implementation: passed to `ops.linear_attention`.
    dtype, param_dtype: compute and parameter dtypes.

  Decode state: `[batch, heads, feature_dim, head_dim + 1]` float32, constant in length.
  """

  NAME = "linear"
  PATTERNS = PATTERNS

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, feature_map="elu_plus_one",
               normalize=True, causal=True, short_conv_size=None, scale=None, chunk_size=64,
               dtype=None, param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, short_conv_size=short_conv_size,
                     normalize=normalize, scale=scale, chunk_size=chunk_size,
                     implementation=implementation, dtype=dtype)
    self.head_dim = self._head_dim(head_dim)
    self.feature_map = get_feature_map(feature_map)
    self.feature_dim = feature_dim(self.feature_map, self.head_dim)
    h, hd = self.num_heads, self.head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.query, self.key, self.value = qkv_projections(d_model, h, hd, hd, **p)
    self.out = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"), **p)
    self.convs = qkv_convs(self.short_conv_size, (h, hd), (h, hd), **p)

  def _state_shape(self):
    return self.num_heads, self.feature_dim, self.head_dim

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q, k, v, conv_state = self._conv_qkv(x, src, segment_ids, conv_state)
    return LinearAttentionInputs(self.feature_map(q), self.feature_map(k), v, conv_state)

  def _output(self, o, x, aux):
    return self.out(o.astype(x.dtype))


class EfficientAttention(RecurrentMixer):
  """Efficient Attention (Shen et al., 2021): non-causal self and cross attention only.

  Args: as `LinearAttention` without feature_map, normalize, scale and short_conv_size;
  `causal` must stay False.
  """

  NAME = "efficient"
  PATTERNS = ("noncausal_self", "noncausal_cross")

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, causal=False,
               chunk_size=64, dtype=None, param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, scale=1.0, chunk_size=chunk_size,
                     implementation=implementation, dtype=dtype)
    self.head_dim = self._head_dim(head_dim)
    h, hd = self.num_heads, self.head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.query, self.key, self.value = qkv_projections(d_model, h, hd, hd, **p)
    self.out = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"), **p)

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q = jax.nn.softmax(self.query(x).astype(jnp.float32), axis=-1).astype(x.dtype)
    k = softmax_over_positions(self.key(src), segment_ids)
    return LinearAttentionInputs(q, k, self.value(src), conv_state)

  def _output(self, o, x, aux):
    return self.out(o.astype(x.dtype))


def softmax_over_positions(k, segment_ids=None):
  """Softmax of `k [batch, seq, ...]` over the seq axis, separately in each segment."""
  k32 = k.astype(jnp.float32)
  if segment_ids is None:
    return jax.nn.softmax(k32, axis=1).astype(k.dtype)
  batch, seq = segment_ids.shape
  starts = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                            (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
                           axis=1)
  # One id per (row, run of equal ids), so runs in different rows never mix.
  run = (jnp.cumsum(starts, axis=1) + seq * jnp.arange(batch)[:, None]).reshape(-1)
  flat = k32.reshape((batch * seq,) + k.shape[2:])
  peak = jax.ops.segment_max(flat, run, num_segments=batch * seq)[run]
  e = jnp.exp(flat - jax.lax.stop_gradient(peak))
  total = jax.ops.segment_sum(e, run, num_segments=batch * seq)[run]
  return (e / total).reshape(k.shape).astype(k.dtype)
