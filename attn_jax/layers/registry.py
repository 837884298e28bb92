"""Mixers by name, so a model config can say `mixers=["gla", "gla", "swa", ...]`."""

from __future__ import annotations

from attn_jax.layers.base_conv import BaseConv
from attn_jax.layers.based import Based
from attn_jax.layers.differential import DifferentialAttention
from attn_jax.layers.gla import GatedLinearAttention
from attn_jax.layers.hgrn2 import HGRN2
from attn_jax.layers.hyena import Hyena
from attn_jax.layers.lightning import LightningAttention
from attn_jax.layers.linear import EfficientAttention, LinearAttention
from attn_jax.layers.mamba2 import Mamba2
from attn_jax.layers.mla import MultiHeadLatentAttention
from attn_jax.layers.retnet import Retention
from attn_jax.layers.softmax import SlidingWindowAttention, SoftmaxAttention

REGISTRY = {
    "softmax": SoftmaxAttention,
    "swa": SlidingWindowAttention,
    "diff": DifferentialAttention,
    "mla": MultiHeadLatentAttention,
    "linear": LinearAttention,
    "efficient": EfficientAttention,
    "lightning": LightningAttention,
    "retnet": Retention,
    "gla": GatedLinearAttention,
    "based": Based,
    "hgrn2": HGRN2,
    "mamba2": Mamba2,
    "base_conv": BaseConv,
    "hyena": Hyena,
}


def make_mixer(name, *, d_model, num_heads, rngs, **options):
  """Builds the mixer registered as `name`.

  Args:
    name: a key of `REGISTRY`.
    d_model: model width; num_heads: heads (query heads for the softmax family, value
      heads for Mamba-2).
    rngs: `nnx.Rngs` for the parameters.
    **options: the mixer's own options (see its class), e.g. `causal=False`,
      `window_size=128`, `dtype=jnp.bfloat16`.

  Returns:
    The module: `m(x, segment_ids=None)` runs it over `[batch, seq, d_model]` (causal
    self-attention by default; "efficient" is non-causal only), `m.init_cache(batch,
    max_len)` and `m.decode(x_t, cache)` decode one token at a time.

  Raises:
    ValueError: for an unknown name or a bad option, naming it.
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown mixer name {name!r}; known: {', '.join(REGISTRY)}.")
  try:
    return REGISTRY[name](d_model=d_model, num_heads=num_heads, rngs=rngs, **options)
  except TypeError as e:
    if "unexpected keyword argument" in str(e):
      raise ValueError(f"mixer {name!r}: {e}") from None
    raise
