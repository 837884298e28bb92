"""Multi-scale retention (Sun et al., 2023, "Retentive Network", arXiv:2307.08621).

    q = RoPE(W_q x),  k = RoPE(W_k x),  v = W_v x            (v heads are 2× wider)
    o_t = Σ_{s ≤ t} γ_h^{t−s} (q_tᵀ k_s / √d) v_s,   γ_h = 1 − 2^(−5−h)
    y = W_o (SiLU(W_g x) ⊙ GroupNorm(o))

Each head has its own fixed decay ("multi-scale"), from γ_0 = 1 − 1/32 down to slower
forgetting in later heads. The rotation is RoPE (the paper's θ of xPos without its
extrapolation scaling). GroupNorm normalises each head separately with a per-channel
affine. The parallel form is `ops.linear_attention` with a `[heads]` log decay; the
recurrent form is the paper's recurrent retention, and the chunked form its chunkwise
retention.

Not reproduced: the parallel form's score normalisations (dividing D by its row sums and
QKᵀ by its absolute row sums); GroupNorm makes each head's output invariant to the first
and nearly so to the second, and the recurrent and chunked forms match this module.
Causal only: causal self and causal cross attention (context as long as x).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from attn_jax.layers.common import (Norm, Projection, apply_rope, check_positive_int,
                                    check_rope, silu)
from attn_jax.layers.linear import qkv_convs, qkv_projections
from attn_jax.layers.mixer import LinearAttentionInputs, RecurrentMixer


def retention_log_decay(num_heads):
  """log γ_h, γ_h = 1 − 2^(−5−h), for each head, a tuple."""
  return tuple(math.log1p(-(2.0 ** (-5.0 - h))) for h in range(num_heads))


class Retention(RecurrentMixer):
  """RetNet multi-scale retention; causal self and causal cross.

  Args:
    d_model, num_heads, rngs: as every mixer.
    head_dim: q/k head dim (default d_model // num_heads).
    value_factor: v head dim = value_factor · head_dim (the paper uses 2).
    rope, rope_base, rope_scaling: the rotation of q and k (self-attention only).
    short_conv_size: None, or the width of a causal convolution (with SiLU) on q, k, v.
    chunk_size, implementation, dtype: as `RecurrentMixer`; param_dtype: of the parameters.

  Decode state: `[batch, heads, head_dim, value_factor · head_dim]` float32.
  """

  NAME = "retnet"

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, value_factor=2, rope=True,
               rope_base=10000.0, rope_scaling=1.0, short_conv_size=None, causal=True,
               chunk_size=64, dtype=None, param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, short_conv_size=short_conv_size,
                     chunk_size=chunk_size, implementation=implementation, dtype=dtype)
    self.head_dim = self._head_dim(head_dim)
    self.v_head_dim = check_positive_int("value_factor", value_factor) * self.head_dim
    self.rope, self.rope_base, self.rope_scaling = bool(rope), rope_base, rope_scaling
    if self.rope:
      check_rope(self.head_dim, rope_base, rope_scaling)
    self.log_decays = retention_log_decay(self.num_heads)  # static: a tuple, no array
    h, hd, vd = self.num_heads, self.head_dim, self.v_head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    self.query, self.key, self.value = qkv_projections(d_model, h, hd, vd, **p)
    self.gate = Projection((d_model,), (h, vd), ("embed", "heads", "head_dim"), **p)
    self.out = Projection((h, vd), (d_model,), ("heads", "head_dim", "embed"), **p)
    self.group_norm = Norm((h, vd), ("heads", "head_dim"), kind="layer", eps=1e-5, **p)
    self.convs = qkv_convs(self.short_conv_size, (h, hd), (h, vd), **p)

  def _state_shape(self):
    return self.num_heads, self.head_dim, self.v_head_dim

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q, k, v, conv_state = self._conv_qkv(x, src, segment_ids, conv_state)
    if self.rope and positions is not None:
      rope = dict(base=self.rope_base, scaling=self.rope_scaling)
      q, k = apply_rope(q, positions, **rope), apply_rope(k, positions, **rope)
    return LinearAttentionInputs(q, k, v, conv_state,
                                 log_decay=jnp.asarray(self.log_decays, jnp.float32))

  def _output(self, o, x, aux):
    return self.out(silu(self.gate(x)) * self.group_norm(o.astype(x.dtype)))
