"""The device mesh, the one table of sharding rules, and what is sharded by it.

Parameters and activations carry logical axis names; `RULES` maps each name onto mesh
axes. The mesh has four axes (any of size 1):

  data      pure data parallelism: batch split, parameters replicated;
  fsdp      batch split and parameters/optimizer state split along `embed` (ZeRO-3 style:
            XLA gathers a weight just before its use and scatters its gradient);
  tensor    Megatron-style model parallelism: heads, MLP hidden units and vocabulary;
  sequence  context parallelism: activations split along the sequence; attention runs as
            ring attention and linear attention passes states (`attn_jax.parallel`).

Changing the parallelism is changing `config.mesh` and, rarely, the rules; model code
never names a mesh axis. A dimension that a mapped mesh axis does not divide is left
unsplit (e.g. one key/value head under `tensor=2`), and a mesh axis is used at most once
per array.

Parameter names (from the layers): embed, heads, kv_heads, head_dim, mlp, vocab, q_lora,
kv_lora. Activation names (from the models): batch, seq, act_embed, act_heads, act_mlp,
act_vocab — the feature axis of activations is named apart from the parameters' `embed`,
because under fsdp the weights split along it while activations do not.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

RULES = (
    # Parameters.
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    # Activations.
    ("batch", ("data", "fsdp")),
    ("seq", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_RULES = contextvars.ContextVar("attn_jax_sharding_rules", default=RULES)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Sizes of the four mesh axes; one axis may be -1 (whatever the others leave).

  Raises:
    ValueError: for an unknown axis, or sizes whose product is not `num_devices`.
  """
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; the axes are "
                     f"{MESH_AXES}.")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
    raise ValueError(f"config.mesh sizes must be positive, with at most one -1; got "
                     f"{sizes}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh {sizes}: the fixed axes ({fixed} devices) do not "
                       f"divide the {num_devices} devices.")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh {sizes} has {math.prod(sizes.values())} devices; there "
                     f"are {num_devices} (jax.device_count()).")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence | None = None):
  """A `jax.sharding.Mesh` with axes (data, fsdp, tensor, sequence), all Auto.

  Over several processes the mesh spans every process's devices (`jax.devices()`);
  `jax.make_mesh` orders them so that the inner axes (tensor, sequence) stay within a
  host's fast interconnect and `data` is the outermost axis.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       (jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(overrides=()) -> tuple:
  """`RULES` with `(name, mesh axes)` overrides (e.g. from `config.sharding_rules`)."""
  table = dict(RULES)
  for name, axes in overrides:
    table[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(table.items())


@contextlib.contextmanager
def use_rules(rules):
  """Sets the rules table that `constrain` and `logical_spec` read."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules():
  return _RULES.get()


def logical_spec(names, shape, mesh, rules=None) -> P:
  """The PartitionSpec of an array with logical axis `names` on `mesh`.

  Each name maps to mesh axes by the rules; axes missing from the mesh, of size 1,
  already used by an earlier dimension, or not dividing the dimension are dropped.
  """
  table = dict(current_rules() if rules is None else rules)
  used, spec = set(), []
  for name, size in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for axis in axes:
      if axis in used or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        continue
      if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def constrain(x, names):
  """`x` constrained to the sharding of its logical axis `names` under the current mesh.

  A no-op when no mesh is set (`jax.set_mesh`), so models run unchanged on one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def sequence_axis():
  """The mesh axis the `seq` activations are split along, when it has size > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = dict(current_rules()).get("seq")
  if isinstance(axes, str) and axes in mesh.axis_names and mesh.shape[axes] > 1:
    return axes
  return None


def variable_names(variable) -> tuple:
  """The logical axis names a layer gave a parameter (None for each axis when none)."""
  names = variable.get_metadata().get("out_sharding")
  shape = np.shape(variable.get_value())
  return tuple(names) if names else (None,) * len(shape)


def param_shardings(abstract_state, mesh, rules=None):
  """NamedShardings for a model's parameters, as a pure dict like `nnx.to_pure_dict`."""
  def sharding(v):
    return v.replace(NamedSharding(mesh, logical_spec(variable_names(v),
                                                      v.get_value().shape, mesh, rules)))
  tree = jax.tree.map(sharding, abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, shape, rules=None):
  """Sharding of an input array `[batch, seq, ...]` of `shape`."""
  names = ("batch", "seq") + (None,) * (len(shape) - 2)
  return NamedSharding(mesh, logical_spec(names[:len(shape)], shape, mesh, rules))


def local_batch_rows(sharding, global_shape):
  """Rows `[start, stop)` of a global batch this process's devices hold.

  The data pipeline reads these rows for this process (`process_index = start // rows`,
  `process_count = global_batch // rows`); where a row block is shared by several
  processes (e.g. `sequence` or `tensor` spanning hosts) they read the same rows.

  Raises:
    ValueError: when this process's rows are not one contiguous block.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    start, stop, _ = index[0].indices(global_shape[0])
    rows.add((start, stop))
  start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
  covered = sum(r[1] - r[0] for r in rows)
  if covered != stop - start or global_shape[0] % (stop - start):
    raise ValueError(f"this process holds batch rows {sorted(rows)} of "
                     f"{global_shape[0]}: not one contiguous block; reorder the mesh so "
                     "that 'data'/'fsdp' are the outer axes.")
  return start, stop


def make_global_array(local_rows, sharding, global_shape, row_start):
  """A global `jax.Array` from the rows this process read (`local_batch_rows`)."""
  local_rows = np.asarray(local_rows)

  def shard(index):
    rows = index[0]
    start, stop, _ = rows.indices(global_shape[0])
    return local_rows[(slice(start - row_start, stop - row_start),) + tuple(index[1:])]

  return jax.make_array_from_callback(tuple(global_shape), sharding, shard)
