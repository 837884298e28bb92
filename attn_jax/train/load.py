"""`attn_jax.load(workdir)`: the trained model of a workdir, ready to call or generate.

The model is rebuilt from the config saved in the checkpoint and its parameters are
restored onto whatever devices this process has: one device by default, or sharded over
a given mesh — not necessarily the mesh it was trained on.
"""

from __future__ import annotations

import jax
from absl import logging
from flax import nnx

from attn_jax import sharding
from attn_jax.ops import dispatch
from attn_jax.train import config_check
from attn_jax.train.checkpoint import (Checkpoints, CorruptCheckpoint, checkpoint_dir,
                                       describe_error)
from attn_jax.train.state import ModelSpec


def load_meta(workdir, step=None):
  """The saved `meta` (config, vocab_size, step) of checkpoint `step` (default newest).

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
  """
  if not checkpoint_dir(workdir).exists():
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}; train first "
                            "(python -m experiments.train --workdir=...).")
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    steps = checkpoints.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train first "
                              "(python -m experiments.train --workdir=...).")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoints.directory}; "
                              f"there are {steps}.")
    candidates = [step] if step is not None else list(reversed(steps))
    return _first_readable(checkpoints, candidates, checkpoints.read_meta,
                           "has a meta item that does not read")
  finally:
    checkpoints.close()


def load_config(workdir, step=None):
  """The config a workdir's checkpoint was trained with (an ml_collections ConfigDict)."""
  return config_check.from_json(load_meta(workdir, step)["config"])


def load(workdir, *, step=None, mesh=None, rules=None, kernels=None):
  """Rebuilds the model of `workdir` and restores its weights.

  Args:
    workdir: a training run's workdir (its `checkpoints/`).
    step: the checkpoint step (default: the newest).
    mesh: None puts the parameters on one device (`jax.devices()[0]`); a
      `jax.sharding.Mesh` (e.g. `attn_jax.sharding.make_mesh({"fsdp": -1})`) shards them
      by the sharding rules.
    rules: the logical-axis rules for `mesh` (default `attn_jax.sharding.RULES`).
    kernels: `{op: implementation}` the model's calls run with, e.g.
      `{"linear_attention": "xla"}` (see `attn_jax.ops.dispatch.kernels`); default: the
      automatic choice (or the caller's `dispatch.kernels` context). The kernels the run
      trained with are not part of the model: a checkpoint loads with any.

  Returns:
    The `nnx.Module` (e.g. `DecoderLM`), in eval-ready state: `model(tokens)` gives
    logits, `attn_jax.models.generate(model, prompts, ...)` continues prompts.
  """
  meta = load_meta(workdir, step)
  config = config_check.from_json(meta["config"])
  spec = ModelSpec(config.model, int(meta["vocab_size"]), int(config.seed))
  graphdef, abstract = spec.abstract()
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, nnx.to_pure_dict(abstract))
  else:
    shardings = sharding.param_shardings(abstract, mesh, rules or sharding.RULES)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    newest = int(meta["step"])
    candidates = ([s for s in reversed(checkpoints.steps()) if s <= newest]
                  if step is None else [newest])
    params = _first_readable(checkpoints, candidates,
                             lambda s: checkpoints.restore_params(s, target),
                             "does not restore")
  finally:
    checkpoints.close()
  model = nnx.merge(graphdef, params)
  model.kernels = tuple(sorted(dispatch.check_kernels(kernels).items())) or None
  return model


def _first_readable(checkpoints, candidates, read, failure):
  """`read(step)` of the first of `candidates` (steps, newest first) that reads and
  verifies; a warning naming each one that does not and the one tried next. Raises
  CorruptCheckpoint naming the last candidate's step and `failure` if none reads; nothing
  is moved or deleted."""
  for i, step in enumerate(candidates):
    try:
      return read(step)
    except Exception as e:  # orbax and json raise many types for damaged files
      if i + 1 == len(candidates):
        raise CorruptCheckpoint(f"checkpoint {step} in {checkpoints.directory} {failure}: "
                                f"{describe_error(e)}") from None
      logging.warning("checkpoint %d %s (%s); using the previous one, %d.", step, failure,
                      describe_error(e), candidates[i + 1])
