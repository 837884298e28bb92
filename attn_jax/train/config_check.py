"""Checks on a run's config, and whether a workdir's checkpoint belongs to it.

A workdir that holds checkpoints is resumed only by a config that trains the same
model on the same data the same way. Fields that only change how the run is executed
(`RESUMABLE`: step count, logging/eval/checkpoint frequency, mesh, rules, data_dir,
remat, kernels) may differ; anything else is refused with the list of differences.
"""

from __future__ import annotations

import json

import ml_collections

from attn_jax.models.blocks import check_mixer_options
from attn_jax.ops import dispatch

# Prefixes of config fields a resumed run may change.
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every",
             "train.loss_positions", "train.stop_accuracy", "eval.",
             "checkpoint.", "mesh.", "sharding_rules", "data.data_dir", "model.remat",
             "tensorboard", "kernels")


class ConfigMismatchError(ValueError):
  """The workdir holds a checkpoint of a different config."""


def to_json(config) -> dict:
  """The config as JSON-compatible nested dicts (tuples become lists)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(tree, default=str))


def from_json(tree) -> ml_collections.ConfigDict:
  """A saved config; model fields added since it was saved (`ADDED_FIELDS`) get the values
  that reproduce the run, so a model saved before a field existed rebuilds as it was."""
  tree = json.loads(json.dumps(tree, default=str))
  for field, value in ADDED_FIELDS.items():
    if not field.startswith("model."):
      continue
    *parents, name = field.split(".")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
      if not isinstance(node, dict):
        break
    else:
      node.setdefault(name, value)
  return ml_collections.ConfigDict(tree)


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(saved, current):
  """`[(field, saved value, current value)]` for fields that may not change on resume.
  A field added since the checkpoint was saved (`ADDED_FIELDS`) reads as its default."""
  mixers = {*_mixers(saved), *_mixers(current)}
  saved, current = _flatten(to_json(saved)), _flatten(to_json(current))
  saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in current}, **saved}
  diffs = []
  for key in sorted(set(saved) | set(current)):
    parts = key.split(".")
    if parts[:2] == ["model", "mixer_options"] and len(parts) > 3 and (
        parts[2] not in mixers and parts[2] != "all"):
      continue  # options of a mixer the model does not have change nothing
    if any(key == p or key.startswith(p) for p in RESUMABLE):
      continue
    if saved.get(key, "<missing>") != current.get(key, "<missing>"):
      diffs.append((key, saved.get(key, "<missing>"), current.get(key, "<missing>")))
  return diffs


def _mixers(config):
  mixers = to_json(config).get("model", {}).get("mixers", ())
  return [mixers] if isinstance(mixers, str) else list(mixers)


# Fields added to configs after runs were saved without them: `field: the value the
# saved runs had` (their behaviour then), so those runs still resume and load.
ADDED_FIELDS = {"data.random_non_queries": True, "data.train_slices": "",
                "data.eval_slices": "", "model.norm": "rms",
                "model.positions": "none", "model.max_len": 0,
                "model.mixer_options.diff.lambda_per_head": True, "model.embed_dropout": 0.0}


def check_resumable(saved, current, workdir, step):
  """Raises ConfigMismatchError naming every field that differs."""
  diffs = differences(saved, current)
  if diffs:
    lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, a, b in diffs)
    fixes = " ".join(f"--config.{k}={json.dumps(a)}" for k, a, _ in diffs[:4]
                     if a != "<missing>")
    raise ConfigMismatchError(
        f"{workdir} holds a checkpoint (step {step}) of a different config:\n{lines}\n"
        f"Refusing to resume it with this config (nothing was changed). Use another "
        f"--workdir for a new run, or resume with the checkpoint's values"
        + (f" (e.g. {fixes})." if fixes else "."))


def check_config(config):
  """Raises ValueError naming a missing or bad field of a training config."""
  for field in ("seed", "model", "data", "optimizer", "train", "eval", "checkpoint",
                "mesh"):
    if field not in config:
      raise ValueError(f"config.{field} is missing.")
  positive = {"train.num_steps": config.train.num_steps,
              "train.global_batch_size": config.train.global_batch_size,
              "train.log_every": config.train.log_every,
              "train.eval_every": config.train.eval_every,
              "checkpoint.every": config.checkpoint.every,
              "checkpoint.keep": config.checkpoint.keep,
              "eval.global_batch_size": config.eval.global_batch_size}
  for name, value in positive.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{name} must be a positive int; got {value!r}.")
  if not isinstance(config.eval.num_steps, int) or config.eval.num_steps < 0:
    raise ValueError(f"config.eval.num_steps must be an int >= 0 (0: the whole split); "
                     f"got {config.eval.num_steps!r}.")
  stop = config.train.get("stop_accuracy", 0.0)
  if isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0 <= stop < 1:
    raise ValueError(f"config.train.stop_accuracy must be a number in [0, 1) (0: train "
                     f"all of train.num_steps); got {stop!r}.")
  dispatch.check_kernels(config.get("kernels") or {}, where="config.kernels")
  check_mixer_options(config.model.get("mixer_options"), where="config.model.mixer_options")
  _check_loss_positions(config)


def _check_loss_positions(config):
  """`train.loss_positions` must hold every loss position of a row, so it is taken only
  for MQAR, whose rows have exactly their pairs' number (the most of any slice)."""
  n = config.train.get("loss_positions", 0)
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ValueError(f"config.train.loss_positions must be an int >= 0 (0: logits at "
                     f"every position); got {n!r}.")
  if not n:
    return
  if config.data.get("name") != "mqar":
    raise ValueError("config.train.loss_positions > 0 needs data whose rows have at most "
                     "that many loss positions (MQAR); set it to 0 for "
                     f"{config.data.get('name')!r}.")
  from attn_jax.data import mqar  # pylint: disable=g-import-not-at-top  (tfds)
  pairs = [config.data.num_kv_pairs] + [
      kv for field in ("train_slices", "eval_slices")
      for _, kv, _ in mqar.parse_slices(config.data.get(field, ""), f"config.data.{field}")]
  if n < max(pairs):
    raise ValueError(f"config.train.loss_positions={n} is fewer than the most query "
                     f"positions of a row ({max(pairs)} pairs): set it to {max(pairs)}.")
