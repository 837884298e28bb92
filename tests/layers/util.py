"""Shared fixtures of the layer tests: small mixers, built once, and jitted runners.

Every mixer is built at the same small sizes (d_model 16, 2 heads, 8 tokens, chunks of 3
tokens so the chunked path crosses chunk boundaries mid-segment) so parameter shapes, and
with them compiled initialisers, are shared across tests; each runner is one jitted
program, compiled once per mixer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax import layers

D_MODEL, HEADS, BATCH, SEQ = 16, 2, 2, 8

# Small options per mixer; short convolutions on where the mixer has them.
OPTIONS = {
    "softmax": dict(num_kv_heads=1),
    "swa": dict(window_size=3),
    "diff": dict(),
    "mla": dict(kv_lora_rank=8, q_lora_rank=8),
    "linear": dict(chunk_size=3, short_conv_size=3),
    "efficient": dict(chunk_size=3),
    "lightning": dict(chunk_size=3, layer_index=1, num_layers=3),
    "retnet": dict(chunk_size=3),
    "gla": dict(chunk_size=3, gate_rank=4, short_conv_size=3),
    "based": dict(chunk_size=3, feature_dim=4, window_size=3, short_conv_size=2),
    "hgrn2": dict(chunk_size=3, lower_bound=0.2, short_conv_size=3),
    "mamba2": dict(chunk_size=3, state_size=4),
    "base_conv": dict(kernel_size=-1, max_len=16, filter_order=8),
    "hyena": dict(max_len=16, filter_order=8),
}


@functools.lru_cache(maxsize=None)
def _build(name, options):
  # Random initialisers compile once per parameter shape (seconds each on a loaded CPU),
  # so tests build the module abstractly and fill its parameters from numpy. The real
  # initialisers are exercised by test_registry.test_real_initialisation.
  abstract = nnx.eval_shape(lambda: layers.make_mixer(
      name, d_model=D_MODEL, num_heads=HEADS, rngs=nnx.Rngs(0), **dict(options)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    param = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    if param in ("scale", "skip"):
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(0.25 * noise)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def build(name, **overrides):
  """The mixer `name` at the test sizes (cached: tests must not change its parameters)."""
  options = {**OPTIONS[name], **overrides}
  default_causal = "causal_self" in layers.REGISTRY[name].PATTERNS
  if options.get("causal", default_causal) == default_causal:
    options["causal"] = default_causal  # one cache entry whether or not causal is given
  return _build(name, tuple(sorted(options.items())))


def inputs(seq=SEQ, seed=0, batch=BATCH):
  return jax.random.normal(jax.random.key(seed), (batch, seq, D_MODEL), jnp.float32)


@nnx.jit
def forward(m, x, segment_ids=None):
  return m(x, segment_ids=segment_ids)


@nnx.jit
def forward_cross(m, x, context):
  return m(x, context=context)


@nnx.jit
def decode_all(m, xs, cache):
  """Decodes `xs [batch, seq, d_model]` token by token (a scan over decode steps).

  Returns the outputs `[batch, seq, d_model]` and the cache after every step (each leaf
  stacked on a leading seq axis).
  """
  def step(cache, x_t):
    y_t, cache = m.decode(x_t[:, None], cache)
    return cache, (y_t[:, 0], cache)
  _, (ys, caches) = jax.lax.scan(step, cache, jnp.moveaxis(xs, 1, 0))
  return jnp.moveaxis(ys, 0, 1), caches


def last(caches):
  """The final cache of `decode_all`'s stacked caches."""
  return jax.tree.map(lambda c: c[-1], caches)


def param(p):
  """A parameter as a float64 numpy array."""
  return np.asarray(p[...], np.float64)


def rel_err(a, b):
  """RMS of a − b relative to the RMS of b."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2) / (np.mean(b ** 2) + 1e-30)))
