"""Sequence (context) parallelism for any model, switched on by a context manager.

Models run under `jax.jit` on global arrays whose sequence axis is sharded along the mesh
axis `sequence` (the sharding rules do that). Everything position-wise (projections,
MLPs, norms, RoPE with global positions, short convolutions) is then partitioned by
XLA's SPMD partitioner. The two ops that mix across the whole sequence would be gathered
onto every device; inside `sequence_parallel()` they run sequence-parallel instead:

  - `ops.dot_product_attention` → ring attention (`ring_attention.py`),
  - causal `ops.linear_attention` → state passing (`state_passing.py`).

The switch is a hook in the ops' dispatcher (`attn_jax.ops.dispatch.add_hook`), below
every layer, so no mixer needs to know about it: each call made while the context is active and
a mesh with that axis is set (`jax.set_mesh`) is wrapped in a `shard_map` over the axis,
and the blocks run whichever implementation the dispatcher picks. Non-causal linear
attention without segments is a plain sum over the sequence and stays with XLA.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import PartitionSpec as P

from attn_jax.ops import dispatch
from attn_jax.parallel.ring_attention import ring_attention
from attn_jax.parallel.state_passing import state_passing_linear_attention

_AXIS = contextvars.ContextVar("attn_jax_sequence_axis", default=None)


@contextlib.contextmanager
def sequence_parallel(axis_name="sequence"):
  """Within this context, attention ops shard their sequence over mesh axis `axis_name`.

  Takes effect for calls traced while a mesh with an axis `axis_name` of size > 1 is set
  (`jax.set_mesh`); otherwise the ops run as usual. Sequence lengths must divide evenly
  by the axis size (a ValueError says so).
  """
  dispatch.add_hook(_sequence_parallel_hook)
  token = _AXIS.set(axis_name)
  try:
    yield
  finally:
    _AXIS.reset(token)


def active_axis():
  """The mesh axis the sequence is split along in the current context, or None."""
  axis = _AXIS.get()
  if axis is None:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1:
    return None
  return axis


@contextlib.contextmanager
def _suspended():
  token = _AXIS.set(None)
  try:
    yield
  finally:
    _AXIS.reset(token)


def _attention(run, axis, implementation, query, key, value, q_segment_ids,
               kv_segment_ids, sinks, *, mask, scale, logits_soft_cap, return_residuals,
               dropout_rate=0.0, dropout_rng=None):
  del run, dropout_rng  # each block calls the public op, which dispatches itself
  if dropout_rate:
    raise NotImplementedError(
        f"dropout_rate={dropout_rate}: ring attention over the '{axis}' mesh axis has no "
        "attention dropout. Train without a sequence axis, or without dropout.")
  if mask.q_len != mask.kv_len:
    raise NotImplementedError(
        f"sequence-parallel attention needs self-attention (q_seq == kv_seq); got "
        f"q_seq={mask.q_len}, kv_seq={mask.kv_len}. Run cross attention without a "
        f"'{axis}' mesh axis.")
  _check_divisible(axis, mask.q_len)
  # Causality is folded into mask.right: (left, right) says it all.
  kwargs = dict(axis_name=axis, scale=scale, local_window_size=(mask.left, mask.right),
                logits_soft_cap=logits_soft_cap,
                return_residuals=return_residuals, implementation=implementation)
  seq = P(None, axis)
  arrays = {"query": query, "key": key, "value": value, "q_segment_ids": q_segment_ids,
            "kv_segment_ids": kv_segment_ids, "sinks": sinks}
  arrays = {name: x for name, x in arrays.items() if x is not None}
  specs = {name: (P() if name == "sinks" else seq) for name in arrays}
  out_specs = (seq, P(None, None, axis)) if return_residuals else seq

  def body(arrays):
    with _suspended():
      return ring_attention(**arrays, **kwargs)

  return jax.shard_map(body, in_specs=(specs,), out_specs=out_specs,
                       axis_names={axis})(arrays)


def _linear_attention(run, axis, implementation, query, key, value, log_decay,
                      initial_state, resets, *, scale, chunk_size):
  _check_divisible(axis, key.shape[1])
  seq = P(None, axis)
  arrays = {"query": query, "key": key, "value": value, "log_decay": log_decay,
            "initial_state": initial_state, "resets": resets}
  specs = {name: seq for name in arrays}
  specs["initial_state"] = P()
  if log_decay is None:
    del arrays["log_decay"], specs["log_decay"]
  elif log_decay.ndim == 1:
    specs["log_decay"] = P()

  def local_fn(*args):
    return run(*args, scale=scale, chunk_size=chunk_size)

  def body(arrays):
    with _suspended():
      return state_passing_linear_attention(
          local_fn, arrays["query"], arrays["key"], arrays["value"],
          arrays.get("log_decay"), arrays["initial_state"], arrays["resets"],
          axis_name=axis, scale=scale)

  return jax.shard_map(body, in_specs=(specs,), out_specs=(seq, P()),
                       axis_names={axis})(arrays)


def _check_divisible(axis, length):
  size = jax.sharding.get_abstract_mesh().shape[axis]
  if length % size:
    raise ValueError(f"sequence length {length} must be a multiple of the '{axis}' mesh "
                     f"axis size {size} for sequence parallelism.")


_SEQUENCE_PARALLEL = {"dot_product_attention": _attention,
                      "linear_attention": _linear_attention}


def _sequence_parallel_hook(op_name, run, implementation, *args, **kwargs):
  axis = active_axis()
  wrapped = _SEQUENCE_PARALLEL.get(op_name)
  if axis is None or wrapped is None:
    return NotImplemented
  return wrapped(run, axis, implementation, *args, **kwargs)
