"""Ring attention and linear-attention state passing against unsharded ops.

On 8 virtual CPU devices, the global arrays are sharded along the mesh axis `sequence`
(with `data` splitting the batch); inside `parallel.sequence_parallel()` the ops run as
ring attention / state passing. Outputs and gradients (of a random projection of the
output) must match the unsharded op to float32 round-off: max abs error ≤ 1e-4
(gradients ≤ 2e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from attn_jax import ops, parallel
from tests.utils import fresh_keys, normal

B, T, H, D = 2, 32, 4, 8


def _mesh(sequence):
  return jax.make_mesh((2, sequence), ("data", "sequence"),
                       (jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:2 * sequence])


def _ids():
  return jnp.array([[0] * 10 + [1] * 22, [0] * 8 + [1] * 8 + [2] * 16], jnp.int32)


def _compare(fn, args, sequence=4, check_collective=None):
  """Max abs errors of outputs and gradients, sequence-parallel vs plain."""
  shapes = jax.tree.leaves(jax.eval_shape(fn, *args))
  cotangents = [normal(k, s.shape) for s, k in zip(shapes, fresh_keys(len(shapes)))]
  loss = lambda *a: sum(jnp.sum(o * c) for o, c in zip(jax.tree.leaves(fn(*a)), cotangents))
  ref = jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(*args)

  def sharded(*a):
    with parallel.sequence_parallel("sequence"):
      return fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)

  mesh = _mesh(sequence)
  with jax.set_mesh(mesh):
    placed = [jax.device_put(a, NamedSharding(mesh, P("data", "sequence"))) for a in args]
    lowered = jax.jit(sharded).lower(*placed)
    if check_collective:
      assert check_collective in lowered.as_text()
    got = lowered.compile()(*placed)
  errs = jax.tree.map(lambda x, r: float(jnp.max(jnp.abs(x - r))), got, ref)
  return max(jax.tree.leaves(errs[0])), max(jax.tree.leaves(errs[1]))


def _qkv(kv_heads=2):
  kq, kk, kv = fresh_keys(3)
  return (normal(kq, (B, T, H, D)), normal(kk, (B, T, kv_heads, D)),
          normal(kv, (B, T, kv_heads, D)))


@pytest.mark.parametrize("case", ["causal_segments_sinks_softcap", "noncausal",
                                  "window_segments"])
def test_ring_attention_matches_unsharded(case):
  q, k, v = _qkv()
  ids = _ids()
  kwargs = {
      "causal_segments_sinks_softcap": dict(
          is_causal=True, q_segment_ids=ids, kv_segment_ids=ids, logits_soft_cap=5.0,
          sinks=normal(fresh_keys(1)[0], (H,))),
      "noncausal": dict(),
      "window_segments": dict(is_causal=True, local_window_size=(7, 0), q_segment_ids=ids,
                              kv_segment_ids=ids),
  }[case]
  sequence = 2 if case == "noncausal" else 4
  fn = lambda q, k, v: ops.dot_product_attention(q, k, v, **kwargs)
  out_err, grad_err = _compare(fn, (q, k, v), sequence=sequence,
                               check_collective="collective_permute")
  assert out_err <= 1e-4 and grad_err <= 2e-4, (out_err, grad_err)


def test_ring_attention_refuses_what_it_cannot_shard():
  q, k, v = _qkv()
  mesh = _mesh(4)
  with jax.set_mesh(mesh), parallel.sequence_parallel():
    with pytest.raises(NotImplementedError, match="shard holds 8"):
      jax.jit(lambda q, k, v: ops.dot_product_attention(
          q, k, v, is_causal=True, local_window_size=(12, 0)))(q, k, v)
    with pytest.raises(NotImplementedError, match="causal sliding windows"):
      jax.jit(lambda q, k, v: ops.dot_product_attention(
          q, k, v, local_window_size=(3, 3)))(q, k, v)
    with pytest.raises(NotImplementedError, match="q_seq == kv_seq"):
      jax.jit(lambda q, k, v: ops.dot_product_attention(q, k[:, :16], v[:, :16]))(q, k, v)
    with pytest.raises(ValueError, match="multiple of the 'sequence'"):
      jax.jit(lambda q, k, v: ops.dot_product_attention(q[:, :30], k[:, :30], v[:, :30]))(
          q, k, v)


def _linear_inputs():
  kq, kk, kv, kg = fresh_keys(4)
  q = jax.nn.elu(normal(kq, (B, T, H, D))) + 1
  k = jax.nn.elu(normal(kk, (B, T, H, D))) + 1
  v = normal(kv, (B, T, 2 * H, D))  # two value heads per key head
  return (q, k, v), kg


@pytest.mark.parametrize("case", ["vector_gate_segments", "fixed_decay_normalize_state"])
def test_state_passing_matches_unsharded(case):
  (q, k, v), kg = _linear_inputs()
  ids = _ids()
  kwargs = {
      "vector_gate_segments": dict(log_decay=-jax.nn.softplus(normal(kg, (B, T, 2 * H, D))),
                                   segment_ids=ids),
      "fixed_decay_normalize_state": dict(log_decay=-jnp.linspace(0.05, 1.0, 2 * H),
                                          normalize=True,
                                          initial_state=jnp.ones((B, 2 * H, D, D + 1)),
                                          return_final_state=True),
  }[case]
  fn = lambda q, k, v: ops.linear_attention(q, k, v, chunk_size=4, **kwargs)
  sequence = 4 if case == "vector_gate_segments" else 2
  out_err, grad_err = _compare(fn, (q, k, v), sequence=sequence, check_collective="all_gather")
  assert out_err <= 1e-4 and grad_err <= 2e-4, (out_err, grad_err)


def test_outside_the_context_ops_are_unchanged():
  q, k, v = _qkv()
  mesh = _mesh(4)
  with jax.set_mesh(mesh):
    text = jax.jit(lambda q, k, v: ops.dot_product_attention(q, k, v, is_causal=True)).lower(
        q, k, v).as_text()
  assert "collective_permute" not in text
  np.testing.assert_equal(parallel.active_axis(), None)
