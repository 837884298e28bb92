"""HGRN2 (Qin et al., 2024, "HGRN2: Gated Linear RNNs with State Expansion",
arXiv:2404.07904).

A gated linear RNN whose state is expanded by an outer product, with the input gate tied
to the forget gate ("keys are one minus forget"):

    q = SiLU(W_q x),  g = β + (1 − β) σ(W_f x),  k = 1 − g,  v = W_i x
    S_t = diag(g_t) S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_f
    y = W_o RMSNorm(o)

β is the forget gate's lower bound: HGRN/HGRN2 learn one per layer that grows with depth
(a softmax-cumsum over layers at model level); here it is the static `lower_bound`
option, 0 for the first layer. The recurrence is GLA's with a vector gate, i.e.
`ops.linear_attention` with a `[batch, seq, heads, head_dim]` log decay; the state per
head is `head_dim × head_dim` (expand ratio = head_dim).

Not reproduced: the learned, depth-increasing lower bounds (pass per-layer values). The
RNN reads one sequence: causal self-attention only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers.common import Norm, Projection, ShortConv, identity, silu
from attn_jax.layers.mixer import LinearAttentionInputs, RecurrentMixer


class HGRN2(RecurrentMixer):
  """HGRN2; causal self-attention only.

  Args:
    d_model, num_heads, rngs: as every mixer.
    head_dim: forget/query dim per head, the expand ratio (default d_model // num_heads).
    lower_bound: β in [0, 1), the forget gate's lower bound.
    short_conv_size: None, or the width of a causal convolution (no activation, as in
      flash-linear-attention) on the query, forget and input projections.
    chunk_size, implementation, dtype: as `RecurrentMixer`; param_dtype: of the parameters.

  Decode state: `[batch, heads, head_dim, d_model // num_heads]` float32.
  """

  NAME = "hgrn2"
  PATTERNS = ("causal_self",)

  def __init__(self, d_model, num_heads, *, rngs, head_dim=None, lower_bound=0.0,
               short_conv_size=None, causal=True, chunk_size=64, dtype=None,
               param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, short_conv_size=short_conv_size,
                     chunk_size=chunk_size, implementation=implementation, dtype=dtype)
    self.head_dim = self._head_dim(head_dim)
    self.v_head_dim = self._head_dim(None)
    if not 0.0 <= lower_bound < 1.0:
      raise ValueError(f"lower_bound must be in [0, 1); got {lower_bound!r}.")
    self.lower_bound = float(lower_bound)
    h, dk, dv = self.num_heads, self.head_dim, self.v_head_dim
    p = dict(rngs=rngs, param_dtype=param_dtype)
    names = ("embed", "heads", "head_dim")
    self.query = Projection((d_model,), (h, dk), names, **p)
    self.forget = Projection((d_model,), (h, dk), names, **p)
    self.input = Projection((d_model,), (h, dv), names, **p)
    self.out = Projection((h, dv), (d_model,), ("heads", "head_dim", "embed"), **p)
    self.norm = Norm((h, dv), ("heads", "head_dim"), axes=2, eps=1e-5, **p)
    conv = lambda shape: ShortConv(shape, ("heads", "head_dim"), size=self.short_conv_size,
                                   activation=identity, **p)
    self.convs = None if self.short_conv_size is None else nnx.Dict(
        {"q": conv((h, dk)), "f": conv((h, dk)), "i": conv((h, dv))})

  def _state_shape(self):
    return self.num_heads, self.head_dim, self.v_head_dim

  def log_forget(self, f):
    """log g with g = β + (1 − β) σ(f), float32."""
    log_sigmoid = jax.nn.log_sigmoid(f.astype(jnp.float32))
    if self.lower_bound == 0.0:
      return log_sigmoid
    log_g = jnp.logaddexp(math.log(self.lower_bound),
                          math.log1p(-self.lower_bound) + log_sigmoid)
    return jnp.minimum(log_g, 0.0)  # rounding must not make a decay > 1

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    q, conv_state = self._conv("q", self.query(x), segment_ids, conv_state)
    f, conv_state = self._conv("f", self.forget(src), segment_ids, conv_state)
    v, conv_state = self._conv("i", self.input(src), segment_ids, conv_state)
    log_g = self.log_forget(f)
    k = (-jnp.expm1(log_g)).astype(v.dtype)  # 1 − g
    return LinearAttentionInputs(silu(q), k, v, conv_state, log_decay=log_g)

  def _output(self, o, x, aux):
    return self.out(self.norm(o.astype(x.dtype)))
