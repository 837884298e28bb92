r"""Continues prompts with a trained model: `python -m experiments.generate --workdir=DIR`.

    python -m experiments.generate --workdir=workdirs/lm_text --prompt="Once upon a time"
    python -m experiments.generate --workdir=workdirs/mqar --prompt_tokens=5,70,9,81,5

`--prompt` needs a text dataset's tokenizer (from the saved config; the byte tokenizer is
also decoded back to text); `--prompt_tokens` takes token ids for any model.
`--temperature=0` (default) decodes greedily; > 0 samples, optionally among `--top_k`.
Prints the prompt, then each continuation (new tokens only) on a line of its own:

    prompt:    5 70 9 81 5
    generated: 70 12 ...

as token ids, or as quoted text (escapes show newlines) with the byte tokenizer. A
workdir without checkpoints, or without the checkpoint of `--step`, exits with status 2.

`--cache_policy` decodes under a KV-cache policy (docs/kv_cache.md), e.g.
`--cache_policy=sinks_window:sinks=4,window=60` (StreamingLLM) or
`--cache_policy=per_head:sinks=4,window=60,heads=0.1+1.0` (DuoAttention-style); with a
policy other than full, a line on stderr gives the caches' memory against the full cache.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (text datasets).")
_PROMPT_TOKENS = flags.DEFINE_list("prompt_tokens", None, "Prompt token ids.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_CACHE_POLICY = flags.DEFINE_string(
    "cache_policy", "full", "KV-cache policy: full, sinks_window:sinks=S,window=W or "
    "per_head:sinks=S,window=W,heads=L.H+L.H (docs/kv_cache.md).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from attn_jax import data, models, train  # pylint: disable=g-import-not-at-top
  from attn_jax.layers import kv_policy  # pylint: disable=g-import-not-at-top
  from attn_jax.models.generate import (  # pylint: disable=g-import-not-at-top
      kv_cache_memory)
  try:
    policy = kv_policy.parse(_CACHE_POLICY.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    config = train.load_config(_WORKDIR.value, _STEP.value)
  except FileNotFoundError as e:  # no such workdir or step: the message says which
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  tokenizer = None
  if _PROMPT.value is not None:
    spec = config.data.get("tokenizer")
    if spec is None:
      raise app.UsageError(f"--prompt needs a text dataset; {config.data.name!r} has no "
                           "tokenizer. Use --prompt_tokens.")
    tokenizer = data.get_tokenizer(spec)
    prompt = tokenizer.encode(_PROMPT.value)
  elif _PROMPT_TOKENS.value:
    prompt = np.asarray([int(t) for t in _PROMPT_TOKENS.value], np.int32)
  else:
    raise app.UsageError("give --prompt or --prompt_tokens.")
  model = train.load(_WORKDIR.value, step=_STEP.value)
  prompts = np.tile(prompt[None], (_NUM_SAMPLES.value, 1))
  try:  # builds the caches' shapes: checks the policy against the model
    memory = kv_cache_memory(model, batch_size=len(prompts),
                             max_len=len(prompt) + _MAX_NEW.value, cache_policy=policy)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  out = np.asarray(models.generate(model, prompts, max_new_tokens=_MAX_NEW.value,
                                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                   rng=jax.random.key(_SEED.value), cache_policy=policy))
  if not policy.is_full:
    print(f"cache: {memory['policy']}: {memory['bytes']} bytes, "
          f"{memory['fraction_of_full']:.1%} of the full cache's {memory['full_bytes']}",
          file=sys.stderr)
  print(f"prompt:    {_show(prompt, tokenizer)}")
  for row in out:
    print(f"generated: {_show(row[len(prompt):], tokenizer)}")


def _show(tokens, tokenizer):
  """Quoted text for the byte tokenizer (the only one that decodes), else token ids."""
  if tokenizer is not None and tokenizer.spec == "byte":
    return repr(bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", "replace"))
  return " ".join(str(t) for t in np.asarray(tokens).tolist())


if __name__ == "__main__":
  app.run(main)
