r"""Trains a model: `python -m experiments.train [--config=FILE[:variant]] [--workdir=DIR]`.

    python -m experiments.train                         # MQAR, softmax, ./workdirs/mqar
    python -m experiments.train --config=experiments/configs/mqar.py:gla \
        --config.train.num_steps=3000 --workdir=/tmp/gla
    python -m experiments.train --config=experiments/configs/lm_text.py \
        --config.data.path=~/books --config.mesh.fsdp=8

Any config field can be overridden with `--config.a.b=value`. Rerunning a command
resumes its workdir from the newest good checkpoint; a workdir holding a checkpoint of a
different config is refused (the message lists the fields). SIGTERM saves a checkpoint
and exits cleanly. Several processes (multi-host) join with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or with
`--distributed` where `jax.distributed.initialize()` finds the cluster itself (SLURM,
TPU pods, ...).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "mqar.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "The experiment config file, optionally with ':variant'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and logs go (default: "
    "./workdirs/<config name>[_<variant>]).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, to join several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def default_workdir(config_arg: str | None) -> str:
  """`./workdirs/<config file stem>[_<variant>]`."""
  path, _, variant = (config_arg or DEFAULT_CONFIG).partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(".", "workdirs", name + (f"_{variant}" if variant else ""))


def initialize_distributed():
  """Joins the processes of a multi-process job (before anything touches a device)."""
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every file at INFO
  initialize_distributed()
  from attn_jax import train  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  try:
    result = train.train_and_evaluate(_CONFIG.value, workdir)
  except train.ConfigMismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if "eval/accuracy" in result:  # printed by every process (the trainer logs on one)
    print(f"final eval accuracy {result['eval/accuracy']:.4f} (loss "
          f"{result['eval/loss']:.4f}) at step {result['eval_step']}; workdir {workdir}",
          flush=True)


def run():
  """The `attn-jax-train` console script."""
  cli.run(main, __name__)


if __name__ == "__main__":
  run()
