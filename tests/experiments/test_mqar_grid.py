"""The MQAR grid binary end to end on its smoke grid (two cells, one step each)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from experiments.configs import mqar_grids
from tests.experiments import _ROOT, run_python


# One CPU device: BaseConv's short-then-long layers hang XLA's CPU runtime on 8 virtual
# devices (JAX 0.11.2; either kind alone runs).
_ONE_DEVICE = ("import os; os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '')"
               ".replace('--xla_force_host_platform_device_count=8', ''); ")


def _grid_code(*args):
  return (_ONE_DEVICE + "import sys; from experiments import mqar_grid, cli; "
          f"sys.argv = ['mqar_grid'] + {list(args)!r}; "
          "cli.run(mqar_grid.main, 'experiments.mqar_grid')")


def test_grid_trains_in_processes_tabulates_and_resumes(tmp_path):
  args = ["--grid=smoke", "--mixers=base_conv", f"--output_dir={tmp_path}"]
  out = run_python("-c", _grid_code(*args, "--processes=2"))
  assert "started (log: " in out and (tmp_path / "logs").is_dir()
  rows = sorted((json.loads(line) for line in
                 (tmp_path / "results.jsonl").read_text().splitlines()),
                key=lambda r: r["seq_len"])
  assert [(r["seq_len"], r["num_kv_pairs"]) for r in rows] == [(32, 2), (48, 4)]
  # Two BaseConv layers (short, then long convolution of seq_len): 2·d + seq_len·d.
  assert [r["state_size"] for r in rows] == [2 * 16 + 32 * 16, 2 * 16 + 48 * 16]
  assert all(0 <= r["accuracy"] <= 1 and r["steps"] == 1 for r in rows)
  summary = (tmp_path / "summary.md").read_text()
  assert "| base_conv | 16 | 544–800 |" in summary and "(48, 4)" in summary
  assert all(r["steps_trained"] == 1 and r["vocab_size"] == 64 for r in rows)
  # A rerun (in this process) finds both runs done and trains nothing.
  out = run_python("-c", _grid_code(*args))
  assert "[1/2]" not in out and len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_sigterm_to_the_supervisor_stops_its_children(tmp_path):
  """SIGTERM (a preemption) reaches every child (each saves its run) before the
  supervisor exits with 128 + 15; no child outlives it."""
  args = ["--grid=smoke", "--mixers=base_conv", f"--output_dir={tmp_path}", "--processes=2"]
  supervisor = subprocess.Popen([sys.executable, "-c", _grid_code(*args)], cwd=_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 300
  while len(list(tmp_path.glob("logs/*.log"))) < 2:  # both children started
    assert supervisor.poll() is None and time.monotonic() < deadline, supervisor.stdout.read()
    time.sleep(0.2)
  supervisor.send_signal(signal.SIGTERM)
  out, _ = supervisor.communicate(timeout=300)
  assert supervisor.returncode == 128 + signal.SIGTERM, out
  processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
  assert f"--output_dir={tmp_path}" not in processes


def test_a_run_stopped_by_sigterm_writes_no_row(tmp_path):
  """A preempted run is saved, not finished: no row, so the next grid run resumes it.
  (In a subprocess, as every test here that imports the binary: its absl flags would
  clash with other binaries' in this process.)"""
  code = f"""
from attn_jax import train
from experiments import mqar_grid
from experiments.configs import mqar_grids
train.train_and_evaluate = lambda config, workdir: {{"preempted": True, "step": 3}}
run = (mqar_grids.parts("smoke")[0], "softmax", 32, 2, 16, 3e-3)
assert mqar_grid.train_run("r", run, {str(tmp_path)!r}, {str(tmp_path / 'r.jsonl')!r}) is None
print("no row")
"""
  assert "no row" in run_python("-c", code)
  assert not (tmp_path / "r.jsonl").exists()


def test_union_grid_is_narrowed_per_part():
  code = """
from absl import app
from experiments import mqar_grid
from experiments.configs import mqar_grids
grid = mqar_grids.parts("zoology_figure2_cpu")
runs = mqar_grid.grid_runs(grid)
# Attention at 2 widths x 2 cells, 9 more mixers at (128, 8), Zoology's 5 at width 64 x
# 3 cells (2 of them attention's already): every mixer of the zoo has a row.
assert len(runs) == 4 + 9 + 13, len(runs)
assert {run[1] for run in runs.values()} == set(mqar_grids.ZOO)
only_gla = mqar_grid._narrow(grid, grid, "mixers", ["gla"], str)
assert [p.cells for p in only_gla] == [((128, 8),)]
at_256 = mqar_grid._narrow(grid, grid, "cells", ["256x16"], mqar_grid._cell)
assert mqar_grid._narrow(grid, at_256, "mixers", ["gla"], str) == ()
try:
  mqar_grid._narrow(grid, grid, "mixers", ["nosuch"], str)
except app.UsageError as e:
  assert "not in the grid" in str(e)
  print("narrowed")
"""
  assert "narrowed" in run_python("-c", code)


def test_run_config_is_zoologys_setup():
  grid = mqar_grids.GRIDS["zoology_figure2"]
  config = mqar_grids.run_config(grid, "softmax", 256, 16, 128, 1e-3, data_dir="/d")
  assert config.train.global_batch_size == 256
  assert config.train.num_steps == 64 * 100_000 // 256
  # Zoology's early stop: evaluated every epoch, stopped past 0.99.
  assert (config.train.eval_every, config.train.stop_accuracy) == (100_000 // 256, 0.99)
  assert (config.data.vocab_size, config.data.random_non_queries) == (8192, False)
  model = config.model
  assert (model.num_layers, model.num_heads, model.mlp_dim, model.norm) == (2, 1, 0, "layer")
  assert (model.positions, model.max_len) == ("learned", 256)
  assert model.mixer_options.softmax.rope is False
  # Zoology's optimizer: decay on every parameter, no clipping, no warm-up, cosine to 0.
  opt = config.optimizer
  assert (opt.weight_decay, opt.weight_decay_on, opt.b2, opt.grad_clip_norm) == (
      0.1, "all", 0.999, 0.0)
  assert (opt.warmup_steps, opt.end_learning_rate_fraction) == (0, 0.0)
  cpu = mqar_grids.parts("zoology_figure2_cpu")[0]  # as its committed results trained
  cpu_opt = mqar_grids.run_config(cpu, "softmax", 64, 4, 64, 3e-3, data_dir="/d").optimizer
  assert (cpu_opt.weight_decay_on, cpu_opt.grad_clip_norm, cpu_opt.warmup_steps) == (
      "matrices", 1.0, 1250 // 10)
  hyena = mqar_grids.run_config(grid, "hyena", 256, 16, 128, 1e-3, data_dir="/d")
  assert hyena.model.positions == "none" and hyena.model.mixer_options.all.max_len == 256
  # Zoology's "based": a short-convolution BaseConv layer, then Based (feature_dim 8).
  based = mqar_grids.run_config(grid, "zoology_based", 64, 4, 64, 1e-3, data_dir="/d")
  assert tuple(based.model.mixers) == ("base_conv", "based")
  assert based.model.mixer_options.base_conv.kernel_size[0] == 3
  assert based.model.mixer_options.based.to_dict() == {"feature_dim": 8, "window_size": None}


def test_based_figure2_runs_mix_with_a_baseconv_layer():
  grid = mqar_grids.GRIDS["based_figure2"]
  entry = "zoology_swa:swa.window_size=64"
  assert entry in grid.mixers
  config = mqar_grids.run_config(grid, entry, 256, 0, 128, 1e-3, data_dir="/d")
  assert tuple(config.model.mixers) == ("base_conv", "swa")
  assert config.model.mixer_options.swa.window_size == 64
  assert config.model.positions == "none" and config.model.mixer_options.all.max_len == 1024
  assert config.data.train_slices.startswith("64x4:100000,") and config.data.random_non_queries
  assert config.train.global_batch_size == 256 and config.eval.global_batch_size == 32
  with pytest.raises(ValueError, match="mixer.option=value"):
    mqar_grids.parse_mixer("swa:window_size=4")


def test_bad_cell_is_a_usage_error(tmp_path):
  code = ("import sys; from experiments import mqar_grid, cli; "
          f"sys.argv = ['mqar_grid', '--grid=smoke', '--cells=64x9', "
          f"'--output_dir={tmp_path}']; cli.run(mqar_grid.main, 'experiments.mqar_grid')")
  with pytest.raises(AssertionError, match="not in the grid"):
    run_python("-c", code)
