"""Flax NNX token mixers, thin over `attn_jax.ops`, selectable by name.

    m = attn_jax.layers.make_mixer(name, d_model=..., num_heads=..., rngs=nnx.Rngs(0))
    y = m(x, segment_ids=None)                  # parallel path, causal self-attention
    cache = m.init_cache(batch_size, max_len)   # KV cache or recurrent state (a pytree)
    policy = kv_policy.parse("sinks_window:sinks=4,window=60")  # StreamingLLM
    cache = m.init_cache(batch_size, max_len, policy=policy)  # softmax family: smaller
    y_t, cache = m.decode(x_t, cache)           # one token

See docs/layers.md for the table of mechanisms, docs/kv_cache.md for the KV-cache
policies.
"""

from attn_jax.layers import kv_policy
from attn_jax.layers.base_conv import BaseConv
from attn_jax.layers.based import Based
from attn_jax.layers.common import AXES
from attn_jax.layers.differential import DifferentialAttention
from attn_jax.layers.gla import GatedLinearAttention
from attn_jax.layers.hgrn2 import HGRN2
from attn_jax.layers.hyena import Hyena
from attn_jax.layers.kv_policy import CachePolicy
from attn_jax.layers.lightning import LightningAttention
from attn_jax.layers.linear import EfficientAttention, LinearAttention
from attn_jax.layers.mamba2 import Mamba2
from attn_jax.layers.mixer import PATTERNS, Mixer, RecurrentMixer
from attn_jax.layers.mla import MultiHeadLatentAttention
from attn_jax.layers.registry import REGISTRY, make_mixer
from attn_jax.layers.retnet import Retention
from attn_jax.layers.softmax import SlidingWindowAttention, SoftmaxAttention

__all__ = [
    "AXES", "PATTERNS", "REGISTRY", "BaseConv", "Based", "CachePolicy",
    "DifferentialAttention", "EfficientAttention", "GatedLinearAttention", "HGRN2", "Hyena",
    "LightningAttention",
    "LinearAttention", "Mamba2", "Mixer", "MultiHeadLatentAttention", "RecurrentMixer",
    "Retention", "SlidingWindowAttention", "SoftmaxAttention", "kv_policy", "make_mixer",
]
