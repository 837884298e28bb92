"""Encoder classifier: bidirectional mixers, pooled over the sequence, a linear head.

    tokens → embed → [norm → mixer → +, norm → SwiGLU → +] × L → norm → pool → logits

Every mixer is built with `causal=False` (non-causal self-attention), so only mixers that
define that pattern fit (softmax, swa, linear, efficient, based, ...; an RNN-only mixer
such as hgrn2 raises a ValueError naming `causal`). Pooling is the mean over the tokens
of the sequence (`mask`, e.g. non-padding) or the first token ("cls").
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.layers.common import Projection, check_positive_int
from attn_jax.models.blocks import Trunk, ops_context

POOLINGS = ("mean", "first")


class EncoderClassifier(Trunk):
  """A sequence classifier.

  Args:
    vocab_size, d_model, num_layers, num_heads, mlp_dim, mixers, mixer_options, dtype,
      param_dtype, remat, norm_eps, norm, positions, max_len, embed_dropout: as in
      `DecoderLM`.
    num_classes: classes of the head.
    pooling: "mean" (over unmasked tokens) or "first" (a CLS token at position 0).
    rngs: `nnx.Rngs` for the parameters.
  """

  def __init__(self, *, vocab_size, d_model, num_layers, num_heads, mlp_dim, mixers,
               num_classes, rngs, pooling="mean", mixer_options=None, dtype=None,
               param_dtype="float32", remat="none", norm_eps=1e-6, norm="rms",
               positions="none", max_len=0, embed_dropout=0.0):
    num_classes = check_positive_int("num_classes", num_classes)
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")
    param_dtype = jnp.dtype(param_dtype)
    super().__init__(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                     num_heads=num_heads, mlp_dim=mlp_dim, mixers=mixers, causal=False,
                     rngs=rngs, mixer_options=mixer_options, dtype=dtype,
                     param_dtype=param_dtype, remat=remat, norm_eps=norm_eps, norm=norm,
                     positions=positions, max_len=max_len, embed_dropout=embed_dropout)
    self.num_classes = num_classes
    self.pooling = pooling
    self.head = Projection((d_model,), (num_classes,), ("embed", None), rngs=rngs,
                           param_dtype=param_dtype)

  def __call__(self, tokens, mask=None, segment_ids=None):
    """`tokens [batch, seq]` → class logits `[batch, num_classes]` float32.

    Args:
      mask: `[batch, seq]`, 1 for tokens to pool over (default all). Padding should also
        get its own segment id so that real tokens do not attend to it.
      segment_ids: `[batch, seq]` ints; tokens attend within their segment.
    """
    with ops_context(self.kernels):
      x = self.features(tokens, segment_ids).astype(jnp.float32)
    if self.pooling == "first":
      pooled = x[:, 0]
    else:
      weights = (jnp.ones(x.shape[:2], jnp.float32) if mask is None
                 else jnp.asarray(mask, jnp.float32))
      pooled = (jnp.einsum("bsd,bs->bd", x, weights)
                / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0))
    return self.head(pooled).astype(jnp.float32)
