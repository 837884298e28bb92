"""`cross_entropy_and_argmax` against optax and jnp.argmax, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.train.cross_entropy import cross_entropy_and_argmax


def _inputs(shape, vocab, scale, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = scale * jax.random.normal(k1, shape + (vocab,), jnp.float32)
  return logits, jax.random.randint(k2, shape, 0, vocab)


@pytest.mark.parametrize("shape,vocab,scale", [((3, 5), 7, 1.0), ((2, 9), 130, 30.0),
                                               ((4,), 3, 1e3)])
def test_matches_optax_and_argmax(shape, vocab, scale):
  logits, targets = _inputs(shape, vocab, scale)
  weights = jax.random.uniform(jax.random.key(1), shape)
  nll, predictions = cross_entropy_and_argmax(logits, targets)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_array_equal(predictions, jnp.argmax(logits, -1))
  assert predictions.dtype == jnp.int32

  ours = jax.grad(lambda l: jnp.sum(cross_entropy_and_argmax(l, targets)[0] * weights))
  theirs = jax.grad(lambda l: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(l, targets) * weights))
  np.testing.assert_allclose(ours(logits), theirs(logits), rtol=1e-5, atol=1e-6)


def test_negative_targets_index_from_the_end():
  logits, targets = _inputs((2, 5), 9, 2.0)
  targets = targets - 9 * (jnp.arange(5) % 2)  # every other target as its negative index
  ours = jax.grad(lambda l: jnp.sum(cross_entropy_and_argmax(l, targets)[0]))(logits)
  theirs = jax.grad(lambda l: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(l, targets)))(logits)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_first_maximum_on_ties():
  logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
  _, predictions = cross_entropy_and_argmax(logits, jnp.array([0, 3]))
  np.testing.assert_array_equal(predictions, [1, 0])


def test_gradient_is_elementwise():
  # The one-hot term is a comparison with an iota, not a scatter into a second array.
  logits, targets = _inputs((2, 3), 11, 1.0)
  grad = jax.grad(lambda l: jnp.sum(cross_entropy_and_argmax(l, targets)[0]))
  text = jax.jit(grad).lower(logits).as_text()
  assert "scatter" not in text
