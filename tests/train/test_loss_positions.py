"""Logits only at the loss positions give the sums of logits everywhere."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attn_jax import models
from attn_jax.data.mqar import mqar_examples
from attn_jax.train import config_check
from attn_jax.train.step import model_metrics
from tests.train.tiny import tiny_config


def test_loss_positions_give_the_same_sums():
  model = models.DecoderLM(vocab_size=64, d_model=16, num_layers=2, num_heads=2,
                           mlp_dim=32, mixers="softmax", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in mqar_examples(
      8, vocab_size=64, seq_len=32, num_kv_pairs=4, power_a=0.01,
      rng=np.random.default_rng(0)).items()}
  batch["loss_mask"] = batch["loss_mask"].at[0, :].set(0.0)  # a row without queries
  everywhere = model_metrics(graphdef, params, batch)
  for n in (4, 6):  # exactly the queries, and two more (padding with mask 0)
    picked = model_metrics(graphdef, params, batch, loss_positions=n)
    for key in ("loss_sum", "correct", "count"):
      np.testing.assert_allclose(picked[key], everywhere[key], rtol=1e-5)


def test_loss_positions_must_hold_every_query(tmp_path):
  config = tiny_config(tmp_path)
  config.train.loss_positions = 4
  config_check.check_config(config)
  with config.unlocked():
    config.data.eval_slices = "32x4:64,64x8:64"
  with pytest.raises(ValueError, match="set it to 8"):
    config_check.check_config(config)
  config.train.loss_positions = -1
  with pytest.raises(ValueError, match="loss_positions must be an int"):
    config_check.check_config(config)
