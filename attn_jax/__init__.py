"""attn_jax: attention mechanisms as pure functions, fast kernels, layers and models."""

from attn_jax import ops

__all__ = ["ops"]
