"""Autoregressive generation with per-layer caches: greedy and temperature sampling.

The prompt is fed one token at a time through `model.decode` (a `lax.scan`), which fills
every layer's cache (KV cache or recurrent state), then new tokens are drawn one at a
time. Everything runs in one `jax.jit`; decoding a token costs O(1) per linear mixer and
O(context) per softmax mixer.

A KV-cache policy (`cache_policy=`, `attn_jax.layers.kv_policy`, docs/kv_cache.md) keeps
fewer tokens in the softmax mixers' caches: `decode_logits` runs a whole sequence through
decode under one (teacher forcing), so a model can be evaluated as it would generate, and
`kv_cache_memory` says what the caches hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attn_jax.layers import kv_policy


def sample_logits(logits, key, *, temperature=0.0, top_k=None):
  """Next tokens `[batch]` from logits `[batch, vocab]`.

  temperature 0 is greedy (argmax); otherwise tokens are drawn from
  `softmax(logits / temperature)`, restricted to the `top_k` largest when given.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_k=None, rng=None,
             cache_policy=None):
  """Continues `prompts` by `max_new_tokens` tokens.

  Args:
    model: a `DecoderLM` (anything with `init_cache(batch, max_len, policy=None)` and
      `decode(tokens_t [batch, 1], caches) -> (logits [batch, 1, vocab], caches)`).
    prompts: `[batch, prompt_len]` int tokens (all prompts of one length, ≥ 1).
    max_new_tokens: how many tokens to add.
    temperature: 0 for greedy decoding, > 0 to sample.
    top_k: sample among the k most likely tokens only.
    rng: a PRNG key for sampling (default `jax.random.key(0)`).
    cache_policy: None (every token), a `kv_policy.CachePolicy`, or its flag string
      (e.g. "sinks_window:sinks=4,window=60"; `kv_policy.parse`).

  Returns:
    `[batch, prompt_len + max_new_tokens]` int32: the prompts and their continuations.
  """
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 2 or prompts.shape[1] < 1:
    raise ValueError(f"prompts must be [batch, prompt_len >= 1] tokens; got shape "
                     f"{prompts.shape}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0; got {temperature}.")
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}.")
  policy = kv_policy.resolve(cache_policy)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompts, rng, int(max_new_tokens), float(temperature),
                   top_k, policy)


def decode_logits(model, tokens, cache_policy=None):
  """Teacher-forced decoding: the logits of every position, computed token by token.

  Feeds `tokens` through `model.decode` in one jitted `lax.scan`, so position t's logits
  come from the caches as generation would have them after t + 1 tokens. With the full
  cache they equal the parallel `model(tokens)` (up to rounding); under a KV-cache policy
  they are what the model predicts with that cache, for evaluation.

  Args:
    model: as `generate`.
    tokens: `[batch, seq]` int tokens, seq ≥ 1 (one sequence per row: no packing).
    cache_policy: as `generate`.

  Returns:
    logits `[batch, seq, vocab]` float32.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"tokens must be [batch, seq >= 1]; got shape {tokens.shape}.")
  graphdef, state = nnx.split(model)
  return _decode_logits(graphdef, state, tokens, kv_policy.resolve(cache_policy))


def kv_cache_memory(model, *, batch_size, max_len, cache_policy=None):
  """What a model's decode caches hold for `max_len` tokens under a policy, against full.

  Counted from the caches' shapes (`jax.eval_shape`, nothing is allocated) by
  `kv_policy.cache_memory`: floating-point numbers and bytes of every cache (KV caches,
  and recurrent states, which no policy changes), integer bookkeeping left out.

  Returns:
    `{"policy": flag string, "numbers", "bytes", "full_numbers", "full_bytes",
    "fraction_of_full": bytes / full_bytes, "layer_bytes": [bytes of each layer]}`.
  """
  policy = kv_policy.resolve(cache_policy)
  shapes = lambda p: jax.eval_shape(lambda: _init_cache(model, batch_size, max_len, p))
  caches, full = shapes(policy), shapes(kv_policy.full())
  used, whole = kv_policy.cache_memory(caches), kv_policy.cache_memory(full)
  return {"policy": str(policy), "numbers": used.numbers, "bytes": used.bytes,
          "full_numbers": whole.numbers, "full_bytes": whole.bytes,
          "fraction_of_full": used.bytes / whole.bytes if whole.bytes else 1.0,
          "layer_bytes": [kv_policy.cache_memory(c).bytes for c in caches]}


def _init_cache(model, batch, max_len, policy):
  # A model without policies serves the full one.
  if policy.is_full:
    return model.init_cache(batch, max_len)
  return model.init_cache(batch, max_len, policy=policy)


def _feed(model, caches, token):
  logits, caches = model.decode(token[:, None], caches)
  return caches, logits[:, 0]


@jax.jit(static_argnums=(0, 3))
def _decode_logits(graphdef, state, tokens, policy):
  model = nnx.merge(graphdef, state)
  caches = _init_cache(model, *tokens.shape, policy)
  _, logits = jax.lax.scan(lambda c, t: _feed(model, c, t), caches, tokens.T)
  return jnp.moveaxis(logits, 0, 1).astype(jnp.float32)


@jax.jit(static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompts, rng, max_new_tokens, temperature, top_k, policy):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompts.shape
  caches = _init_cache(model, batch, prompt_len + max_new_tokens, policy)
  feed = lambda caches, token: _feed(model, caches, token)
  caches, logits = jax.lax.scan(feed, caches, prompts.T)

  def step(carry, key):
    caches, last = carry
    token = sample_logits(last, key, temperature=temperature, top_k=top_k)
    caches, logits = feed(caches, token)
    return (caches, logits), token

  keys = jax.random.split(rng, max_new_tokens)
  _, new = jax.lax.scan(step, (caches, logits[-1]), keys)
  return jnp.concatenate([prompts, new.T.astype(jnp.int32)], axis=1)
