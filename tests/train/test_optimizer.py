"""`attn_jax.train.optimizer`: which parameters weight decay reaches."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attn_jax.train.optimizer import make_optimizer


def _one_step_with_zero_gradients(**options):
  config = ml_collections.ConfigDict(dict(learning_rate=0.5, warmup_steps=0,
                                          schedule="constant", weight_decay=0.1, **options))
  tx, _ = make_optimizer(config, num_steps=10)
  params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}
  updates, _ = tx.update({k: jnp.zeros_like(v) for k, v in params.items()},
                         tx.init(params), params)
  return {k: np.asarray(params[k] + updates[k]) for k in params}


def test_weight_decay_on_matrices_or_every_parameter():
  decayed = 1 - 0.5 * 0.1  # lr × weight decay, with zero gradients
  default = _one_step_with_zero_gradients()
  np.testing.assert_allclose(default["kernel"], decayed)
  np.testing.assert_array_equal(default["bias"], 1.0)  # rank 1: not decayed
  every = _one_step_with_zero_gradients(weight_decay_on="all")  # torch's AdamW
  np.testing.assert_allclose(every["kernel"], decayed)
  np.testing.assert_allclose(every["bias"], decayed)
  with pytest.raises(ValueError, match=r"weight_decay_on must be one of .*'biases'"):
    _one_step_with_zero_gradients(weight_decay_on="biases")
