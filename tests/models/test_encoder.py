"""The encoder classifier: bidirectional mixers, pooling, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import models

VOCAB = 32


def make(mixers=("softmax", "linear"), **kwargs):
  kwargs = {"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "num_heads": 4,
            "mlp_dim": 64, "mixers": list(mixers), "num_classes": 3,
            "rngs": nnx.Rngs(0), **kwargs}
  return models.EncoderClassifier(**kwargs)


@jax.jit
def classify(graphdef, state, toks, mask=None, segment_ids=None):
  return nnx.merge(graphdef, state)(toks, mask=mask, segment_ids=segment_ids)


def test_bidirectional_and_padding_invariant():
  graphdef, state = nnx.split(make())
  toks = jax.random.randint(jax.random.key(0), (2, 10), 1, VOCAB)
  logits = classify(graphdef, state, toks)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  # Non-causal: the pooled output depends on every token, the last one included.
  changed = classify(graphdef, state, toks.at[:, -1].set((toks[:, -1] + 1) % VOCAB))
  assert not np.allclose(changed, logits)
  # Padding in its own segment and left out of the pooling changes nothing.
  padded = jnp.concatenate([toks, jnp.zeros((2, 6), toks.dtype)], axis=1)
  ids = jnp.concatenate([jnp.ones((2, 10), jnp.int32), jnp.zeros((2, 6), jnp.int32)], 1)
  np.testing.assert_allclose(classify(graphdef, state, padded, ids, ids), logits,
                             atol=1e-5)


def test_first_token_pooling_and_errors():
  model = make(pooling="first")
  assert jax.eval_shape(model, jnp.ones((1, 4), jnp.int32)).shape == (1, 3)
  with pytest.raises(ValueError, match="causal"):
    make(["hgrn2"])  # an RNN has no bidirectional form
  with pytest.raises(ValueError, match="pooling"):
    make(pooling="max")
