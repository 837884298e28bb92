r"""Evaluates a trained workdir on its eval split: `python -m experiments.evaluate --workdir=DIR`.

Uses the config saved with the checkpoint; `--step` picks a checkpoint (default: the
newest), `--num_steps` the number of eval batches (default: the config's; 0 = all).
Prints one JSON line: {"step": ..., "eval/loss": ..., "eval/accuracy": ...}. A workdir
without checkpoints, or without the checkpoint of `--step`, exits with status 2 and says so.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Eval batches (0: the whole split).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from attn_jax import train  # pylint: disable=g-import-not-at-top
  try:
    result = train.evaluate(_WORKDIR.value, step=_STEP.value, num_steps=_NUM_STEPS.value)
  except FileNotFoundError as e:  # no such workdir or step: the message says which
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
