"""Gated linear attention (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv:2312.06635).

    q = W_q x,  k = W_k x,  v = W_v x                       (key dim d_model/2 by default)
    α_t = σ(W_α² W_α¹ x_t + b_α)^(1/τ)      per key channel, W_α low rank (16), τ = 16
    S_t = diag(α_t) S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k
    y = W_o (SiLU(W_r x) ⊙ RMSNorm_head(o))

The data-dependent gate decays each key channel of the state separately;
`log α = logsigmoid(·) / τ` is the `[batch, seq, heads, key_dim]` log decay of
`ops.linear_attention` (its chunked path handles vector gates in float32 without the
secondary-chunking overflow the paper works around).

Reproduced: the low-rank gate with τ = 16, the output gate, the per-head RMSNorm
(shared scale, as flash-linear-attention's fused norm-gate), the d/2 key dim.
Causal only: causal self and causal cross attention (context as long as x; the gate
comes from the context token that writes the state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.layers.common import Norm, Projection, check_positive_int, silu
from attn_jax.layers.linear import qkv_convs, qkv_projections
from attn_jax.layers.mixer import LinearAttentionInputs, RecurrentMixer


class GatedLinearAttention(RecurrentMixer):
  """GLA; causal self and causal cross.

  Args:
    d_model, num_heads, rngs: as every mixer.
    head_dim: key head dim (default d_model // (2 · num_heads)).
    v_head_dim: value head dim (default d_model // num_heads).
    gate_rank: rank of the gate projection (16).
    gate_temperature: τ, the gate's logit normaliser (16).
    short_conv_size: None, or the width of a causal convolution (with SiLU) on q, k, v.
    chunk_size, implementation, dtype: as `RecurrentMixer`; param_dtype: of the parameters.

  Decode state: `[batch, heads, head_dim, v_head_dim]` float32.
  """

  NAME = "gla"

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, v_head_dim=None,
               gate_rank=16, gate_temperature=16.0, short_conv_size=None, causal=True,
               chunk_size=64, dtype=None, param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, short_conv_size=short_conv_size,
                     chunk_size=chunk_size, implementation=implementation, dtype=dtype)
    self.head_dim = self._head_dim(head_dim, divisor=2)
    self.v_head_dim = (self._head_dim(None) if v_head_dim is None
                       else check_positive_int("v_head_dim", v_head_dim))
    if not gate_temperature > 0:
      raise ValueError(f"gate_temperature must be > 0; got {gate_temperature!r}.")
    self.gate_temperature = float(gate_temperature)
    h, dk, dv = self.num_heads, self.head_dim, self.v_head_dim
    rank = check_positive_int("gate_rank", gate_rank)
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.query, self.key, self.value = qkv_projections(d_model, h, dk, dv, **p)
    self.gate = Projection((d_model,), (h, dv), ("embed", "heads", "head_dim"), **p)
    self.decay_down = Projection((d_model,), (rank,), ("embed", None), **p)
    self.decay_up = Projection((rank,), (h, dk), (None, "heads", "head_dim"), use_bias=True,
                               **p)
    self.out = Projection((h, dv), (d_model,), ("heads", "head_dim", "embed"), **p)
    self.norm = Norm((dv,), ("head_dim",), eps=1e-5, **p)
    self.convs = qkv_convs(self.short_conv_size, (h, dk), (h, dv), **p)

  def _state_shape(self):
    return self.num_heads, self.head_dim, self.v_head_dim

  def log_decay(self, src):
    """`[batch, seq, heads, head_dim]` float32: log α = logsigmoid(W_α² W_α¹ x + b) / τ."""
    logits = self.decay_up(self.decay_down(src)).astype(jnp.float32)
    return jax.nn.log_sigmoid(logits) / self.gate_temperature

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q, k, v, conv_state = self._conv_qkv(x, src, segment_ids, conv_state)
    return LinearAttentionInputs(q, k, v, conv_state, log_decay=self.log_decay(src))

  def _output(self, o, x, aux):
    return self.out(self.norm(o.astype(x.dtype)) * silu(self.gate(x)))
