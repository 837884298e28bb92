"""The mesh, the rules table, sharded init, and sharded training equal to one device.

Loss and gradients of a tiny decoder LM (d_model 32, 2 layers, 4 heads, seq 32, batch 8,
packed rows) on 8 virtual CPU devices — data × tensor, fsdp, data × sequence (ring
attention / state passing) and a mixed fsdp × tensor × sequence mesh — must equal the
one-device values: loss to 1e-5 relative, every gradient leaf to 2e-4 RMS-relative.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attn_jax import sharding
from attn_jax.train import state as state_lib, step as step_lib
from experiments.configs import common
from tests.train.tiny import tiny_model
from tests.utils import rel_err

MESHES = {
    "data2_tensor4": {"data": 2, "tensor": 4},
    "fsdp8": {"fsdp": 8},
    "data2_sequence4": {"data": 2, "sequence": 4},
    "fsdp2_tensor2_sequence2": {"fsdp": 2, "tensor": 2, "sequence": 2},
}
MODELS = {
    "softmax": ("softmax",),
    "linear": ("linear",),
    "hybrid": ("lightning", "softmax"),
}
# Every mesh for the hybrid (its softmax layer rings, its lightning layer passes states);
# the pure models on the meshes that treat their mixer specially.
CASES = [("hybrid", mesh) for mesh in MESHES] + [
    ("softmax", "data2_tensor4"), ("linear", "data2_sequence4")]
BATCH, SEQ, VOCAB = 8, 32, 64


def test_mesh_shape_fills_one_axis_and_checks_the_product():
  assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == {
      "data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
  with pytest.raises(ValueError, match="there are 8"):
    sharding.mesh_shape({"data": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 8}, 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_logical_spec_drops_axes_that_do_not_fit():
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  P = jax.sharding.PartitionSpec
  assert sharding.logical_spec(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == P(
      None, "tensor", None)
  # One kv head cannot be split four ways; tensor is used once per array.
  assert sharding.logical_spec(("embed", "kv_heads", "head_dim"), (32, 1, 8), mesh) == P(
      None, None, None)
  assert sharding.logical_spec(("heads", "mlp"), (4, 64), mesh) == P("tensor", None)
  assert sharding.logical_spec(("batch", "seq"), (8, 32), mesh) == P("data", None)
  rules = sharding.rules_from_config([("embed", "data")])
  assert sharding.logical_spec(("embed",), (32,), mesh, rules) == P("data")


def _config(mixers):
  config = ml_collections.ConfigDict({
      "seed": 0, "model": tiny_model(mixers),
      "optimizer": common.base_config().optimizer, "train": {"num_steps": 10}})
  return config


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
  segment_ids = np.ones((BATCH, SEQ), np.int32)
  segment_ids[:, 13:] = 2  # packed rows: the second document starts inside a shard
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": (rng.random((BATCH, SEQ)) < 0.7).astype(np.float32),
          "segment_ids": segment_ids}


def _make_loss_and_grad(setup, batch_shapes):
  """`(params, batch) -> (loss, grads)`, jit'd with the setup's shardings; the loss is the
  train step's (`step_lib.model_metrics`, masked mean)."""
  in_batch = step_lib.batch_shardings(setup.mesh, batch_shapes, setup.rules)

  def loss_fn(params, batch):
    sums = step_lib.model_metrics(setup.graphdef, params, batch)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)

  param_shardings = setup.shardings["params"]
  jitted = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(param_shardings, in_batch),
                   out_shardings=(sharding.replicated(setup.mesh), param_shardings))
  return step_lib._in_context(jitted, setup)


def _loss_and_grads(mixers, mesh_config, params=None):
  """Loss and gradients on `mesh_config` (fresh parameters, or `params` resharded)."""
  devices = jax.devices() if mesh_config else jax.devices()[:1]
  mesh = sharding.make_mesh(mesh_config, devices)
  setup = state_lib.make_setup(_config(mixers), vocab_size=VOCAB, mesh=mesh,
                               rules=sharding.RULES)
  if params is None:
    params = state_lib.init_state(setup)["params"]
  params = jax.device_put(params, setup.shardings["params"])
  batch = _batch()
  fn = _make_loss_and_grad(setup, {k: v.shape for k, v in batch.items()})
  loss, grads = fn(params, batch)
  return params, float(loss), grads


_REFERENCE = {}


def _reference(model):
  if model not in _REFERENCE:
    _REFERENCE[model] = _loss_and_grads(MODELS[model], {})
  return _REFERENCE[model]


@pytest.mark.parametrize("model,mesh", CASES)
def test_sharded_loss_and_grads_equal_one_device(model, mesh):
  ref_params, ref_loss, ref_grads = _reference(model)
  _, loss, grads = _loss_and_grads(MODELS[model], MESHES[mesh], ref_params)
  assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
  errs = jax.tree.map(rel_err, grads, ref_grads)
  worst = max(jax.tree.leaves(errs))
  assert worst <= 2e-4, {k: v for k, v in jax.tree_util.tree_leaves_with_path(errs)
                         if v > 2e-4}


def test_init_is_sharded_and_equals_one_device():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  setup = state_lib.make_setup(_config(("softmax",)), vocab_size=VOCAB, mesh=mesh,
                               rules=sharding.RULES)
  state = state_lib.init_state(setup)
  one = sharding.make_mesh({}, jax.devices()[:1])
  reference = state_lib.init_state(state_lib.make_setup(
      _config(("softmax",)), vocab_size=VOCAB, mesh=one, rules=sharding.RULES))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state["params"], reference["params"])
  query = state["params"]["blocks"][0]["mixer"]["query"]["kernel"]  # [embed, heads, hd]
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert query.addressable_shards[0].data.shape == (32 // 4, 4 // 2, 8)
  mu = state["opt_state"][1][0].mu["blocks"][0]["mixer"]["query"]["kernel"]
  assert mu.sharding == query.sharding
  embedding = state["params"]["embed"]["embedding"]  # [vocab, embed]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
