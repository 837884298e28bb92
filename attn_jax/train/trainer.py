"""`train_and_evaluate(config, workdir)`: the training loop behind `experiments/train.py`.

One run: build the mesh and the input pipelines, initialise the state sharded (or resume
the newest good checkpoint of the workdir), then repeat the jit'd train step, with
periodic evaluation, asynchronous checkpoints and metrics. The loop reads a step's
metrics while the next step runs, so the host never stalls the devices except to
evaluate, checkpoint, or stop.

Stops:
  - after `config.train.num_steps` steps (a final checkpoint and evaluation);
  - when an evaluation's accuracy exceeds `config.train.stop_accuracy` (> 0), as
    Zoology stops its MQAR runs; it saves, and a rerun of a stopped run only evaluates;
  - on SIGTERM (preemption): it finishes the current step, saves, and returns; the same
    command resumes, and because batches are a function of the step and the step is
    deterministic, every later step's metrics equal those of an uninterrupted run;
  - on a NaN/Inf loss or gradient norm: it raises `NonFiniteLossError` naming the step,
    without saving, so the newest checkpoint is the last good state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from attn_jax import models, sharding
from attn_jax.ops import dispatch
from attn_jax.train import config_check, metrics as metrics_lib
from attn_jax.train.checkpoint import (Checkpoints, CorruptCheckpoint, absolute,
                                       describe_error)
from attn_jax.train.state import count_params, init_state, make_setup
from attn_jax.train.step import make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN or Inf."""


@dataclasses.dataclass
class _Inputs:
  """A pipeline and what turns its rows into global arrays."""
  pipeline: object
  shape: tuple
  shardings: dict
  row_start: int
  keys: tuple

  def batch(self, step):
    rows = self.pipeline.batch(step)
    return {k: sharding.make_global_array(rows[k], self.shardings[k], self.shape,
                                          self.row_start) for k in self.keys}


def resolve_config(config, workdir):
  """A copy of `config` with defaults that depend on the workdir filled in."""
  config = config.copy_and_resolve_references()
  config_check.check_config(config)
  if not config.data.get("data_dir"):
    with config.unlocked():
      config.data.data_dir = str(epath.Path(workdir) / "data")
  return config


def _inputs(config, split, global_batch, mesh, rules, *, shuffle, seq_len=None):
  """An `_Inputs` for `split`, reading only the rows this process's devices hold."""
  from attn_jax import data  # pylint: disable=g-import-not-at-top  (tfds: only to read data)
  keys = ("inputs", "targets", "loss_mask") + (
      ("segment_ids",) if config.data.get("pack", False) else ())
  if seq_len is None:  # the pipeline knows T only once opened: open it for one process
    probe = data.make_pipeline(config.data, split, global_batch, seed=config.seed,
                               shuffle=shuffle, prefetch=False)
    seq_len = probe.seq_len
    probe.close()
  shape = (global_batch, seq_len)
  with sharding.use_rules(rules):
    shard = sharding.batch_sharding(mesh, shape)
  start, stop = sharding.local_batch_rows(shard, shape)
  rows = stop - start
  pipeline = data.make_pipeline(config.data, split, global_batch, seed=config.seed,
                                process_index=start // rows,
                                process_count=global_batch // rows, shuffle=shuffle)
  return _Inputs(pipeline, shape, {k: shard for k in keys}, start, keys)


def _check_batch(config, mesh):
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, size in (("train.global_batch_size", config.train.global_batch_size),
                     ("eval.global_batch_size", config.eval.global_batch_size)):
    if size % split:
      raise ValueError(f"config.{name}={size} must be a multiple of the data-parallel "
                       f"devices, mesh data × fsdp = {split}.")


class _Preemption:
  """SIGTERM sets a flag the loop reads once per step (agreed over all processes)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def check(self):
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming it), evaluating and checkpointing.

  Returns:
    A dict with the last train and eval metrics, `"step"` (the final step; smaller
    than `config.train.num_steps` when stopped by SIGTERM), `"eval_step"` (the step the
    eval metrics belong to: earlier than `"step"` when SIGTERM stopped the run between
    evaluations), `"preempted"` and `"stopped_early"` (by `config.train.stop_accuracy`).

  Raises:
    ConfigMismatchError: the workdir holds a checkpoint of a different config.
    NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
  """
  started = time.perf_counter()
  workdir = absolute(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = resolve_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.get("sharding_rules", ()))
  _check_batch(config, mesh)

  checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep,
                            async_save=config.checkpoint.get("async_save", True))
  saved_meta = checkpoints.newest_meta()
  if saved_meta is not None:
    config_check.check_resumable(saved_meta["config"], config, workdir, saved_meta["step"])

  train = _inputs(config, "train", config.train.global_batch_size, mesh, rules,
                  shuffle=True)
  evals = _eval_inputs(config, mesh, rules, seq_len=train.shape[1])
  vocab_size = train.pipeline.vocab_size
  setup = make_setup(config, vocab_size=vocab_size, mesh=mesh, rules=rules)

  writer = None
  preemption = _Preemption()
  try:
    found = checkpoints.steps()
    restored = checkpoints.restore_latest(setup.abstract_state()) if found else None
    num_steps = config.train.num_steps
    stopped_at = None  # the eval accuracy of a run that stopped early (train.stop_accuracy)
    if restored is not None:
      step, state, data_state, saved = restored
      stopped_at = saved.get("stopped_early_at_accuracy")
      train.pipeline.restore(data_state)
      start = f"resuming from the checkpoint of step {step}"
    else:
      step, state = 0, init_state(setup)
      start = "starting at step 0: " + (
          f"none of the checkpoints {found} restores (moved to corrupt_checkpoints/)"
          if found else "no checkpoint in the workdir yet")
    dropped = metrics_lib.drop_after(workdir, step)
    meta = {"config": config_check.to_json(config), "vocab_size": int(vocab_size)}
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    writer = metrics_lib.MetricsWriter(workdir, total_steps=num_steps, start_step=step,
                                       tensorboard=config.get("tensorboard", True))
    writer.log(f"workdir: {workdir}")
    mixers = models.expand_mixers(config.model.mixers, config.model.num_layers)
    writer.log(f"model: {count_params(setup.abstract_model):,} parameters, mixers "
               f"{mixers}; mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
               f"{jax.process_count()} process(es)")
    chosen = {op: name for op, name in setup.kernels.items() if name}
    if chosen:
      writer.log(f"kernels: {chosen} (config.kernels; other ops automatic)")
    writer.log(start + (f" ({dropped} metric records of later steps moved to "
                        f"{metrics_lib.ABANDONED_FILE})" if dropped else ""))
    train_step = make_train_step(setup, {k: train.shape for k in train.keys})
    eval_steps = [make_eval_step(setup, {k: e.shape for k in e.keys}) for _, e in evals]
    tokens_per_step = int(np.prod(train.shape))
    log_every, eval_every = config.train.log_every, config.train.eval_every
    save_every = config.checkpoint.every
    result = {"step": step, "preempted": False, "stopped_early": False}

    def evaluate_now(at_step, record=True):
      out = _evaluate(eval_steps, state["params"], evals, config.eval.num_steps)
      if record:
        writer.write(at_step, out)
      slices = "".join(f"  {name} {out[f'eval/accuracy/{name}']:.4f}" for name, _ in evals
                       if name)
      writer.log(f"eval at step {at_step} ({time.perf_counter() - started:.0f} s): loss "
                 f"{out['eval/loss']:.4f}  accuracy {out['eval/accuracy']:.4f}"
                 + (f"  (per slice:{slices})" if slices else ""))
      result.update(out, eval_step=at_step)

    def save(at_step):
      checkpoints.save(at_step, state, train.pipeline.state(), meta)

    stop_accuracy = config.train.get("stop_accuracy", 0.0)
    if step >= num_steps or (stopped_at is not None and stop_accuracy
                             and stopped_at > stop_accuracy):
      writer.log(f"already trained to step {step} (config.train.num_steps={num_steps}); "
                 "evaluating only." if step >= num_steps else
                 f"stopped early at step {step} (eval accuracy {stopped_at:.4f} > "
                 f"config.train.stop_accuracy={stop_accuracy}); evaluating only.")
      evaluate_now(step, record=False)
      result["stopped_early"] = step < num_steps
      return result

    pending = None
    while step < num_steps:
      state, step_metrics = train_step(state, train.batch(step))
      step += 1
      if pending is not None:
        _report(writer, *pending, log_every, num_steps, tokens_per_step, result)
      pending = (step, step_metrics)
      stop = preemption.check()
      last = step == num_steps
      if stop or last or step % save_every == 0 or step % eval_every == 0:
        _report(writer, *pending, log_every, num_steps, tokens_per_step, result)
        pending = None
      early = False
      if last or step % eval_every == 0:
        evaluate_now(step)
        early = not last and stop_accuracy and result["eval/accuracy"] > stop_accuracy
        if early:  # saved with the checkpoint: a rerun evaluates only
          meta["stopped_early_at_accuracy"] = result["eval/accuracy"]
      if stop or early or last or step % save_every == 0:
        save(step)
      if stop or early:
        checkpoints.wait()
        writer.log(f"eval accuracy {result['eval/accuracy']:.4f} > config.train."
                   f"stop_accuracy={stop_accuracy} at step {step}: stopped early." if early
                   else f"SIGTERM: saved the checkpoint of step {step} in {workdir} and "
                   "stopped; run the same command to resume.")
        result["stopped_early" if early else "preempted"] = True
        break
    result["step"] = step
    checkpoints.wait()
    return result
  finally:
    preemption.restore()
    checkpoints.close()
    if writer is not None:
      writer.close()
    train.pipeline.close()
    for _, inputs in evals:
      inputs.pipeline.close()


def _report(writer, step, step_metrics, log_every, num_steps, tokens_per_step, result):
  """Checks one step's metrics for NaN/Inf and writes them at logging steps."""
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
    raise NonFiniteLossError(
        f"the loss is {values['loss']} (gradient norm {values['grad_norm']}) at step "
        f"{step}; stopping without saving, so the newest checkpoint is the last good "
        "state. Lower the learning rate, or check the data of that step.")
  named = {f"train/{k}": v for k, v in values.items()}
  result.update(named)
  if step % log_every == 0 or step == 1 or step == num_steps:
    writer.train_progress(step, named, tokens_per_step)


def _eval_inputs(config, mesh, rules, seq_len=None):
  """`[(name, _Inputs)]`: the eval split (name ""), or with MQAR's `eval_slices` one task
  per slice, named "<seq_len>x<pairs>" (only its test split is built)."""
  from attn_jax.data import mqar  # pylint: disable=g-import-not-at-top  (tfds: as above)
  batch = config.eval.global_batch_size
  slices = ()
  if config.data.get("name") == "mqar":
    slices = mqar.parse_slices(config.data.get("eval_slices", ""), "config.data.eval_slices")
  named = [("", config, seq_len)] if not slices else []
  for t, kv, n in slices:
    task = config.copy_and_resolve_references()
    with task.unlocked():
      task.data.update(dict(seq_len=t, num_kv_pairs=kv, num_eval_examples=n,
                            num_train_examples=0, train_slices="", eval_slices=""))
    named.append((f"{t}x{kv}", task, None))
  out = []
  for name, task, length in named:
    inputs = _inputs(task, "eval", batch, mesh, rules, shuffle=False, seq_len=length)
    if inputs.pipeline.steps_per_epoch == 0:
      where = f"eval slice {name}" if name else "the eval split"
      raise ValueError(f"{where} has {inputs.pipeline.num_examples} examples, fewer than "
                       f"config.eval.global_batch_size={batch}; lower it.")
    out.append((name, inputs))
  return out


def _evaluate(eval_steps, params, evals, num_steps):
  """Loss and accuracy over every eval set, and per set when there are slices."""
  per_set = []
  for eval_step, (name, inputs) in zip(eval_steps, evals):
    steps = inputs.pipeline.steps_per_epoch
    if num_steps:
      steps = min(steps, num_steps)
    per_set.append((name, sum_metrics(eval_step(params, inputs.batch(i))
                                      for i in range(steps))))
  return eval_summary(per_set)


def sum_metrics(sums):
  """`{"loss_sum", "correct", "count"}` of several batches (an iterable), as floats."""
  totals = None
  for batch in sums:
    totals = batch if totals is None else jax.tree.map(lambda a, b: a + b, totals, batch)
  return {k: float(v) for k, v in jax.device_get(totals).items()}


def eval_summary(per_set):
  """`{"eval/loss", "eval/accuracy"}` over `[(name, sums)]`, and per named set (MQAR's
  slices) `"eval/loss/<name>"`, `"eval/accuracy/<name>"`."""
  out, grand = {}, None
  for name, totals in per_set:
    if name:
      count = max(totals["count"], 1.0)
      out[f"eval/loss/{name}"] = totals["loss_sum"] / count
      out[f"eval/accuracy/{name}"] = totals["correct"] / count
    grand = totals if grand is None else {k: grand[k] + totals[k] for k in grand}
  count = max(grand["count"], 1.0)
  return {"eval/loss": grand["loss_sum"] / count, "eval/accuracy": grand["correct"] / count,
          **out}


def evaluate(workdir, *, step=None, mesh=None, num_steps=None, kernels=None):
  """Evaluates a workdir's checkpoint on the eval split with its saved config.

  Args:
    workdir: the run's workdir.
    step: the checkpoint (default: the newest).
    mesh: a `config.mesh`-style dict of axis sizes (default: the saved one if it fits
      this machine's devices, else pure data parallelism).
    num_steps: eval batches (default: the saved `config.eval.num_steps`; 0 = all).
    kernels: `{op: implementation}` (see `attn_jax.ops.dispatch.kernels`); default: the
      automatic choice, not the kernels the run trained with.

  Returns:
    `{"step", "eval/loss", "eval/accuracy"}`, and per eval slice (MQAR's
    `eval_slices`) `"eval/loss/<slice>"`, `"eval/accuracy/<slice>"`.

  Raises:
    FileNotFoundError: no checkpoint (of `step`) in the workdir.
    CorruptCheckpoint: the checkpoint's parameters do not restore or verify; the message
      names its step and what is wrong.
  """
  from attn_jax.train.load import load_meta  # pylint: disable=g-import-not-at-top
  meta = load_meta(workdir, step)
  config = config_check.from_json(meta["config"])
  config.kernels = dispatch.check_kernels(kernels)
  try:
    mesh = sharding.make_mesh(mesh or config.mesh)
  except ValueError:
    mesh = sharding.make_mesh({"data": -1})
  rules = sharding.rules_from_config(config.get("sharding_rules", ()))
  setup = make_setup(config, vocab_size=meta["vocab_size"], mesh=mesh, rules=rules)
  checkpoints = Checkpoints(workdir, read_only=True)
  evals = []
  try:
    try:
      params = checkpoints.restore_params(meta["step"], setup.abstract_state()["params"])
    except Exception as e:  # orbax raises many types for damaged files
      others = [s for s in checkpoints.steps() if s != meta["step"]]
      raise CorruptCheckpoint(
          f"checkpoint {meta['step']} in {checkpoints.directory} does not restore: "
          f"{describe_error(e)}" + (f" (other checkpoints: {others})" if others else "")
      ) from None
    evals = _eval_inputs(config, mesh, rules)
    eval_steps = [make_eval_step(setup, {k: e.shape for k in e.keys}) for _, e in evals]
    steps = config.eval.num_steps if num_steps is None else num_steps
    return {"step": meta["step"], **_evaluate(eval_steps, params, evals, steps)}
  finally:
    checkpoints.close()
    for _, inputs in evals:
      inputs.pipeline.close()
