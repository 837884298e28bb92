"""Softmax cross entropy with integer targets, and the argmax, in few passes over the logits.

Over a language model's vocabulary the logits are the step's largest tensor (32,768
tokens × 32,000 float32 = 4.2 GB), so every pass over them costs time. Autodiff of
`optax.softmax_cross_entropy_with_integer_labels` plus a separate `jnp.argmax` read them
four times forward, and the gradient scattered the one-hot term into a second float32
array before the logits matmul's backward cast it to bfloat16 (`docs/perf/training.md`).
Here the forward reads them twice (the argmax, which also gives the maximum; then the
sum of exponentials) and the backward once, writing `softmax - one_hot` in one
elementwise expression that XLA fuses with the cast that consumes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy_and_argmax(logits, targets):
  """`logits [..., vocab]` float, `targets [...]` int → `(nll, predictions)`.

  nll `[...]` (logits' dtype): `logsumexp(logits) - logits[target]`.
  predictions `[...]` int32: `argmax(logits)` (the first maximum); no gradient.
  Targets index as in numpy (-1 is the last class); one outside `[-vocab, vocab)` gives
  a NaN nll. Both as `optax.softmax_cross_entropy_with_integer_labels`.
  """
  nll, predictions, _ = _forward(logits, targets)
  return nll, predictions


def _forward(logits, targets):
  predictions = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  top = _pick(logits, predictions)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  return lse - _pick(logits, targets), predictions, lse


def _pick(logits, index):
  return jnp.take_along_axis(logits, index[..., None], axis=-1)[..., 0]


def _fwd(logits, targets):
  nll, predictions, lse = _forward(logits, targets)
  return (nll, predictions), (logits, targets, lse)


def _bwd(residuals, cotangents):
  logits, targets, lse = residuals
  d_nll, _ = cotangents
  vocab = logits.shape[-1]
  targets = jnp.where(targets < 0, targets + vocab, targets)  # as the forward's gather
  one_hot = jnp.arange(vocab) == targets[..., None]
  d_logits = d_nll[..., None] * (jnp.exp(logits - lse[..., None]) - one_hot)
  return d_logits.astype(logits.dtype), None


cross_entropy_and_argmax.defvjp(_fwd, _bwd)
