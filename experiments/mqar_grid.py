r"""Trains an MQAR grid (Zoology's Figure 2, Based's Figure 2) and tabulates and plots it.

    python -m experiments.mqar_grid --grid=zoology_figure2_cpu --output_dir=/tmp/zoo
    python -m experiments.mqar_grid --grid=zoology_figure2 --processes=8 --output_dir=/tmp/z
    python -m experiments.mqar_grid --grid=based_figure2 --output_dir=/tmp/based
    python -m experiments.mqar_grid --grid=zoology_figure2 --cells=256x16 --d_models=64 \
        --mixers=softmax,base_conv,hyena --output_dir=/tmp/zoo
    python -m experiments.mqar_grid --grid=zoology_figure2 --output_dir=/tmp/zoo --plot_only

Grids are named in `experiments/configs/mqar_grids.py` (with Zoology's settings and where
we differ); `--cells`, `--d_models`, `--mixers`, `--learning_rates` and `--max_steps`
narrow one. Each run trains in `<output_dir>/runs/<run id>` (an interrupted run resumes)
and appends a row to `<output_dir>/results.jsonl`; runs already there are skipped, so
rerunning the command continues the grid. A run stops early once its eval accuracy passes
the grid's `stop_accuracy` (Zoology's 0.99, checked every epoch). `--processes=N` trains N
runs at once, each in its own process (logs in `<output_dir>/logs/`; on a GPU they share
it, without preallocating its memory). Then it writes `summary.md` (per mixer, cell
and width: the best eval accuracy over learning rates, as Zoology reports it, and the
decode state size) and, with matplotlib, `accuracy.png` (Zoology's Figure 2 layout:
accuracy against model width, a panel per cell) and `state.png` (accuracy against decode
state size, Based's Figure 2 axes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from absl import app, flags, logging

from experiments import cli

_GRID = flags.DEFINE_string("grid", "zoology_figure2_cpu", "A grid of mqar_grids.GRIDS.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where runs, results and plots go.")
_CELLS = flags.DEFINE_list("cells", None, "Subset of cells, as SEQ_LENxPAIRS (64x4).")
_D_MODELS = flags.DEFINE_list("d_models", None, "Subset of model widths.")
_MIXERS = flags.DEFINE_list("mixers", None, "Subset of mixers (mqar.py variants).")
_LEARNING_RATES = flags.DEFINE_list("learning_rates", None, "Learning rates instead.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Cap on each run's steps.")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "Only tabulate and plot results.jsonl.")
_PROCESSES = flags.DEFINE_integer(
    "processes", 1, "Runs trained at once, each in its own process (1: in this process).")
_ONLY_RUN = flags.DEFINE_string("only_run", None,
                                "Train only this run id of the grid (what --processes "
                                "gives each child); no summary or plots.")


def _narrow(grid, parts, field, flag, parse):
  """`parts` with `field` narrowed to the flag's values (a part left with none dropped);
  a value that no part of the whole `grid` has is a usage error."""
  if flag is None:
    return parts
  chosen = [parse(v) for v in flag]
  known = [v for part in grid for v in getattr(part, field)]
  unknown = [v for v in chosen if v not in known]
  if unknown:
    raise app.UsageError(f"--{field} {unknown} not in the grid: {sorted(set(known))}.")
  narrowed = (dataclasses.replace(p, **{field: tuple(v for v in getattr(p, field)
                                                     if v in chosen)}) for p in parts)
  return tuple(p for p in narrowed if getattr(p, field))


def _cell(text):
  try:
    seq_len, pairs = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--cells takes SEQ_LENxPAIRS, e.g. 64x4; got {text!r}.") from None
  return seq_len, pairs


def run_id(mixer, seq_len, pairs, d_model, lr):
  task = f"t{seq_len}-" + (f"kv{pairs}" if pairs else "mix")
  return f"{mixer.replace(':', '_').replace(',', '+')}-{task}-d{d_model}-lr{lr:.1e}"


def read_results(path):
  """The rows of results.jsonl (an unreadable last line, from a kill mid-write, skipped)."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          logging.warning("skipping an unreadable line of %s", path)
  return rows


def state_size(config, seq_len):
  """Decode state size (numbers) of the run's model, built abstractly."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from attn_jax import models  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: models.build(config.model, vocab_size=config.data.vocab_size,
                                              rngs=nnx.Rngs(0)))
  return model.decode_state_size(seq_len)


def grid_runs(parts):
  """`{run id: (grid, mixer, seq_len, pairs, d_model, lr)}` over the union of `parts`."""
  runs = {}
  for grid in parts:
    for (t, kv) in grid.cells:
      for d in grid.d_models:
        for m in grid.mixers:
          for lr in grid.learning_rates:
            runs.setdefault(run_id(m, t, kv, d, lr), (grid, m, t, kv, d, lr))
  return runs


def train_run(rid, run, output_dir, results_path, max_steps=None):
  """Trains one run and appends its row to results.jsonl (one write: several processes
  may append to the same file); a run stopped by SIGTERM writes no row (None)."""
  from attn_jax import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import mqar_grids  # pylint: disable=g-import-not-at-top
  grid, mixer, seq_len, pairs, d_model, lr = run
  config = mqar_grids.run_config(grid, mixer, seq_len, pairs, d_model, lr,
                                 data_dir=os.path.join(output_dir, "data"),
                                 max_steps=max_steps)
  row = {"run_id": rid, "mixer": mixer, "seq_len": seq_len, "num_kv_pairs": pairs,
         "d_model": d_model, "learning_rate": lr, "steps": config.train.num_steps,
         "vocab_size": grid.vocab_size,
         "state_size": state_size(config, max(seq_len, grid.max_len))}
  try:
    result = train.train_and_evaluate(config, os.path.join(output_dir, "runs", rid))
    if result["preempted"]:  # SIGTERM: saved; not a result, rerun the grid to finish it
      print(f"{rid}: stopped by SIGTERM at step {result['step']} (checkpoint saved); "
            "rerun the command to finish it.", flush=True)
      return None
    row.update(accuracy=float(result["eval/accuracy"]), loss=float(result["eval/loss"]),
               steps_trained=int(result["step"]),
               **{k: float(v) for k, v in result.items() if k.startswith("eval/accuracy/")})
  except train.NonFiniteLossError as e:  # a diverged learning rate is a result too
    row.update(accuracy=0.0, loss=float("nan"), error=str(e).splitlines()[0])
  with open(results_path, "a") as f:
    f.write(json.dumps(row) + "\n")
  return row


def train_grid(runs, output_dir, results_path):
  """Trains, one after another in this process, every run not yet in results.jsonl."""
  done = {row["run_id"] for row in read_results(results_path)}
  for i, (rid, run) in enumerate(runs.items()):
    if rid not in done:
      print(f"[{i + 1}/{len(runs)}] {rid}", flush=True)
      train_run(rid, run, output_dir, results_path, _MAX_STEPS.value)


class _Children:
  """The child processes of `train_grid_in_processes`: one per run, each this binary with
  `--only_run`, logging to `<output_dir>/logs/<run id>.log` (appended: a resumed run's log
  goes on). Children do not preallocate GPU memory, so several share one GPU."""

  def __init__(self, argv, output_dir):
    self.argv, self.output_dir = argv, output_dir
    self.env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    self.running = {}  # run id → (Popen, log path)

  def start(self, rid):
    """Starts run `rid`'s child; returns its log's path."""
    log_path = os.path.join(self.output_dir, "logs", f"{rid}.log")
    with open(log_path, "a") as log:
      self.running[rid] = (subprocess.Popen(
          [sys.executable, "-m", "experiments.mqar_grid", *self.argv, f"--only_run={rid}"],
          stdout=log, stderr=subprocess.STDOUT, env=self.env), log_path)
    return log_path

  def ended(self):
    """(run id, exit status, log path) of each child that ended since the last call."""
    ended = []
    for rid, (child, log_path) in list(self.running.items()):
      if child.poll() is not None:
        del self.running[rid]
        ended.append((rid, child.returncode, log_path))
    return ended

  def terminate(self):
    """SIGTERM to every running child (each saves its run), then waits for them all."""
    for child, _ in self.running.values():
      child.terminate()
    for child, _ in self.running.values():
      child.wait()


def train_grid_in_processes(runs, output_dir, results_path, processes):
  """Trains the runs not yet in results.jsonl, `processes` at a time, each in a child
  process (`_Children`). SIGTERM is passed on to the children, which save their runs (a
  rerun resumes them)."""
  done = {row["run_id"] for row in read_results(results_path)}
  queue = [(i, rid) for i, rid in enumerate(runs) if rid not in done]
  os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
  argv = [f"--grid={_GRID.value}", f"--output_dir={output_dir}", "--processes=1"]
  for flag in (_CELLS, _D_MODELS, _MIXERS, _LEARNING_RATES):
    if flag.value is not None:
      argv.append(f"--{flag.name}={','.join(flag.value)}")
  if _MAX_STEPS.value is not None:
    argv.append(f"--max_steps={_MAX_STEPS.value}")
  children, failed = _Children(argv, output_dir), []

  def stop(signum, frame):  # SIGTERM: the children save their runs, then this exits
    del frame
    children.terminate()
    sys.exit(128 + signum)

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while queue or children.running:
      while queue and len(children.running) < processes:
        i, rid = queue.pop(0)
        log_path = children.start(rid)
        print(f"[{i + 1}/{len(runs)}] {rid}: started (log: {log_path})", flush=True)
      time.sleep(0.5)
      for rid, status, log_path in children.ended():
        if status:
          failed.append(rid)
          print(f"{rid}: failed with status {status}; see {log_path}", flush=True)
          continue
        row = next((r for r in read_results(results_path) if r["run_id"] == rid), None)
        print(f"{rid}: done, eval accuracy {row['accuracy']:.4f}" if row else
              f"{rid}: ended without a result (stopped); rerun the command to finish it",
              flush=True)
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failed:
    raise app.UsageError(f"{len(failed)} run(s) failed: {failed}; rerun the command to "
                         "retry them (finished runs are kept).")


def best_rows(rows):
  """One row per (mixer, cell, d_model): the best accuracy over learning rates."""
  best = {}
  for row in rows:
    key = (row["mixer"], row["seq_len"], row["num_kv_pairs"], row["d_model"])
    if key not in best or row["accuracy"] > best[key]["accuracy"]:
      best[key] = row
  return [best[k] for k in sorted(best)]


def write_summary(rows, path):
  cells = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
  label = lambda t, kv: f"({t}, {kv})" if kv else f"mix (up to {t})"
  lines = ["| mixer | d_model | state size (numbers) | "
           + " | ".join(label(t, kv) for t, kv in cells) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in cells) + " |"]
  table = {}
  for r in rows:
    table.setdefault((r["mixer"], r["d_model"]), {})[(r["seq_len"], r["num_kv_pairs"])] = r
  for (mixer, d_model), by_cell in sorted(table.items()):
    sizes = sorted({r["state_size"] for r in by_cell.values()})
    accs = [f"{by_cell[c]['accuracy']:.3f}" if c in by_cell else "" for c in cells]
    lines.append(f"| {mixer} | {d_model} | {'–'.join(map(str, sizes))} | "
                 + " | ".join(accs) + " |")
  with open(path, "w") as f:
    f.write("Best eval accuracy over learning rates; columns are (seq_len, "
            "num_kv_pairs); state size at each cell's seq_len.\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))


def write_plots(rows, output_dir):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[plot]'); no plots written")
    return
  cells = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
  mixers = sorted({r["mixer"] for r in rows})
  fig, axes = plt.subplots(1, len(cells), figsize=(4 * len(cells), 3.5), squeeze=False)
  for ax, (t, kv) in zip(axes[0], cells):
    for mixer in mixers:
      pts = sorted((r["d_model"], r["accuracy"]) for r in rows
                   if r["mixer"] == mixer and (r["seq_len"], r["num_kv_pairs"]) == (t, kv))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=mixer)
    ax.set(xscale="log", xlabel="model dimension", ylabel="accuracy", ylim=(-0.02, 1.02),
           title=f"seq_len {t}, {kv} pairs" if kv else "mix")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "accuracy.png"), dpi=120)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for mixer in mixers:
    pts = sorted((r["state_size"], r["accuracy"]) for r in rows if r["mixer"] == mixer)
    ax.scatter(*zip(*pts), label=mixer, s=14)
  ax.set(xscale="log", xlabel="decode state size (numbers)", ylabel="accuracy",
         ylim=(-0.02, 1.02))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "state.png"), dpi=120)
  print(f"plots: {output_dir}/accuracy.png, state.png")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required (runs, results.jsonl and plots go there).")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from experiments.configs import mqar_grids  # pylint: disable=g-import-not-at-top
  if _GRID.value not in mqar_grids.GRIDS:
    raise app.UsageError(f"--grid={_GRID.value!r} is not one of {sorted(mqar_grids.GRIDS)}.")
  parts = grid = mqar_grids.parts(_GRID.value)
  for field, flag, parse in (("cells", _CELLS.value, _cell), ("d_models", _D_MODELS.value, int),
                             ("mixers", _MIXERS.value, str)):
    parts = _narrow(grid, parts, field, flag, parse)
  if _LEARNING_RATES.value is not None:
    lrs = tuple(float(v) for v in _LEARNING_RATES.value)
    parts = tuple(dataclasses.replace(p, learning_rates=lrs) for p in parts)
  output_dir = os.path.abspath(os.path.expanduser(_OUTPUT_DIR.value))
  os.makedirs(output_dir, exist_ok=True)
  results_path = os.path.join(output_dir, "results.jsonl")
  runs = grid_runs(parts)
  if _ONLY_RUN.value is not None:
    if _ONLY_RUN.value not in runs:
      raise app.UsageError(f"--only_run={_ONLY_RUN.value!r} is not a run of the grid.")
    train_run(_ONLY_RUN.value, runs[_ONLY_RUN.value], output_dir, results_path,
              _MAX_STEPS.value)
    return
  if not _PLOT_ONLY.value:
    if not runs:
      raise app.UsageError("--cells, --d_models and --mixers together select no run.")
    if _PROCESSES.value < 1:
      raise app.UsageError(f"--processes must be >= 1; got {_PROCESSES.value}.")
    if _PROCESSES.value == 1:
      train_grid(runs, output_dir, results_path)
    else:
      train_grid_in_processes(runs, output_dir, results_path, _PROCESSES.value)
  rows = read_results(results_path)
  if not rows:
    print(f"no results in {results_path}", file=sys.stderr)
    sys.exit(1)
  best = best_rows(rows)
  write_summary(best, os.path.join(output_dir, "summary.md"))
  write_plots(best, output_dir)


if __name__ == "__main__":
  cli.run(main, __name__)
