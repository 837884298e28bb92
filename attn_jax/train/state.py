"""The training state, built sharded: no device ever holds a full unsharded copy.

The state is a plain pytree `{"step", "params", "opt_state"}`: `params` is the model's
parameters as a pure dict (`nnx.to_pure_dict`), merged back into the module inside the
jit'd steps with `nnx.merge(graphdef, params)`. Initialisation runs inside `jax.jit` with
the target shardings as `out_shardings`, so each device computes only its own shards
(JAX's partitionable threefry gives the same values whatever the mesh).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attn_jax import models, sharding
from attn_jax.train.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What rebuilds a model: its config, vocabulary and seed."""
  model_config: Any
  vocab_size: int
  seed: int

  def build(self, rngs=None):
    rngs = nnx.Rngs(self.seed) if rngs is None else rngs
    with nnx.use_eager_sharding(False):  # shardings are applied by `out_shardings`
      return models.build(self.model_config, vocab_size=self.vocab_size, rngs=rngs)

  def abstract(self):
    """`(graphdef, abstract state)`: shapes, dtypes and logical axes, no memory."""
    return nnx.split(nnx.eval_shape(self.build))


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the steps and checkpoints need about the state's layout."""
  spec: ModelSpec
  graphdef: Any
  abstract_model: Any  # nnx.State of abstract Variables (logical axis metadata)
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: Any
  shardings: dict  # like the train state: NamedShardings
  kernels: dict = dataclasses.field(default_factory=dict)  # {op: name}, steps trace in it
  loss_positions: int = 0  # config.train.loss_positions: logits at that many per row

  def abstract_state(self):
    """The train state as `jax.ShapeDtypeStruct`s with shardings (a restore target)."""
    shapes = jax.eval_shape(functools.partial(_fresh_state, self),
                            jax.random.key(self.spec.seed))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.shardings)


def make_setup(config, *, vocab_size, mesh, rules) -> TrainSetup:
  spec = ModelSpec(config.model, int(vocab_size), int(config.seed))
  graphdef, abstract_model = spec.abstract()
  tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
  param_shardings = sharding.param_shardings(abstract_model, mesh, rules)
  abstract_params = nnx.to_pure_dict(abstract_model)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
  return TrainSetup(spec, graphdef, abstract_model, mesh, tuple(rules), tx, schedule,
                    shardings, dict(config.get("kernels") or {}),
                    int(config.train.get("loss_positions", 0)))


def _fresh_state(setup, key):
  params = nnx.to_pure_dict(nnx.state(setup.spec.build(nnx.Rngs(key))))
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": setup.tx.init(params)}


def init_state(setup: TrainSetup):
  """A fresh train state, initialised directly into its shardings.

  The seed's key is an argument of the jit'd function, not a constant inside it: XLA
  would otherwise constant-fold the random initialisation of every parameter at compile
  time (minutes for a 350M model on a GPU). `nnx.Rngs(key(seed))` draws the same values
  as `nnx.Rngs(seed)`.
  """
  with jax.set_mesh(setup.mesh):
    init = jax.jit(functools.partial(_fresh_state, setup), out_shardings=setup.shardings)
    return init(jax.random.key(setup.spec.seed))


def count_params(abstract_model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(abstract_model)))
