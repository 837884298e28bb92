"""Head-level analysis: attention maps captured from any model, and per-head scores.

    from attn_jax import analysis
    with analysis.capture_attention(layers=[0]) as maps:
      model(tokens)
    analysis.scores.sink_score(maps[0][0])          # [heads]
"""

from attn_jax.analysis import scores
from attn_jax.analysis.capture import capture_attention, layer_scope

__all__ = ["capture_attention", "layer_scope", "scores"]
