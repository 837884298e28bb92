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
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback

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
    _ignore_abandoned_reads()  # before: some abandoned reads end before the error is raised
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
  here; what is left names the array, the item's folder, the file and what is wrong."""
  message = str(e).splitlines()[0] if str(e) else ""
  message = message.split(" [tensorstore_spec", 1)[0]
  message = re.sub(r'(Error opening "\w+" driver: )+', "", message)
  if len(message) > limit:
    message = message[:limit] + " ..."
  return f"{type(e).__name__}: {message}"


def _ignore_abandoned_reads():
  """Drops the "Event loop is closed" reports of the reads a failed restore abandoned.

  When one array fails, orbax closes its event loop while TensorStore still reads the
  others; each of those reads that ends later reports a RuntimeError from asyncio's
  `call_soon_threadsafe` through `sys.unraisablehook` (about 20 tracebacks for a tiny
  model). Installed by every restore (unless in place); every other report passes on to
  the hook that was there before.
  """
  if getattr(sys.unraisablehook, "drops_abandoned_reads", False):
    return
  before = sys.unraisablehook

  def hook(unraisable):
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if not (unraisable.object is None and unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"
            and any(f.name == "call_soon_threadsafe" for f in frames)):
      before(unraisable)
  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


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
