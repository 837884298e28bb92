"""Checkpoints: orbax CheckpointManager with async saves, keep-N, and a safe resume.

A checkpoint of step s holds four items: `params`, `opt_state` (with the step), `data`
(the input pipeline's position) and `meta` (the step, the vocabulary size and the
whole config, whose seed fixes every random draw, so `attn_jax.load(workdir)` can
rebuild the model). Saves are asynchronous: training continues while the arrays are
written, and orbax renames a checkpoint into place only when all of it is written, so a
directory without the temporary suffix is complete.

Resuming takes the newest checkpoint that restores and verifies. One that fails (files
truncated or missing, or arrays whose bytes changed since the save) is reported and moved
to `<workdir>/corrupt_checkpoints/` — never deleted — and the next older one is tried;
half-written temporary directories are reported and skipped. Verification: at save the
`meta` item records a fingerprint of every array (`fingerprint`: its float64 sum and sum
of squares, computed on the devices); restored arrays must be finite and match it.
A failed restore says, in one line, which step and what was wrong (`describe_error`), and
lets the reads it abandoned finish before their event loop closes (`_settle_abandoned_reads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
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
    meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint(_saved_arrays(state))}
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
    return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

  def newest_meta(self):
    """The `meta` of the newest checkpoint whose meta reads (None without any)."""
    for step in reversed(self.steps()):
      try:
        return self.read_meta(step)
      except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
        continue
    return None

  def restore_params(self, step, abstract_params):
    """The `params` item of checkpoint `step`, verified against its fingerprint."""
    restored = self._restore(step, params=ocp.args.StandardRestore(abstract_params),
                             meta=ocp.args.JsonRestore())
    verify(step, {"params": restored["params"]}, restored["meta"])
    return restored["params"]

  def restore(self, step, abstract_state):
    """`(state, data_state, meta)` of checkpoint `step`, into `abstract_state`'s shardings."""
    target = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
    restored = self._restore(step, params=ocp.args.StandardRestore(abstract_state["params"]),
                             opt_state=ocp.args.StandardRestore(target),
                             data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    opt = restored["opt_state"]
    state = {"step": opt["step"], "params": restored["params"],
             "opt_state": opt["opt_state"]}
    verify(step, _saved_arrays(state), restored["meta"])
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
        logging.warning("checkpoint %d in %s does not restore (%s); moving it to "
                        "corrupt_checkpoints/ and trying the previous one.", step,
                        self.directory, describe_error(e))
        self._move_aside(step)
        continue
      return step, state, data_state, meta
    return None

  def _restore(self, step, **items):
    with _settle_abandoned_reads():
      return self.manager.restore(step, args=ocp.args.Composite(**items))

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


class CorruptCheckpoint(ValueError):
  """A checkpoint whose arrays restore but are not what was saved."""


def describe_error(e, limit=1000):
  """`Type: message` of a failed restore, on one line: TensorStore's messages end with
  the JSON spec of every layer of the failed read (~2,000 characters per array), cut
  here; what is left names the array, the item's folder, the file and what is wrong.

  orbax wraps the error of a failed chunk read in one that says only the array index and
  then the spec ("Encountered error while reading array index: ... See full TensorStore
  details: ..."); the error it wraps is described instead."""
  while e.__cause__ is not None and "See full TensorStore details" in str(e):
    e = e.__cause__
  message = str(e).splitlines()[0] if str(e) else ""
  message = message.split(" [tensorstore_spec", 1)[0]
  message = re.sub(r'(Error opening "\w+" driver: )+', "", message)
  if len(message) > limit:
    message = message[:limit] + " ..."
  return f"{type(e).__name__}: {message}"


SETTLE_SECONDS = 30.0


class _SettlingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that, closed with tasks still pending, first lets them finish
  (cancelling those still running after `SETTLE_SECONDS`), as `asyncio.run` does."""

  def close(self):
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        _, late = self.run_until_complete(asyncio.wait(pending, timeout=SETTLE_SECONDS))
        for task in late:
          task.cancel()
        # Collects every outcome, so none is reported as never retrieved.
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _SettlingPolicy(asyncio.AbstractEventLoopPolicy):
  """`base` (the default policy), except that new event loops are `_SettlingEventLoop`s.
  Every other call goes to `base`, so each thread's current loop stays what it was."""

  def __init__(self, base):
    self.base = base

  def get_event_loop(self):
    return self.base.get_event_loop()

  def set_event_loop(self, loop):
    self.base.set_event_loop(loop)

  def new_event_loop(self):
    return _SettlingEventLoop()

  def get_child_watcher(self):
    return self.base.get_child_watcher()

  def set_child_watcher(self, watcher):
    self.base.set_child_watcher(watcher)


_POLICY_LOCK = threading.RLock()  # held while a restore runs: a nested one changes nothing


@contextlib.contextmanager
def _settle_abandoned_reads():
  """Within: event loops created by orbax let their pending reads finish before closing.

  orbax runs a restore's reads as tasks of a fresh event loop and closes it when the
  restore ends (`asyncio_utils.run_sync`: `run_until_complete`, then `close`, without
  asyncio.run's clean-up of pending tasks). When one read fails, the others are
  abandoned mid-read: TensorStore later completes each on the closed loop (a "RuntimeError:
  Event loop is closed" traceback from its thread), and the garbage collector closes the
  suspended coroutines, each printing its error with the whole TensorStore spec (or, at
  interpreter exit, an ImportError) — dozens of tracebacks after the one useful message,
  how many depending on timing. A loop that waits for them prints none of that; the wait
  costs at most what the rest of the restore would have. Another policy than asyncio's
  default (uvloop's, say) is left alone.
  """
  with _POLICY_LOCK:
    base = asyncio.get_event_loop_policy()
    if type(base) is not asyncio.DefaultEventLoopPolicy:  # pylint: disable=unidiomatic-typecheck
      yield
      return
    asyncio.set_event_loop_policy(_SettlingPolicy(base))
    try:
      yield
    finally:
      asyncio.set_event_loop_policy(base)


def _saved_arrays(state):
  return {"params": state["params"], "opt_state": state["opt_state"]}


@jax.jit
def _sums(tree):
  """Per array: [sum, sum of squares, sum of magnitudes] in float32, on its devices."""
  def sums(x):
    x = x.astype(jnp.float32)
    return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(jnp.abs(x))])
  return jax.tree.map(sums, tree)


def fingerprint(tree):
  """`{path: [sum, sum of squares, sum of magnitudes]}` of every array of `tree`: what `verify`
  compares a restored tree with. Computed on the devices (one pass over the arrays)."""
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(_sums(tree)))
  return {jax.tree_util.keystr(path): [float(v) for v in np.asarray(value)]
          for path, value in leaves}


def verify(step, tree, meta):
  """Raises CorruptCheckpoint naming `step` unless every array of `tree` (all or part of
  what was saved) is finite and, where `meta` has a fingerprint (checkpoints written
  since it was added), matches it.

  The sums are compared to 1e-4 of the sum of magnitudes (a restore onto another device
  layout may sum in another order); a changed byte moves them far more."""
  got = fingerprint(tree)
  bad = [path for path, sums in got.items() if not np.all(np.isfinite(sums))]
  if bad:
    raise CorruptCheckpoint(f"checkpoint {step}: non-finite values in {len(bad)} arrays "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}).")
  saved = meta.get("fingerprint") if isinstance(meta, dict) else None
  if saved is None:
    return
  def differs(now, then):
    tolerance = 1e-4 * max(then[2], now[2]) + 1e-30
    return (abs(now[0] - then[0]) > tolerance
            or abs(now[1] - then[1]) > 1e-4 * max(then[1], now[1]) + 1e-30)
  changed = [path for path, value in got.items()
             if path not in saved or differs(value, saved[path])]
  if changed:
    raise CorruptCheckpoint(
        f"checkpoint {step}: {len(changed)} arrays differ from what was saved "
        f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): the files were "
        "changed or damaged after the save.")
