"""The functional core: attention math as pure JAX functions (no Flax)."""

from attn_jax.ops import feature_maps
from attn_jax.ops.attention import dot_product_attention
from attn_jax.ops.linear_attention import linear_attention, linear_attention_step
from attn_jax.ops.nonfinite_guard import nonfinite_guard
from pallas_kernels.flash_attention.mask import AttentionMask, sliding_window

__all__ = ["AttentionMask", "dot_product_attention", "feature_maps", "linear_attention",
           "linear_attention_step", "nonfinite_guard", "sliding_window"]
