"""The functional core: attention math as pure JAX functions (no Flax)."""

from attn_jax.ops import feature_maps
from attn_jax.ops.attention import dot_product_attention
from attn_jax.ops.attention_mask import AttentionMask
from attn_jax.ops.linear_attention import linear_attention, linear_attention_step

__all__ = ["AttentionMask", "dot_product_attention", "feature_maps", "linear_attention",
           "linear_attention_step"]
