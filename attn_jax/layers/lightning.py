"""Lightning attention: the token mixer of TransNormerLLM (Qin et al., 2023,
arXiv:2307.14995), computed as in Lightning Attention-2 (Qin et al., 2024,
arXiv:2401.04658).

    q = SiLU(W_q x),  k = SiLU(W_k x),  v = W_v x,  u = W_u x
    o_t = Σ_{s ≤ t} λ_h^{t−s} (q_tᵀ k_s) v_s                (no softmax, no 1/√d)
    y = W_o (SRMSNorm(o) ⊙ u)

with a fixed decay per head and layer, the schedule of TransNormerLLM's released code:
`λ_h = exp(−m_h · (1 − l / (L − 1) + 1e-5))`, m_h the ALiBi slopes `2^(−8(h+1)/H)` (for
a power-of-two H), l the layer index and L the number of layers, so lower layers decay
faster and the last layer barely decays. SRMSNorm is an RMSNorm without a learned scale,
over all heads together. The parallel form is `ops.linear_attention` with a `[heads]`
log decay (its chunked path is the Lightning Attention-2 intra/inter-block split).

Reproduced: the gate, activations, SRMSNorm, the decay schedule. Not reproduced: LRPE
(TransNormerLLM's optional relative position encoding, off in its released models) and
the GLU channel mixer (a model-level block). Causal only (a decay orders the tokens):
causal self and causal cross attention (context as long as x).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from attn_jax.layers.common import Norm, Projection, check_positive_int, silu
from attn_jax.layers.linear import qkv_convs, qkv_projections
from attn_jax.layers.mixer import LinearAttentionInputs, RecurrentMixer


def alibi_slopes(num_heads):
  """ALiBi's head slopes (Press et al., 2022): `2^(−8(h+1)/H)` for a power-of-two H."""
  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][:num_heads - closest]


def lightning_log_decay(num_heads, layer_index, num_layers):
  """log λ_h = −m_h · (1 − l / (L − 1) + 1e-5) (TransNormerLLM's schedule), a tuple."""
  depth = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
  return tuple(-m * (1.0 - depth + 1e-5) for m in alibi_slopes(num_heads))


class LightningAttention(RecurrentMixer):
  """TransNormerLLM's lightning attention; causal self and causal cross.

  Args:
    d_model, num_heads, rngs: as every mixer.
    head_dim: default d_model // num_heads.
    layer_index, num_layers: position of the layer in the stack, for the decay schedule
      (0 ≤ layer_index < num_layers).
    short_conv_size: None, or the width of a causal convolution on q, k, v.
    chunk_size, implementation, dtype: as `RecurrentMixer`; param_dtype: of the parameters.

  Decode state: `[batch, heads, head_dim, head_dim]` float32.
  """

  NAME = "lightning"

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, layer_index=0,
               num_layers=1, short_conv_size=None, causal=True, chunk_size=64, dtype=None,
               param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, short_conv_size=short_conv_size,
                     scale=1.0, chunk_size=chunk_size, implementation=implementation,
                     dtype=dtype)
    self.head_dim = self._head_dim(head_dim)
    num_layers = check_positive_int("num_layers", num_layers)
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not (
        0 <= layer_index < num_layers):
      raise ValueError(f"layer_index must be an int in [0, num_layers={num_layers}); got "
                       f"{layer_index!r}.")
    # A tuple, not an array: a module's static attributes must not hold (traced) arrays.
    self.log_decays = lightning_log_decay(self.num_heads, layer_index, num_layers)
    h, hd = self.num_heads, self.head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.query, self.key, self.value = qkv_projections(d_model, h, hd, hd, **p)
    self.gate = Projection((d_model,), (h, hd), ("embed", "heads", "head_dim"), **p)
    self.out = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"), **p)
    self.norm = Norm((h, hd), ("heads", "head_dim"), axes=2, use_scale=False, **p)
    self.convs = qkv_convs(self.short_conv_size, (h, hd), (h, hd), **p)

  def _state_shape(self):
    return self.num_heads, self.head_dim, self.head_dim

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q, k, v, conv_state = self._conv_qkv(x, src, segment_ids, conv_state)
    return LinearAttentionInputs(silu(q), silu(k), v, conv_state,
                                 log_decay=jnp.asarray(self.log_decays, jnp.float32))

  def _output(self, o, x, aux):
    return self.out(self.norm(o.astype(x.dtype)) * self.gate(x))
