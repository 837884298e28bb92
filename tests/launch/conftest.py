"""One tiny training run per test session, shared by the launch tests.

`trained_run` runs the real binary (`python -m experiments.train`) for a few steps of a
tiny Lightning + softmax hybrid on MQAR, so the notebook can draw both an attention map
and a decay profile. Under pytest-xdist the workers share one run: the first to get the
lock trains, the others wait and reuse it (the pattern of pytest-xdist's docs).
"""

import dataclasses
import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# A run of a few seconds of compute: 2 layers (lightning, softmax) of width 32, 32 tokens.
TINY_RUN_FLAGS = (
    f"--config={REPO}/experiments/configs/mqar.py:hybrid",
    "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
    "--config.data.vocab_size=64", "--config.data.seq_len=32",
    "--config.data.num_train_examples=64", "--config.data.num_eval_examples=16",
    "--config.optimizer.warmup_steps=2",
    "--config.train.num_steps=4", "--config.train.global_batch_size=8",
    "--config.train.log_every=1", "--config.train.eval_every=4",
    "--config.eval.global_batch_size=8", "--config.eval.num_steps=1",
    "--config.checkpoint.every=2", "--config.tensorboard=False",
)
NUM_STEPS = 4


def subprocess_env(**extra):
  """This environment for a child JAX process: CPU, one device, no LLVM optimisation."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_backend_optimization_level=0", **extra)
  return env


def read_metrics(workdir):
  """The records of `workdir/metrics.jsonl`."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  workdir: pathlib.Path
  num_params: int          # as the training binary logged it
  metrics: list


def _train(workdir):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *TINY_RUN_FLAGS],
      env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"training failed:\n{result.stderr[-4000:]}"
  (workdir / "train_stdout.txt").write_text(result.stdout)


def _load(workdir):
  found = re.search(r"model: ([\d,]+) parameters", (workdir / "train_stdout.txt").read_text())
  assert found, "the training binary no longer logs 'model: N parameters'"
  return TrainedRun(workdir, int(found.group(1).replace(",", "")), read_metrics(workdir))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A workdir with checkpoints of steps 2 and 4 of the tiny run."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    workdir = tmp_path_factory.mktemp("trained_run")
    _train(workdir)
    return _load(workdir)
  shared = tmp_path_factory.getbasetemp().parent  # one directory for all xdist workers
  workdir = shared / "launch_trained_run"
  with open(shared / "launch_trained_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "train_stdout.txt").exists():
      workdir.mkdir(exist_ok=True)
      _train(workdir)
  return _load(workdir)
