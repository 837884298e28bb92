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
    for i, candidate in enumerate(candidates):
      try:
        return checkpoints.read_meta(candidate)
      except Exception as e:  # orbax and json raise many types for damaged files
        reason = describe_error(e)
        if i + 1 == len(candidates):
          raise CorruptCheckpoint(f"checkpoint {candidate} in {checkpoints.directory}: its "
                                  f"meta item does not read ({reason}).") from None
        logging.warning("checkpoint %d: its meta item does not read (%s); using the "
                        "previous one, %d.", candidate, reason, candidates[i + 1])
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
    params = _restore_params(checkpoints, int(meta["step"]), target, fall_back=step is None)
  finally:
    checkpoints.close()
  model = nnx.merge(graphdef, params)
  model.kernels = tuple(sorted(dispatch.check_kernels(kernels).items())) or None
  return model


def _restore_params(checkpoints, step, target, fall_back):
  """The verified params of checkpoint `step`; with `fall_back`, of the newest older one
  that restores if `step`'s does not (with a warning naming both). Raises CorruptCheckpoint
  (or orbax's error) naming the step otherwise; nothing is moved or deleted."""
  candidates = [s for s in reversed(checkpoints.steps()) if s <= step] if fall_back else [step]
  for i, candidate in enumerate(candidates):
    try:
      params = checkpoints.restore_params(candidate, target)
    except Exception as e:  # orbax raises many types for unreadable files
      if i + 1 == len(candidates):
        raise CorruptCheckpoint(f"checkpoint {candidate} in {checkpoints.directory} does "
                                f"not restore: {describe_error(e)}") from None
      logging.warning("checkpoint %d does not restore (%s); loading the previous one, %d.",
                      candidate, describe_error(e), candidates[i + 1])
      continue
    return params
