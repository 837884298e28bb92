"""`Mixer.decode_state_size` and `DecoderLM.decode_state_size`: the numbers carried between tokens."""

from __future__ import annotations

import pytest
from flax import nnx

from attn_jax import models
from tests.layers import util

HEAD_DIM = util.D_MODEL // util.HEADS  # 8


@pytest.mark.parametrize("name, seq_len, expected", [
    # KV cache: 2 · seq · kv_heads (1) · head_dim.
    ("softmax", 10, 2 * 10 * 1 * HEAD_DIM),
    # Ring buffer of window (3) slots, 2 kv heads; fewer slots when the sequence is shorter.
    ("swa", 10, 2 * 3 * 2 * HEAD_DIM),
    ("swa", 2, 2 * 2 * 2 * HEAD_DIM),
    # Heads (2) × state_size (4) × head_dim (2 · 16 / 2), plus 3 taps of x, B and C.
    ("mamba2", 10, 2 * 4 * 16 + 3 * (2 * 16 + 4 + 4)),
    # The inputs so far (long convolution), d_model channels.
    ("base_conv", 10, 10 * util.D_MODEL),
    # Gated values so far, plus 2 taps of the short convolution over 3 · d_model.
    ("hyena", 10, 10 * util.D_MODEL + 2 * 3 * util.D_MODEL),
])
def test_mixer_state_size(name, seq_len, expected):
  assert util.build(name).decode_state_size(seq_len) == expected


@pytest.mark.parametrize("name", ["lightning", "mamba2", "based"])
def test_recurrent_state_does_not_grow(name):
  m = util.build(name)
  assert m.decode_state_size(4) == m.decode_state_size(1000)


def test_based_counts_taylor_state_and_window():
  m = util.build("based")  # feature_dim 4, window 3, short convolutions of 2
  features = 1 + 4 + 4 * 5 // 2
  linear = util.HEADS * features * (HEAD_DIM + 1)  # numerator and normaliser column
  window = 2 * 3 * util.HEADS * HEAD_DIM
  convs = util.HEADS * (4 + 4 + HEAD_DIM)  # one tap each of q, k (feature_dim), v
  assert m.decode_state_size(10) == linear + window + convs


def test_model_state_size_sums_its_layers():
  model = nnx.eval_shape(lambda: models.DecoderLM(
      vocab_size=32, d_model=16, num_layers=2, num_heads=2, mlp_dim=32,
      mixers=["softmax", "lightning"], rngs=nnx.Rngs(0)))
  assert model.decode_state_size(12) == sum(b.mixer.decode_state_size(12) for b in model.blocks)
  assert model.decode_state_size(12) - model.decode_state_size(6) == 2 * 6 * 2 * HEAD_DIM  # the KV cache


def test_encoder_only_mixer_has_no_state_size():
  with pytest.raises(ValueError, match="no decode path"):
    util.build("efficient", causal=False).decode_state_size(8)
