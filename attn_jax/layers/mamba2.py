"""A Mamba-2 block (Dao & Gu, 2024, "Transformers are SSMs", arXiv:2405.21060): scalar-gated
linear attention (state space duality, SSD) with a short convolution.

    z, x, B, C, Δ = in-projections of u         (x: heads × head_dim; B, C: state_size)
    x, B, C = SiLU(conv1d(x, B, C))               (causal depthwise, width 4, with bias)
    Δ_t = softplus(W_Δ u_t + b_Δ),  a_t = exp(−Δ_t · exp(A_log))          (per head)
    S_t = a_t S_{t−1} + B_t (Δ_t x_t)ᵀ,   y_t = S_tᵀ C_t + D ⊙ x_t
    out = W_o RMSNorm(y ⊙ SiLU(z))

In attention terms C is the query, B the key and Δ·x the value, with one B/C group shared
by all heads (multi-value attention: `ops.linear_attention` with 1 query/key head and
`num_heads` value heads) and a per-token, per-head scalar decay. No 1/√d scale.

Reproduced: the projections, the convolution over x, B and C, Δ's softplus with its
bias initialised so Δ ∈ [dt_min, dt_max], A initialised in [1, 16], the D skip, the gated
RMSNorm (normalising the whole inner width, ngroups = 1). Not reproduced: several B/C
groups, Δ clamping, the fused kernels. A state space model reads one sequence: causal
self-attention only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers.common import (Norm, Projection, ShortConv, check_positive_int,
                                    partitioned)
from attn_jax.layers.mixer import LinearAttentionInputs, RecurrentMixer


def dt_bias_init(dt_min, dt_max):
  """Initialiser of Δ's bias b: softplus(b) log-uniform in [dt_min, dt_max]."""
  def init(key, shape, dtype=jnp.float32):
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(dt_min),
                                    math.log(dt_max)))
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus⁻¹(Δ)
  return init


def a_log_init(key, shape, dtype=jnp.float32):
  """Initialiser of log A, A uniform in [1, 16]."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class Mamba2(RecurrentMixer):
  """Mamba-2 (SSD) mixer; causal self-attention only.

  Args:
    d_model, num_heads, rngs: as every mixer.
    expand: inner width = expand · d_model (2).
    head_dim: value dim per head P (default expand · d_model // num_heads).
    state_size: N, the width of B and C (64).
    conv_size: width of the causal convolution (4).
    dt_min, dt_max: range of Δ at initialisation.
    chunk_size, implementation, dtype: as `RecurrentMixer`; param_dtype: of the parameters.

  Decode state: `[batch, heads, state_size, head_dim]` float32 plus the convolution's
  last `conv_size - 1` inputs.
  """

  NAME = "mamba2"
  PATTERNS = ("causal_self",)

  def __init__(self, d_model, num_heads, *, rngs, expand=2, head_dim=None, state_size=64,
               conv_size=4, dt_min=0.001, dt_max=0.1, causal=True, chunk_size=64,
               dtype=None, param_dtype=jnp.float32, implementation=None):
    super().__init__(d_model, num_heads, causal=causal, scale=1.0, chunk_size=chunk_size,
                     implementation=implementation, dtype=dtype)
    expand = check_positive_int("expand", expand)
    if head_dim is None and (expand * d_model) % num_heads:
      raise ValueError(f"num_heads ({num_heads}) must divide expand · d_model "
                       f"({expand * d_model}), or give head_dim explicitly.")
    self.head_dim = check_positive_int(
        "head_dim", expand * d_model // num_heads if head_dim is None else head_dim)
    self.state_size = check_positive_int("state_size", state_size)
    size = check_positive_int("conv_size", conv_size)
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"need 0 < dt_min <= dt_max; got dt_min={dt_min!r}, "
                       f"dt_max={dt_max!r}.")
    h, hd, n = self.num_heads, self.head_dim, self.state_size
    p = dict(rngs=rngs, param_dtype=param_dtype)
    names = ("embed", "heads", "head_dim")
    self.gate = Projection((d_model,), (h, hd), names, **p)
    self.x_proj = Projection((d_model,), (h, hd), names, **p)
    self.b_proj = Projection((d_model,), (1, n), ("embed", "kv_heads", "head_dim"), **p)
    self.c_proj = Projection((d_model,), (1, n), ("embed", "kv_heads", "head_dim"), **p)
    self.dt_proj = Projection((d_model,), (h,), ("embed", "heads"), **p)
    conv = lambda shape, axes: ShortConv(shape, axes, size=size, use_bias=True, **p)
    self.convs = nnx.Dict({"x": conv((h, hd), ("heads", "head_dim")),
                           "b": conv((1, n), ("kv_heads", "head_dim")),
                           "c": conv((1, n), ("kv_heads", "head_dim"))})
    heads = lambda init: nnx.Param(partitioned(init, ("heads",))(rngs.params(), (h,),
                                                                 param_dtype))
    self.dt_bias = heads(dt_bias_init(dt_min, dt_max))
    self.a_log = heads(a_log_init)
    self.skip = heads(nnx.initializers.ones)  # D
    self.norm = Norm((h, hd), ("heads", "head_dim"), axes=2, eps=1e-5, **p)
    self.out = Projection((h, hd), (d_model,), ("heads", "head_dim", "embed"), **p)

  def _state_shape(self):
    return self.num_heads, self.state_size, self.head_dim

  def _inputs(self, x, src, *, positions, segment_ids, conv_state):
    xs, conv_state = self._conv("x", self.x_proj(x), segment_ids, conv_state)
    b, conv_state = self._conv("b", self.b_proj(x), segment_ids, conv_state)
    c, conv_state = self._conv("c", self.c_proj(x), segment_ids, conv_state)
    dt = jax.nn.softplus(self.dt_proj(x).astype(jnp.float32) + self.dt_bias[...])
    log_decay = -dt * jnp.exp(self.a_log[...].astype(jnp.float32))  # [b, s, heads]
    v = (xs.astype(jnp.float32) * dt[..., None]).astype(xs.dtype)
    return LinearAttentionInputs(c, b, v, conv_state, log_decay=log_decay, output_aux=xs)

  def _output(self, o, x, xs):
    y = o.astype(jnp.float32) + self.skip[...][:, None] * xs.astype(jnp.float32)
    y = self.norm(y * jax.nn.silu(self.gate(x).astype(jnp.float32)))
    return self.out(y.astype(x.dtype))
