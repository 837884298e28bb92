"""Autoregressive generation with per-layer caches: greedy and temperature sampling.

The prompt is fed one token at a time through `model.decode` (a `lax.scan`), which fills
every layer's cache (KV cache or recurrent state), then new tokens are drawn one at a
time. Everything runs in one `jax.jit`; decoding a token costs O(1) per linear mixer and
O(context) per softmax mixer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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


def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_k=None, rng=None):
  """Continues `prompts` by `max_new_tokens` tokens.

  Args:
    model: a `DecoderLM` (anything with `init_cache(batch, max_len)` and
      `decode(tokens_t [batch, 1], caches) -> (logits [batch, 1, vocab], caches)`).
    prompts: `[batch, prompt_len]` int tokens (all prompts of one length, ≥ 1).
    max_new_tokens: how many tokens to add.
    temperature: 0 for greedy decoding, > 0 to sample.
    top_k: sample among the k most likely tokens only.
    rng: a PRNG key for sampling (default `jax.random.key(0)`).

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
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompts, rng, int(max_new_tokens), float(temperature),
                   top_k)


@jax.jit(static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompts, rng, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompts.shape
  caches = model.init_cache(batch, prompt_len + max_new_tokens)

  def feed(caches, token):
    logits, caches = model.decode(token[:, None], caches)
    return caches, logits[:, 0]

  caches, logits = jax.lax.scan(feed, caches, prompts.T)

  def step(carry, key):
    caches, last = carry
    token = sample_logits(last, key, temperature=temperature, top_k=top_k)
    caches, logits = feed(caches, token)
    return (caches, logits), token

  keys = jax.random.split(rng, max_new_tokens)
  _, new = jax.lax.scan(step, (caches, logits[-1]), keys)
  return jnp.concatenate([prompts, new.T.astype(jnp.int32)], axis=1)
