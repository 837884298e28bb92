"""Per-head scores of attention maps `[batch, heads, q_len, kv_len]` (`capture_attention`).

Each returns `[heads]` float32, averaged over the batch and the queries it defines.
Queries and keys share positions (self-attention, q_len == kv_len, query t at key t).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def sink_score(probabilities):
  """Attention mass on the first token, averaged over queries (Gu et al., 2024, "When
  Attention Sink Emerges in Language Models", the α of each head); a head with a score
  above ε (0.3 there) is a sink head (`sink_ratio`)."""
  return jnp.mean(probabilities[..., 0], axis=(0, 2))


def sink_ratio(scores, epsilon=0.3):
  """The fraction of heads whose `sink_score` exceeds `epsilon` (the paper's metric)."""
  return jnp.mean(jnp.asarray(scores) > epsilon)


def retrieval_score(probabilities, sources):
  """The fraction of copy events at which the head's most-attended key is the source of
  the token being produced (Wu et al., 2024, "Retrieval Head Mechanistically Explains
  Long-Context Factuality").

  Args:
    probabilities: `[batch, heads, T, T]`.
    sources: `[batch, T]` ints: at a copy event (query t), the key position the produced
      token is copied from; -1 where there is none. On MQAR the source of a query is its
      value's position in the pairs (`mqar_sources`).
  """
  sources = jnp.asarray(sources)
  events = sources >= 0  # [batch, T]
  top = jnp.argmax(probabilities, axis=-1)  # [batch, heads, T]
  hits = (top == sources[:, None]) & events[:, None]
  return jnp.sum(hits, axis=(0, 2)) / jnp.maximum(jnp.sum(events), 1)


def mqar_sources(inputs, targets, loss_mask):
  """`[batch, T]` source positions of MQAR's copy events: at a query (loss_mask 1) the
  position of its target value among the key–value pairs (the first occurrence of the
  value token before the query), else -1."""
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  queries = np.asarray(loss_mask) > 0
  seq = inputs.shape[1]
  earlier = np.arange(seq)[None, :] < np.arange(seq)[:, None]  # [t, s]: s < t
  match = (inputs[:, None, :] == targets[:, :, None]) & earlier[None]  # [b, t, s]
  first = np.where(match.any(-1), match.argmax(-1), -1)
  return np.where(queries, first, -1)


def induction_score(probabilities, period):
  """Attention from each token of the repeat to the token after its previous occurrence,
  on sequences made of a random block of `period` tokens repeated (Olsson et al., 2022,
  "In-context Learning and Induction Heads", the prefix-matching score): the mean of
  A[t, t − period + 1] over t ≥ period."""
  seq = probabilities.shape[-1]
  t = jnp.arange(period, seq)
  return jnp.mean(probabilities[:, :, t, t - period + 1], axis=(0, 2))


def entropy(probabilities):
  """Mean entropy (nats) of each query's attention distribution."""
  p = probabilities
  return -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0),
                           axis=-1), axis=(0, 2))


def mean_distance(probabilities):
  """Mean attention distance: Σ_s A[t, s] · |t − s|, averaged over queries."""
  seq_q, seq_k = probabilities.shape[-2:]
  query_at = jnp.arange(seq_q)[:, None] + (seq_k - seq_q)  # aligned at the end
  distance = jnp.abs(query_at - jnp.arange(seq_k)[None, :])
  return jnp.mean(jnp.sum(probabilities * distance, axis=-1), axis=(0, 2))
