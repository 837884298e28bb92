"""The backend-neutral parts of chunked linear attention, in plain JAX outside any kernel:
what every backend of `linear_attention` and the sequence-parallel state passing
(`attn_jax.parallel.state_passing`) compute alike.

Notation (every backend's). Per value head the state follows

  S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ,   a_t = exp(g_t),  g_t ≤ 0,

and is zeroed before every token where `resets` is set; the tokens from one reset to the
next form a run. The sequence is cut into chunks of C tokens (a sequence piece, or one
device's block, is a chunk to the same bookkeeping):

  b_i   = Σ_{j ≤ i in i's chunk} g_j        the cumulative log decay inside the chunk;
  rel_i = resets at or before i in i's chunk  i's run within the chunk (0: the run that
                                             entered it).

Resets are masks on runs, never decays (a log decay of −inf would give −inf − (−inf) in
b_i − b_j): token i reads the state entering its chunk only while rel_i = 0, token j feeds
the state leaving it only from the chunk's last run, and that state passes the chunk only
if the chunk holds no reset. Over a chunk the state map is then affine, S_end = M ⊙ S_start
+ E, and chunks, pieces or devices are chained by `affine_scan`.

Kernel bodies keep their own in-kernel forms of the same masks (tiles, not whole arrays).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def per_token_log_decay(log_decay, batch, seq, heads):
  """Any decay form as a float32 gate per token.

  Args:
    log_decay: None (no decay), `[heads]` (fixed per head), `[batch, seq, heads]` (scalar
      gate per token) or `[batch, seq, heads, key_dim]` (vector gate over keys); ≤ 0.
    batch, seq, heads: the sizes of the call (heads: value heads).

  Returns:
    g `[batch, seq, heads]` (None as zeros, a fixed decay broadcast over batch and
    tokens) or `[batch, seq, heads, key_dim]`, float32.

  Raises:
    ValueError: log_decay fits no decay form.
  """
  if log_decay is None:
    return jnp.zeros((batch, seq, heads), jnp.float32)
  if log_decay.shape == (heads,):
    return jnp.broadcast_to(log_decay.astype(jnp.float32), (batch, seq, heads))
  if log_decay.shape[:3] == (batch, seq, heads) and log_decay.ndim in (3, 4):
    return log_decay.astype(jnp.float32)
  raise ValueError(f"log_decay has shape {log_decay.shape}; expected None, ({heads},), "
                   f"{(batch, seq, heads)} or {(batch, seq, heads)} + (key_dim,).")


def expand_heads(x, repeats):
  """Query/key heads `[batch, seq, heads, dim]` repeated to the value heads: head h serves
  value heads h·r … h·r + r − 1, r = `repeats` (GQA, Mamba-2 groups)."""
  return x if repeats == 1 else jnp.repeat(x, repeats, axis=2)


def cumsum_in_chunks(x, chunk):
  """Prefix sums of x along the sequence, restarting at every chunk.

  Args:
    x: `[batch, seq, ...]`, seq a multiple of `chunk`. The gate g gives b, the cumulative
      log decay inside each chunk; resets (as int32) give rel, each token's run within its
      chunk.
    chunk: tokens per chunk (seq: one sum over the whole sequence).

  Returns:
    x's shape and dtype: element t is the sum of x over the tokens of t's chunk up to t.
  """
  batch, seq = x.shape[:2]
  split = x.reshape(batch, seq // chunk, chunk, *x.shape[2:])
  return jnp.cumsum(split, axis=2).reshape(x.shape)


class RunMasks(NamedTuple):
  """How a chunk's runs meet the states entering and leaving it (see the module
  docstring); shapes as `run_masks`'s rel `[..., C]`."""
  incoming: jax.Array  # [..., C] bool: rel = 0, the token reads the state entering
  outgoing: jax.Array  # [..., C] bool: rel = rel_C, the token feeds the state leaving
  passes: jax.Array  # [..., 1] bool: rel_C = 0, no reset: the entering state passes


def run_masks(rel):
  """The `RunMasks` of chunks from rel `[..., C]` (int: each token's run within its chunk,
  `cumsum_in_chunks` of the resets; the chunk's tokens along the last axis)."""
  last = rel[..., -1:]
  return RunMasks(incoming=rel == 0, outgoing=rel == last, passes=last == 0)


def affine_scan(decay, increment, initial, *, reverse=False):
  """The affine state recurrence S ← M ⊙ S + E, one step per chunk, piece or device.

  Args:
    decay: M `[n, ...]` per step, broadcastable against the state (e.g. `[n, B, H, K|1,
      1]`): e^{Σ g} over the step's tokens, or 0 where they hold a reset.
    increment: E `[n, ...]` per step, the state's shape: the step's state from a zero
      start.
    initial: the state before the first step (before the last, with `reverse`).
    reverse: run the steps from the last to the first (the state gradient's direction).

  Returns:
    The state the last step ends with, and the state each step starts from `[n, ...]`
    (with `reverse`, step n − 1 runs first and step 0 ends).
  """
  def step(state, xs):
    m, e = xs
    return m * state + e, state

  return lax.scan(step, initial, (decay, increment), reverse=reverse)
