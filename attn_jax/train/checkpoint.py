"""Checkpoints: orbax CheckpointManager with async saves, keep-N, and a safe resume.

A checkpoint of step s holds four items: `params`, `opt_state` (with the step), `data`
(the input pipeline's position) and `meta` (the step, the vocabulary size and the
whole config, whose seed fixes every random draw, so `attn_jax.load(workdir)` can
rebuild the model). Saves are asynchronous: training continues while the arrays are
written, and orbax renames a checkpoint into place only when all of it is written, so a
directory without the temporary suffix is complete.

Resuming takes the newest checkpoint that restores. One that fails (files truncated or
missing) is reported and moved to `<workdir>/corrupt_checkpoints/` — never deleted — and
the next older one is tried; half-written temporary directories are reported and skipped.
"""

from __future__ import annotations

import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

ITEMS = ("params", "opt_state", "data", "meta")
FORMAT_VERSION = 1


def absolute(workdir):
  """`workdir` as an absolute path (orbax needs one); URLs like gs://… stay as they are."""
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else epath.Path(os.path.abspath(os.path.expanduser(
      str(workdir))))


def checkpoint_dir(workdir):
  return absolute(workdir) / "checkpoints"


class Checkpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir, *, keep=3, async_save=True, read_only=False):
    self.workdir = absolute(workdir)
    self.directory = checkpoint_dir(workdir)
    # A reader opens the manager without `read_only` (which only adds warnings) and
    # never saves, so it never deletes or writes anything.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
        create=not read_only)
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=ITEMS, item_handlers=handlers)

  def steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step, state, data_state, meta):
    """Starts an asynchronous save of `state` at `step` (returns once it is under way)."""
    meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave({"step": state["step"],
                                         "opt_state": state["opt_state"]}),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
    self.manager.save(int(step), args=args, force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def read_meta(self, step=None):
    """The `meta` item (config, vocab size) of `step` (default: the newest)."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"]

  def newest_meta(self):
    """The `meta` of the newest checkpoint whose meta reads (None without any)."""
    for step in reversed(self.steps()):
      try:
        return self.read_meta(step)
      except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
        continue
    return None

  def restore_params(self, step, abstract_params):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"]

  def restore(self, step, abstract_state):
    """`(state, data_state, meta)` of checkpoint `step`, into `abstract_state`'s shardings."""
    target = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        opt_state=ocp.args.StandardRestore(target),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    opt = restored["opt_state"]
    state = {"step": opt["step"], "params": restored["params"],
             "opt_state": opt["opt_state"]}
    return state, restored["data"], restored["meta"]

  def restore_latest(self, abstract_state):
    """The newest checkpoint that restores: `(step, state, data_state, meta)` or None.

    A checkpoint that fails to restore is logged and moved aside, then the previous
    one is tried.
    """
    self._report_partial()
    for step in reversed(self.steps()):
      try:
        state, data_state, meta = self.restore(step, abstract_state)
      except Exception as e:  # orbax raises many types for unreadable files
        logging.warning("checkpoint %d in %s does not restore (%s: %s); moving it to "
                        "corrupt_checkpoints/ and trying the previous one.", step,
                        self.directory, type(e).__name__, str(e).splitlines()[0][:300])
        self._move_aside(step)
        continue
      return step, state, data_state, meta
    return None

  def _report_partial(self):
    if not self.directory.exists():
      return
    for path in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in path.name:
        logging.warning("ignoring a partial (unfinished) checkpoint: %s", path)

  def _move_aside(self, step):
    if jax.process_index() == 0:
      aside = self.workdir / "corrupt_checkpoints"
      aside.mkdir(parents=True, exist_ok=True)
      source = self.directory / str(step)
      target = aside / f"{step}-{int(time.time())}"
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"attn_jax_move_aside_{step}")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
