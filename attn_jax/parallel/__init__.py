"""Sequence (context) parallelism: ring attention and linear-attention state passing."""

from attn_jax.parallel.ring_attention import ring_attention
from attn_jax.parallel.sequence import active_axis, sequence_parallel
from attn_jax.parallel.state_passing import state_passing_linear_attention

__all__ = ["active_axis", "ring_attention", "sequence_parallel",
           "state_passing_linear_attention"]
