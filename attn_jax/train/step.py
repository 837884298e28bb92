"""The jit'd train and eval steps, with explicit input and output shardings.

Loss: next-token cross entropy averaged over the positions where `loss_mask` is 1 (for
MQAR, the query positions); accuracy: argmax = target over the same positions. Both are
computed in float32 from float32 logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attn_jax import sharding
from attn_jax.layers import scope
from attn_jax.ops import dispatch
from attn_jax.train.cross_entropy import cross_entropy_and_argmax

def token_metrics(logits, targets, loss_mask):
  """Sums over masked positions: `{"loss_sum", "correct", "count"}` (float32 scalars)."""
  nll, predictions = cross_entropy_and_argmax(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  correct = (predictions == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


def model_metrics(graphdef, params, batch, loss_positions=0):
  """`token_metrics` of the model on `batch`; with `loss_positions` = n > 0, the logits
  only at the first n positions of each row where `loss_mask` is nonzero (rows must have
  at most n: `config.train.loss_positions`, checked against the data by `check_config`),
  which gives the same sums without projecting every other token onto the vocabulary."""
  model = nnx.merge(graphdef, params)
  targets, mask = batch["targets"], batch["loss_mask"]
  if not loss_positions:
    return token_metrics(model(batch["inputs"], batch.get("segment_ids")), targets, mask)
  positions = jnp.argsort(mask == 0, axis=1, stable=True)[:, :loss_positions]
  logits = model(batch["inputs"], batch.get("segment_ids"), positions=positions)
  pick = lambda x: jnp.take_along_axis(x, positions, axis=1)
  return token_metrics(logits, pick(targets), pick(mask))


def batch_shardings(mesh, batch_shapes, rules):
  with sharding.use_rules(rules):
    return {k: sharding.batch_sharding(mesh, shape) for k, shape in batch_shapes.items()}


_DROPOUT_STREAM = 1  # the seed's key folded with it: dropout's, apart from the init's


def make_train_step(setup, batch_shapes):
  """`train_step(state, batch) -> (state, metrics)`, jit'd; `state` is donated.

  metrics: "loss", "accuracy", "grad_norm", "learning_rate" (replicated float32).
  """
  in_batch = batch_shardings(setup.mesh, batch_shapes, setup.rules)
  replicated = sharding.replicated(setup.mesh)

  def train_step(state, batch):
    # Dropout (where the model has any) is on here only, its masks a function of the
    # seed and the step, so a resumed run draws the same ones.
    dropout_key = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(setup.spec.seed), _DROPOUT_STREAM), state["step"])

    def loss_fn(params):
      with scope.dropout_rng(dropout_key):
        sums = model_metrics(setup.graphdef, params, batch, setup.loss_positions)
      return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss,
               "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
               "grad_norm": optax.tree.norm(grads),
               "learning_rate": jnp.asarray(setup.schedule(state["step"]), jnp.float32)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  jitted = jax.jit(train_step, in_shardings=(setup.shardings, in_batch),
                   out_shardings=(setup.shardings, replicated), donate_argnums=0)
  return _in_context(jitted, setup)


def make_eval_step(setup, batch_shapes):
  """`eval_step(params, batch) -> {"loss_sum", "correct", "count"}`, jit'd."""
  in_batch = batch_shardings(setup.mesh, batch_shapes, setup.rules)
  jitted = jax.jit(lambda params, batch: model_metrics(setup.graphdef, params, batch,
                                                      setup.loss_positions),
                   in_shardings=(setup.shardings["params"], in_batch),
                   out_shardings=sharding.replicated(setup.mesh))
  return _in_context(jitted, setup)


def _in_context(jitted, setup):
  """Calls (and traces) `jitted` under the setup's mesh, sharding rules and kernels."""
  def call(*args):
    with (jax.set_mesh(setup.mesh), sharding.use_rules(setup.rules),
          dispatch.kernels(**setup.kernels)):
      return jitted(*args)
  call.jitted = jitted
  return call
