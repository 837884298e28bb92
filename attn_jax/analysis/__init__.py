"""Head-level analysis: attention maps captured from any model, per-head scores, head
masks and importance.

    from attn_jax import analysis
    with analysis.capture_attention(layers=[0]) as maps:
      model(tokens)
    analysis.scores.sink_score(maps[0][0])          # [heads]
    with analysis.head_mask(mask):                  # [layers, heads]
      model(tokens)
    analysis.importance.head_importance(model, batches)
"""

from attn_jax.analysis import importance, scores
from attn_jax.analysis.capture import capture_attention
from attn_jax.layers.scope import head_mask, layer_scope

__all__ = ["capture_attention", "head_mask", "importance", "layer_scope", "scores"]
