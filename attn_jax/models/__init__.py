"""Models built from the mixers of `attn_jax.layers`: a decoder LM and an encoder classifier.

    model = attn_jax.models.build(config.model, vocab_size=..., rngs=nnx.Rngs(0))
"""

from attn_jax.models.blocks import REMAT_POLICIES, Block, Embed, MLP, expand_mixers
from attn_jax.models.build import build, model_kwargs
from attn_jax.models.decoder import DecoderLM
from attn_jax.models.encoder import EncoderClassifier
from attn_jax.models.generate import generate, sample_logits

__all__ = ["MLP", "REMAT_POLICIES", "Block", "DecoderLM", "Embed", "EncoderClassifier",
           "build", "expand_mixers", "generate", "model_kwargs", "sample_logits"]
