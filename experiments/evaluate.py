r"""Evaluates a trained workdir on its eval split: `python -m experiments.evaluate --workdir=DIR`.

Uses the config saved with the checkpoint; `--step` picks a checkpoint (default: the
newest), `--num_steps` the number of eval batches (default: the config's; 0 = all).
Prints one JSON line: {"step": ..., "eval/loss": ..., "eval/accuracy": ...}. A workdir
without checkpoints, or without the checkpoint of `--step`, exits with status 2 and says so;
a checkpoint that does not restore (damaged files), with status 1, naming its step and the
damage.

`--cache_policy` evaluates the model as it would generate under a KV-cache policy
(docs/kv_cache.md): every eval sequence is decoded token by token against caches that keep
what the policy keeps (`attn_jax.models.generate.decode_logits`), on one device:

    python -m experiments.evaluate --workdir=DIR \
        --cache_policy=sinks_window:sinks=4,window=60

The line then also holds "cache_policy", "cache/bytes" and "cache/full_bytes" (the decode
caches of one sequence of the longest eval length, under the policy and in full) and
"cache/fraction_of_full"; with MQAR eval slices, each slice's
"cache/fraction_of_full/<slice>" too. `--cache_policy=full` evaluates as without the flag
and adds the full cache's memory.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Eval batches (0: the whole split).")
_CACHE_POLICY = flags.DEFINE_string(
    "cache_policy", "full", "KV-cache policy to decode under: full, "
    "sinks_window:sinks=S,window=W or per_head:sinks=S,window=W,heads=L.H+L.H "
    "(docs/kv_cache.md).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from attn_jax import train  # pylint: disable=g-import-not-at-top
  from attn_jax.layers import kv_policy  # pylint: disable=g-import-not-at-top
  try:
    policy = kv_policy.parse(_CACHE_POLICY.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    report = {}
    if flags.FLAGS["cache_policy"].present:
      try:  # builds the caches' shapes: checks the policy against the model
        report = cache_report(_WORKDIR.value, policy, step=_STEP.value)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
    if policy.is_full:
      result = train.evaluate(_WORKDIR.value, step=_STEP.value, num_steps=_NUM_STEPS.value)
    else:
      try:
        result = evaluate_under_policy(_WORKDIR.value, policy, step=_STEP.value,
                                       num_steps=_NUM_STEPS.value)
      except ValueError as e:  # packed or too few eval rows: the message says which
        raise app.UsageError(str(e)) from None
  except FileNotFoundError as e:  # no such workdir or step: the message says which
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.CorruptCheckpoint as e:  # names the step and what is wrong with it
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({**result, **report}), flush=True)


def _eval_tasks(config):
  """`[(name, config)]`: the eval split (name ""), or with MQAR's `eval_slices` one config
  per slice, named "<seq_len>x<pairs>", as `train.evaluate` builds them."""
  from attn_jax.data import mqar  # pylint: disable=g-import-not-at-top
  if config.data.get("name") != "mqar" or not config.data.get("eval_slices", ""):
    return [("", config)]
  tasks = []
  for t, kv, n in mqar.parse_slices(config.data.eval_slices, "config.data.eval_slices"):
    task = config.copy_and_resolve_references()
    with task.unlocked():
      task.data.update(dict(seq_len=t, num_kv_pairs=kv, num_eval_examples=n,
                            num_train_examples=0, train_slices="", eval_slices=""))
    tasks.append((f"{t}x{kv}", task))
  return tasks


def _pipeline(task):
  from attn_jax import data  # pylint: disable=g-import-not-at-top
  return data.make_pipeline(task.data, "eval", task.eval.global_batch_size, seed=task.seed,
                            shuffle=False, prefetch=False)


def evaluate_under_policy(workdir, policy, *, step=None, num_steps=None):
  """`train.evaluate`'s loss and accuracy, with logits from decoding under `policy`.

  Each eval row is one sequence fed through `decode_logits` (a jitted scan of decode
  steps) on one device; loss and accuracy are summed over the same positions and batches
  as `train.evaluate` (`config.eval`), so under a policy that evicts nothing the numbers
  agree with it up to rounding.

  Raises:
    FileNotFoundError: no checkpoint (of `step`) in `workdir`.
    ValueError: the eval data is packed (several documents per row): decoding keeps one
      sequence per row.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attn_jax import train  # pylint: disable=g-import-not-at-top
  from attn_jax.models.generate import decode_logits  # pylint: disable=g-import-not-at-top
  from attn_jax.train.step import token_metrics  # pylint: disable=g-import-not-at-top
  from attn_jax.train.trainer import (  # pylint: disable=g-import-not-at-top
      eval_summary, sum_metrics)
  meta = train.load_meta(workdir, step)
  config = train.load_config(workdir, meta["step"])
  if config.data.get("pack", False):
    raise ValueError("--cache_policy needs unpacked eval rows (one sequence per row), but "
                     "the config packs documents (config.data.pack=True).")
  model = train.load(workdir, step=meta["step"])
  limit = config.eval.num_steps if num_steps is None else num_steps
  metrics = jax.jit(token_metrics)
  per_set = []
  for name, task in _eval_tasks(config):
    pipeline = _pipeline(task)
    try:
      steps = min(pipeline.steps_per_epoch, limit) if limit else pipeline.steps_per_epoch
      if steps == 0:
        raise ValueError(f"the eval split{' ' + name if name else ''} has "
                         f"{pipeline.num_examples} examples, fewer than "
                         f"config.eval.global_batch_size={config.eval.global_batch_size}.")
      batches = (pipeline.batch(i) for i in range(steps))
      per_set.append((name, sum_metrics(
          metrics(decode_logits(model, rows["inputs"], policy), jnp.asarray(rows["targets"]),
                  jnp.asarray(rows["loss_mask"])) for rows in batches)))
    finally:
      pipeline.close()
  return {"step": meta["step"], **eval_summary(per_set)}


def cache_report(workdir, policy, *, step=None):
  """The decode caches' memory for one sequence of each eval length, under `policy` and in
  full (from the model's shapes: no weights are read)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from attn_jax import models, train  # pylint: disable=g-import-not-at-top
  from attn_jax.models.generate import (  # pylint: disable=g-import-not-at-top
      kv_cache_memory)
  meta = train.load_meta(workdir, step)
  config = train.load_config(workdir, meta["step"])
  model = nnx.eval_shape(lambda: models.build(config.model, vocab_size=meta["vocab_size"],
                                              rngs=nnx.Rngs(0)))
  memory, longest = {}, None
  for name, task in _eval_tasks(config):
    pipeline = _pipeline(task)
    seq_len = pipeline.seq_len
    pipeline.close()
    memory[name] = kv_cache_memory(model, batch_size=1, max_len=seq_len,
                                   cache_policy=policy)
    if longest is None or seq_len > longest[0]:
      longest = (seq_len, memory[name])
  report = {"cache_policy": str(policy), "cache/bytes": longest[1]["bytes"],
            "cache/full_bytes": longest[1]["full_bytes"],
            "cache/fraction_of_full": longest[1]["fraction_of_full"]}
  for name, m in memory.items():
    if name:
      report[f"cache/fraction_of_full/{name}"] = m["fraction_of_full"]
  return report


if __name__ == "__main__":
  app.run(main)
