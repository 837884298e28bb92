"""The optimizer and learning-rate schedule from `config.optimizer`.

    optimizer:
      name: "adamw" | "adam" | "sgd" | "lion"
      learning_rate: peak rate
      schedule: "cosine" | "linear" | "constant" (after a linear warm-up from 0)
      warmup_steps: steps of warm-up
      end_learning_rate_fraction: the final rate as a fraction of the peak (cosine/linear)
      b1, b2, eps: Adam/Lion moments (b1 is SGD's momentum)
      weight_decay: decoupled weight decay
      weight_decay_on: "matrices" (default: parameters of rank ≥ 2, i.e. matrices and
        embeddings, not norms' scales or biases) | "all" (every parameter, as
        torch.optim.AdamW applied to a whole model)
      grad_clip_norm: clip the global gradient norm to this (0 disables)

Optimizer state follows the parameters' sharding (see `state.py`) and stays in float32.
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
DECAYED = ("matrices", "all")


def make_schedule(config, num_steps):
  """`optax.Schedule`: linear warm-up to `learning_rate`, then the named decay."""
  peak = float(config.learning_rate)
  warmup = int(config.warmup_steps)
  end = peak * float(config.get("end_learning_rate_fraction", 0.0))
  name = config.get("schedule", "cosine")
  if name not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}; got {name!r}.")
  if warmup < 0 or peak <= 0:
    raise ValueError(f"config.optimizer needs learning_rate > 0 and warmup_steps >= 0; got "
                     f"{peak} and {warmup}.")
  decay_steps = max(int(num_steps) - warmup, 1)
  if name == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif name == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config, num_steps):
  """`(optax.GradientTransformation, schedule)` for `config.optimizer`."""
  schedule = make_schedule(config, num_steps)
  name = config.get("name", "adamw")
  decayed = config.get("weight_decay_on", "matrices")
  if decayed not in DECAYED:
    raise ValueError(f"config.optimizer.weight_decay_on must be one of {DECAYED}; got "
                     f"{decayed!r}.")
  decay_mask = None if decayed == "all" else (
      lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  b1, b2 = float(config.get("b1", 0.9)), float(config.get("b2", 0.95))
  weight_decay = float(config.get("weight_decay", 0.0))
  if name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=float(config.get("eps", 1e-8)),
                     weight_decay=weight_decay, mask=decay_mask)
  elif name == "adam":
    tx = optax.adam(schedule, b1=b1, b2=b2, eps=float(config.get("eps", 1e-8)))
  elif name == "lion":
    tx = optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=b1 or None)
  else:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}; got {name!r}.")
  clip = float(config.get("grad_clip_norm", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
