"""Pieces every mixer shares: projections, RoPE, norms, the short convolution, checks.

Parameters carry logical axis names (`AXES`) as `out_sharding` metadata
(`nnx.with_partitioning`); the model and training code map them onto a mesh with one
table of rules, so no layer knows about devices. Parameters are created unsharded when no
mesh is set (`jax.set_mesh`), so every layer also builds on one CPU.

Compute dtype: a mixer casts its input to its `dtype` (None keeps the input's dtype) and
every projection runs in that dtype; parameters stay in `param_dtype` (float32). Norms,
gates and decays are computed in float32 and cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from attn_jax.layers import scope

# The logical axis names parameters use; `None` in a name tuple means "never sharded".
AXES = ("embed", "heads", "kv_heads", "head_dim", "q_lora", "kv_lora")


def partitioned(initializer, names):
  """`initializer` annotated with logical axis `names`, one per dimension of the result.

  Eager sharding (flax's default) needs a mesh, so it applies only when one is set.
  """
  eager = nnx.using_eager_sharding() and meta.global_mesh_defined()
  return nnx.with_partitioning(initializer, tuple(names), eager_sharding=eager)


def check_positive_int(name, value, *, allow_none=False):
  """Raises ValueError unless `value` is an int ≥ 1 (or None when allowed)."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    expected = "a positive int or None" if allow_none else "a positive int"
    raise ValueError(f"{name} must be {expected}; got {value!r}.")
  return int(value)


def check_divides(name, value, total_name, total):
  """Raises ValueError unless `value` divides `total`."""
  if total % value:
    raise ValueError(f"{name} ({value}) must divide {total_name} ({total}).")
  return total // value


class Projection(nnx.Module):
  """A dense map contracting the last `len(in_shape)` input axes: `x · W (+ b)`.

  The kernel has shape `in_shape + out_shape` and logical axis `names`, one per kernel
  dimension, so a head projection is `[embed, heads, head_dim]` and an output projection
  `[heads, head_dim, embed]`. Computes in the input's dtype. An output projection (input
  axes "heads", "head_dim") applies the active head mask first (`scope.head_mask`).
  """

  def __init__(self, in_shape, out_shape, names, *, rngs, use_bias=False, init_scale=1.0,
               param_dtype=jnp.float32):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if len(names) != len(in_shape) + len(out_shape):
      raise ValueError(f"names {names} must name every kernel axis of "
                       f"{in_shape + out_shape}.")
    self.num_in = len(in_shape)
    self.from_heads = tuple(names[:self.num_in]) == ("heads", "head_dim")
    init = nnx.initializers.variance_scaling(
        init_scale, "fan_in", "truncated_normal", in_axis=tuple(range(self.num_in)),
        out_axis=tuple(range(self.num_in, self.num_in + len(out_shape))))
    self.kernel = nnx.Param(partitioned(init, names)(rngs.params(), in_shape + out_shape,
                                                     param_dtype))
    self.bias = nnx.Param(partitioned(nnx.initializers.zeros, names[self.num_in:])(
        rngs.params(), out_shape, param_dtype)) if use_bias else None

  def __call__(self, x):
    if self.from_heads:
      x = scope.mask_heads(x)
    kernel = self.kernel[...].astype(x.dtype)
    axes = tuple(range(x.ndim - self.num_in, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((axes, tuple(range(self.num_in))), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class Norm(nnx.Module):
  """RMSNorm (`kind="rms"`) or LayerNorm (`kind="layer"`), in float32.

  Statistics are taken over the last `axes` axes. `shape`/`names` give the learned scale
  (and LayerNorm bias), broadcast against the trailing axes: over one axis with a scale
  `[heads, head_dim]` it is a per-head group norm with per-channel affine; with `axes=2`
  it normalises all heads together. `use_scale=False` has no parameters
  (TransNormerLLM's SRMSNorm).
  """

  def __init__(self, shape, names, *, rngs, kind="rms", axes=1, eps=1e-6, use_scale=True,
               param_dtype=jnp.float32):
    if kind not in ("rms", "layer"):
      raise ValueError(f"kind must be 'rms' or 'layer'; got {kind!r}.")
    self.kind, self.eps, self.axes = kind, float(eps), tuple(range(-int(axes), 0))
    make = lambda init: nnx.Param(partitioned(init, names)(rngs.params(), tuple(shape),
                                                           param_dtype))
    self.scale = make(nnx.initializers.ones) if use_scale else None
    self.bias = make(nnx.initializers.zeros) if use_scale and kind == "layer" else None

  def __call__(self, x):
    y = x.astype(jnp.float32)
    if self.kind == "layer":
      y = y - jnp.mean(y, axis=self.axes, keepdims=True)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=self.axes, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def check_rope(head_dim, base, scaling, name="head_dim"):
  """Validates RoPE settings: an even rotated dim, base > 1, scaling > 0."""
  if head_dim % 2:
    raise ValueError(f"RoPE rotates pairs of features: {name} must be even; got "
                     f"{head_dim}.")
  if not base > 1:
    raise ValueError(f"rope_base must be > 1; got {base!r}.")
  if not scaling > 0:
    raise ValueError(f"rope_scaling must be > 0; got {scaling!r}.")


def apply_rope(x, positions, *, base=10000.0, scaling=1.0):
  """Rotary position embedding (Su et al., 2021, RoFormer), rotate-half layout.

  Args:
    x: `[batch, seq, heads, dim]`, dim even.
    positions: `[batch, seq]` integer positions.
    base: the wavelength base θ; frequencies are `base^(-2i/dim)`.
    scaling: linear position interpolation (Chen et al., 2023): positions are divided by
      it, so a model trained at length L runs at `scaling · L`.

  Returns:
    x rotated, in its dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] / scaling * inv_freq  # [b, s, half]
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def segment_positions(segment_ids, batch, seq):
  """`[batch, seq]` positions counted from the start of each segment (packed sequences)."""
  index = jnp.arange(seq, dtype=jnp.int32)
  if segment_ids is None:
    return jnp.broadcast_to(index, (batch, seq))
  starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start_index


class ShortConv(nnx.Module):
  """Depthwise causal convolution over the sequence (H3, Based, GLA, Mamba, CHELA).

  Output t mixes inputs t - size + 1 … t of the same channel, then `activation`.
  In decoding, the last `size - 1` inputs are the state. With segment ids a tap never
  reaches into an earlier segment.

  Args:
    channels: the channel shape after `[batch, seq]`, e.g. `(heads, head_dim)`.
    names: logical axis names of `channels`.
    size: kernel width (≥ 1).
  """

  def __init__(self, channels, names, *, size, rngs, activation=jax.nn.silu,
               use_bias=False, param_dtype=jnp.float32):
    self.size = check_positive_int("short_conv_size", size)
    self.channels = tuple(channels)
    self.activation = activation
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0,
                                             out_axis=tuple(range(1, 1 + len(channels))))
    self.kernel = nnx.Param(partitioned(init, (None,) + tuple(names))(
        rngs.params(), (self.size,) + self.channels, param_dtype))
    self.bias = nnx.Param(partitioned(nnx.initializers.zeros, names)(
        rngs.params(), self.channels, param_dtype)) if use_bias else None

  def init_state(self, batch_size, dtype=jnp.float32):
    """Zeros `[batch, size - 1, *channels]`: no earlier inputs."""
    return jnp.zeros((batch_size, self.size - 1) + self.channels, dtype)

  def __call__(self, x, *, segment_ids=None, state=None):
    """x `[batch, seq, *channels]`; returns `(y like x, new state)`."""
    batch, seq = x.shape[:2]
    if state is None:
      state = self.init_state(batch, x.dtype)
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [b, size - 1 + seq, ...]
    kernel = self.kernel[...].astype(x.dtype)
    extra = (1,) * len(self.channels)
    y = jnp.zeros_like(x)
    for lag in range(self.size):  # kernel[size - 1 - lag] multiplies x[t - lag]
      term = full[:, self.size - 1 - lag:self.size - 1 - lag + seq]
      if segment_ids is not None and lag:
        earlier = jnp.pad(segment_ids, ((0, 0), (lag, 0)), mode="edge")[:, :seq]
        term = term * (earlier == segment_ids).reshape(batch, seq, *extra).astype(x.dtype)
      y = y + term * kernel[self.size - 1 - lag]
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    new_state = full[:, full.shape[1] - (self.size - 1):].astype(state.dtype)
    return self.activation(y), new_state


def silu(x):
  """Swish/SiLU, `x · σ(x)`, in float32 and back."""
  return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def identity(x):
  return x
