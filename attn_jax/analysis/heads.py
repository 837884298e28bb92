"""Every per-head score of a model at once, as `[layers, heads]` arrays.

    grid = head_scores(model, inputs, sources=scores.mqar_sources(...))
    grid["retrieval"][layer, head]

The maps come from `capture_attention` (eager model calls). A layer that records several
maps (differential attention's two, Based's window and linear branches) is scored on their
mean; a linear-family map (the implicit attention matrix) is first made a distribution per
query, `|A[t, s]| / Σ_s |A[t, s]|`, so every score reads the same way across mixers. A
layer without heads that attend (BaseConv, the identity), or whose maps are not one per
head, has NaN rows.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attn_jax.analysis import scores
from attn_jax.analysis.capture import capture_attention
from attn_jax.analysis.importance import head_grid

SCORES = ("sink", "retrieval", "induction", "entropy", "mean_distance")


def repeated_random_tokens(rng, batch, period, repeats, vocab_size):
  """`[batch, period · repeats]` int32: a random block of `period` tokens, repeated (the
  induction-head probe of Olsson et al., 2022)."""
  block = rng.integers(0, vocab_size, size=(batch, period))
  return np.tile(block, (1, repeats)).astype(np.int32)


def layer_maps(model, tokens):
  """`{layer: [batch, heads, T, T]}` float32 per-query distributions of each layer."""
  with capture_attention() as maps:
    model(jnp.asarray(tokens))
  out = {}
  for layer, recorded in maps.items():
    if layer < 0:
      continue
    distributions = [m if _is_distribution(m) else _normalise(m) for m in recorded]
    if len({d.shape for d in distributions}) == 1:  # else: not one map per head
      out[layer] = jnp.mean(jnp.stack(distributions), axis=0)
  return out


def _is_distribution(m):
  """Softmax maps are non-negative rows summing to ≤ 1 (less with a sink's share)."""
  return bool(jnp.all(m >= 0)) and bool(jnp.all(jnp.sum(m, axis=-1) <= 1 + 1e-4))


def _normalise(m):
  magnitude = jnp.abs(m)
  total = jnp.sum(magnitude, axis=-1, keepdims=True)
  return magnitude / jnp.where(total > 0, total, 1.0)


def head_scores(model, inputs, *, sources=None, induction_tokens=None,
                induction_period=None):
  """Every score of `scores` per layer and head.

  Args:
    model: a `DecoderLM`, called eagerly (keep the batch small: maps are T × T per head).
    inputs: `[batch, T]` tokens for the sink, retrieval, entropy and distance scores.
    sources: `[batch, T]` copy sources of `inputs` (`scores.mqar_sources`); without them
      the "retrieval" entry is NaN.
    induction_tokens, induction_period: tokens from `repeated_random_tokens` and their
      period, for the "induction" entry (NaN without them).

  Returns:
    `{name: [layers, heads] float64}` for every name of `SCORES`.
  """
  grid = head_grid(model)
  result = {name: np.full(grid, np.nan) for name in SCORES}
  fits = lambda maps: {layer: p for layer, p in maps.items() if p.shape[1] == grid[1]}
  for layer, p in fits(layer_maps(model, inputs)).items():
    result["sink"][layer] = scores.sink_score(p)
    result["entropy"][layer] = scores.entropy(p)
    result["mean_distance"][layer] = scores.mean_distance(p)
    if sources is not None:
      result["retrieval"][layer] = scores.retrieval_score(p, sources)
  if induction_tokens is not None:
    for layer, p in fits(layer_maps(model, induction_tokens)).items():
      result["induction"][layer] = scores.induction_score(p, induction_period)
  return result
