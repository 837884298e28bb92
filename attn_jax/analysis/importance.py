"""Head importance and ablation: what a model loses when heads are masked.

    batches = [{"inputs": ..., "targets": ..., "loss_mask": ...}, ...]   # evaluation data
    evaluate_heads(model, batches)                    # {"loss", "accuracy"}, all heads on
    evaluate_heads(model, batches, off=[(1, 0)])      # layer 1's head 0 masked
    importance = head_importance(model, batches)      # [layers, heads] scores
    pruning_curve(model, batches, order, fractions)   # accuracy as heads are removed

A head is masked by scaling its output by 0 before the mixer's output projection
(`attn_jax.layers.scope.head_mask`), as Michel et al. (2019, "Are Sixteen Heads Really
Better than One?") do; every multi-head mixer honours it, in the forward pass and in
decode. Loss and accuracy are those of training (`attn_jax.train.step.token_metrics`:
next-token cross entropy and argmax accuracy where `loss_mask` is 1, for MQAR the
queries), summed over all batches before dividing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax.layers.scope import head_mask
from attn_jax.train.step import token_metrics


def head_grid(model):
  """`(num_layers, num_heads)` of a model's head mask; layers without heads (BaseConv)
  have a row that is ignored."""
  counts = {getattr(block.mixer, "num_heads", None) for block in model.blocks}
  counts.discard(None)
  if len(counts) != 1:
    raise ValueError(f"head masks need one head count for every layer; the model's "
                     f"mixers have {sorted(counts)}.")
  return len(model.blocks), counts.pop()


def _mask_with(model, off=(), value=0.0):
  mask = np.ones(head_grid(model), np.float32)
  for layer, head in off:
    mask[layer, head] = value
  return jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_mask_gradient(graphdef, state, mask, batch):
  def loss(mask):
    model = nnx.merge(graphdef, state)
    with head_mask(mask):
      logits = model(batch["inputs"], batch.get("segment_ids"))
    sums = token_metrics(logits, batch["targets"], batch["loss_mask"])
    return sums["loss_sum"], sums
  return jax.value_and_grad(loss, has_aux=True)(mask)


def _sums(model, batches, mask):
  """Sums over `batches` of loss, correct and count, and `Σ_b |∂loss_b/∂mask|` (loss_b:
  batch b's summed loss)."""
  graphdef, state = nnx.split(model)
  totals, magnitude = {}, 0.0
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    (_, sums), grad = _loss_and_mask_gradient(graphdef, state, mask, batch)
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    magnitude = magnitude + jnp.abs(grad)
  if not totals or totals["count"] == 0:
    raise ValueError("batches hold no position with loss_mask 1: nothing to evaluate.")
  return totals, np.asarray(magnitude)


def evaluate_heads(model, batches, off=(), mask=None):
  """`{"loss", "accuracy"}` over `batches` with the heads in `off` masked.

  Args:
    model: a `DecoderLM`.
    batches: a list of dicts with `inputs`, `targets`, `loss_mask` `[batch, seq]` (and
      optionally `segment_ids`).
    off: `(layer, head)` pairs to mask (set to 0).
    mask: instead of `off`, a whole `[layers, heads]` mask (0/1 or soft).
  """
  mask = _mask_with(model, off) if mask is None else jnp.asarray(mask, jnp.float32)
  totals, _ = _sums(model, batches, mask)
  return {"loss": totals["loss_sum"] / totals["count"],
          "accuracy": totals["correct"] / totals["count"]}


def head_importance(model, batches):
  """Per-head importance, `[layers, heads]` float arrays in a dict:

  - "gradient": Michel et al.'s I_h = E_x |∂L(x)/∂ξ_h| at ξ = 1, the importance their
    pruning ranks by: here Σ_b |∂L_b/∂ξ_h| / N, L_b the summed loss of batch b and N
    the number of scored positions (per-example as the paper with batches of one).
  - "loss_change", "accuracy_change": the loss and accuracy with head h alone masked,
    minus those with every head on (one evaluation per head).
  """
  grid = head_grid(model)
  base_totals, magnitude = _sums(model, batches, _mask_with(model))
  count = base_totals["count"]
  base = {"loss": base_totals["loss_sum"] / count, "accuracy": base_totals["correct"] / count}
  loss_change, accuracy_change = np.zeros(grid), np.zeros(grid)
  for layer, head in np.ndindex(*grid):
    result = evaluate_heads(model, batches, off=[(layer, head)])
    loss_change[layer, head] = result["loss"] - base["loss"]
    accuracy_change[layer, head] = result["accuracy"] - base["accuracy"]
  return {"gradient": magnitude / count, "loss_change": loss_change,
          "accuracy_change": accuracy_change}


def order_by(scores, *, descending=True):
  """`(layer, head)` pairs sorted by `scores [layers, heads]` (highest first by default)."""
  scores = np.asarray(scores)
  flat = np.argsort(-scores if descending else scores, axis=None, kind="stable")
  return [tuple(int(i) for i in np.unravel_index(f, scores.shape)) for f in flat]


def random_order(grid, seed=0):
  """All `(layer, head)` pairs of a `(layers, heads)` grid in a random order."""
  pairs = list(np.ndindex(*grid))
  np.random.default_rng(seed).shuffle(pairs)
  return [tuple(int(i) for i in p) for p in pairs]


def pruning_curve(model, batches, order, fractions=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                   0.8, 0.9)):
  """Accuracy and loss as the first `fraction` of `order`'s heads are masked.

  Returns a list of `{"fraction", "heads_off", "loss", "accuracy"}`, one per fraction (the
  number of heads masked is `round(fraction · len(order))`). Michel et al. prune the
  least important heads first: `order_by(importance["gradient"], descending=False)`.
  """
  curve = []
  for fraction in fractions:
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"fractions must lie in [0, 1]; got {fraction}.")
    n = int(round(fraction * len(order)))
    result = evaluate_heads(model, batches, off=order[:n])
    curve.append({"fraction": float(fraction), "heads_off": n, **result})
  return curve
