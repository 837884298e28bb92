"""Decoder-only language model with a per-layer list of mixers.

    tokens → embed → [norm → mixer → +, norm → SwiGLU → +] × L → norm → logits

`mixers` names the mixer of every layer (`attn_jax.layers.REGISTRY`), so a Transformer is
`["softmax"]`, MiniMax-01's hybrid `["lightning"] * 7 + ["softmax"]`, a Griffin-style
model `["hgrn2", "hgrn2", "swa"]` and a Based model `["based"]` — configs, not code. The
pattern repeats to `num_layers`.

Generation decodes one token at a time against per-layer caches (KV caches for softmax
mixers, recurrent states for linear ones), optionally under a KV-cache policy
(`attn_jax.layers.kv_policy`, docs/kv_cache.md): see `generate.py`.
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax import sharding
from attn_jax.layers import kv_policy
from attn_jax.layers.common import Projection
from attn_jax.layers.scope import layer_scope
from attn_jax.models.blocks import Trunk, ops_context


class DecoderLM(Trunk):
  """A causal language model.

  Args:
    vocab_size: tokens.
    d_model, num_layers, num_heads: width, depth, heads per mixer.
    mlp_dim: SwiGLU hidden width.
    mixers: a mixer name or a list of names, repeated to num_layers.
    rngs: `nnx.Rngs` for the parameters.
    mixer_options: `{name: {option: value}}` for each mixer kind, and `{"all": {...}}`
      for options given to every mixer that takes them (e.g. `chunk_size`).
    tie_embeddings: the output projection is the transposed token embedding.
    dtype: compute dtype name (e.g. "bfloat16"; None keeps float32).
    param_dtype: parameter dtype (float32).
    remat: activation checkpointing per block: "none", "full", "dots", "dots_no_batch".
    norm_eps: norm epsilon.
    norm: "rms" (RMSNorm) or "layer" (LayerNorm, as Zoology's models).
    positions: "none" (position only through the mixers, e.g. RoPE) or "learned"
      (absolute position embeddings added to the tokens', GPT-2 and Zoology's attention
      models); `max_len` positions then.
    embed_dropout: dropout on the embeddings in training (`scope.dropout_rng`; Zoology's
      models: 0.1).
  """

  def __init__(self, *, vocab_size, d_model, num_layers, num_heads, mlp_dim, mixers, rngs,
               mixer_options=None, tie_embeddings=True, dtype=None, param_dtype="float32",
               remat="none", norm_eps=1e-6, norm="rms", positions="none", max_len=0,
               embed_dropout=0.0):
    param_dtype = jnp.dtype(param_dtype)
    super().__init__(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                     num_heads=num_heads, mlp_dim=mlp_dim, mixers=mixers, causal=True,
                     rngs=rngs, mixer_options=mixer_options, dtype=dtype,
                     param_dtype=param_dtype, remat=remat, norm_eps=norm_eps, norm=norm,
                     positions=positions, max_len=max_len, embed_dropout=embed_dropout)
    self.head = None if tie_embeddings else Projection(
        (d_model,), (vocab_size,), ("embed", "vocab"), rngs=rngs, param_dtype=param_dtype)

  def __call__(self, tokens, segment_ids=None, positions=None):
    """`tokens [batch, seq]` int → logits `[batch, seq, vocab]` float32.

    With segment ids (packed sequences) no token sees another segment. Under a mesh
    whose `seq` axis is split (the sharding rules), attention runs sequence-parallel.
    `positions [batch, n]` (ints): logits only there, `[batch, n, vocab]` — what a loss
    on a few positions per row (MQAR's queries) needs, without the vocabulary projection
    of every other token.
    """
    with ops_context(self.kernels):
      x = self.features(tokens, segment_ids)
      if positions is None:
        return self._logits(x)
      x = jnp.take_along_axis(x, jnp.asarray(positions)[..., None], axis=1)
      return self._logits(x, ("batch", None, "act_vocab"))

  def _logits(self, x, axes=("batch", "seq", "act_vocab")):
    if self.head is None:
      logits = self.embed.attend(x)
    else:
      logits = self.head(x).astype(jnp.float32)
    return sharding.constrain(logits, axes)

  def init_cache(self, batch_size, max_len, policy=None):
    """Per-layer decode caches (a list of pytrees) for `max_len` tokens.

    `policy`: a KV-cache policy (None or "full": every token; a flag string or a
    `kv_policy.CachePolicy`, see `kv_policy.parse`). Layer i's mixer gets
    `policy.for_layer(i)`; mixers without a KV cache (recurrent states, long
    convolutions) keep their state as it is.
    """
    policy = kv_policy.resolve(policy)
    policy.check_layers(len(self.blocks))
    caches = []
    for i, block in enumerate(self.blocks):
      if policy.is_full or not block.mixer.CACHE_POLICY:
        caches.append(block.mixer.init_cache(batch_size, max_len))
      else:
        caches.append(block.mixer.init_cache(batch_size, max_len,
                                             policy=policy.for_layer(i)))
    return caches

  def decode_state_size(self, seq_len):
    """Numbers carried from token to token after `seq_len` tokens, summed over the
    layers' mixers (`Mixer.decode_state_size`; Zoology's bytes are 4 × this)."""
    return sum(block.mixer.decode_state_size(seq_len) for block in self.blocks)

  def decode(self, tokens_t, caches):
    """One token per sequence: `tokens_t [batch, 1]` → (logits `[batch, 1, vocab]`,
    new caches)."""
    with ops_context(self.kernels):
      positions = jnp.broadcast_to(caches[0]["pos"], tokens_t.shape)
      x = self.embed_tokens(tokens_t, positions)
      new = []
      for i, (block, cache) in enumerate(zip(self.blocks, caches)):
        with layer_scope(i):  # as in the forward pass (attn_jax.analysis, head masks)
          x, cache = block.decode(x, cache)
        new.append(cache)
      return self._logits(self.final_norm(x)), new

