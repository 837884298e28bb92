"""Metrics out of a run: `metrics.jsonl`, TensorBoard event files, and a progress display.

`metrics.jsonl` in the workdir has one JSON object per line, `{"step": s, "train/loss":
…, "train/accuracy": …}` for training and `{"step": s, "eval/loss": …, "eval/accuracy":
…}` for evaluation. TensorBoard files go to `<workdir>/tensorboard`. Attached to a terminal
the run shows a progress bar (steps/s, tokens/s, loss); otherwise it logs a line at each
logging step. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
from etils import epath

METRICS_FILE = "metrics.jsonl"


ABANDONED_FILE = "metrics_abandoned.jsonl"


def read_metrics(workdir):
  """The records of `<workdir>/metrics.jsonl`, in order (a list of dicts); a last line
  cut short by a killed run is left out."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [record for record in map(_record, path.read_text().splitlines())
          if record is not None]


def drop_after(workdir, step):
  """Moves the records of steps after `step` (a resumed run redoes them; from step 0,
  all) and any line cut short by a killed run out of `metrics.jsonl` into
  `metrics_abandoned.jsonl`, each marked with the step the run resumed from: no step is
  recorded twice and nothing written is lost.

  Returns the number of lines moved.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if jax.process_index() != 0 or not path.exists():
    return 0
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  kept, moved = [], []
  for line in lines:
    record = _record(line)
    if record is not None and record.get("step", 0) <= step:
      kept.append(line)
    else:
      moved.append(json.dumps({"resumed_from": int(step),
                               **(record if record is not None else {"line": line})}))
  if moved:
    with open(epath.Path(workdir) / ABANDONED_FILE, "a", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in moved))
    path.write_text("".join(line + "\n" for line in kept))
  return len(moved)


def _record(line):
  """The JSON object of one line of `metrics.jsonl`; None for a blank or cut-short one."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) else None


class MetricsWriter:
  """Writes metrics of one run (appending to an existing `metrics.jsonl`)."""

  def __init__(self, workdir, *, total_steps, start_step=0, tensorboard=True,
               progress=None):
    self.lead = jax.process_index() == 0
    self.total_steps = int(total_steps)
    self._file = self._tb = self._bar = None
    if not self.lead:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._file = open(workdir / METRICS_FILE, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
    interactive = sys.stderr.isatty() if progress is None else progress
    if interactive:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=self.total_steps, initial=start_step, unit="step",
                       dynamic_ncols=True, file=sys.stderr)
    self._last = (time.perf_counter(), start_step)

  def write(self, step, metrics):
    """Records `metrics` (a dict of floats) at `step`."""
    if not self.lead:
      return
    record = {"step": int(step)}
    record.update({k: _number(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(k, v, int(step))

  def train_progress(self, step, metrics, tokens_per_step):
    """Writes training metrics with the throughput since the last call, and shows them."""
    if not self.lead:
      return
    now = time.perf_counter()
    last_time, last_step = self._last
    self._last = (now, step)
    rate = (step - last_step) / max(now - last_time, 1e-9)
    metrics = {**metrics, "train/steps_per_sec": rate,
               "train/tokens_per_sec": rate * tokens_per_step}
    self.write(step, metrics)
    loss = metrics.get("train/loss", float("nan"))
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(f"loss {loss:.4f}  {rate:.2f} steps/s  "
                                f"{rate * tokens_per_step:,.0f} tokens/s")
    else:
      self.log(f"step {step}/{self.total_steps}  loss {loss:.4f}  "
               f"accuracy {metrics.get('train/accuracy', float('nan')):.4f}  "
               f"{rate:.2f} steps/s  {rate * tokens_per_step:,.0f} tokens/s")

  def log(self, message):
    """A line for the user: above the progress bar, or to the log."""
    if not self.lead:
      return
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)
    else:
      print(message, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()


def _number(v):
  """A float, or "nan"/"inf"/"-inf" as a string (JSON has no such numbers)."""
  v = float(v)
  return v if math.isfinite(v) else str(v)

