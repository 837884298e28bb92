"""Shared by the flash-attention kernel tests: random inputs, the kernel's output, log-sum-exp
and gradients beside the XLA reference's, and the comparison."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import xla
from pallas_kernels.flash_attention.mask import AttentionMask
from tests.utils import fresh_keys, normal, rel_err

# Interpret mode is a jit of loops over the grid and the key/query blocks; compiling it takes
# most of each test's time, and LLVM's optimisation level 0 halves that.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def jit_quick(f, *args):
  """f(*args) through jit, compiled for speed of compilation."""
  return jax.jit(f).lower(*args).compile(compiler_options=QUICK_COMPILE)(*args)


def inputs(batch, q_len, kv_len, q_heads, kv_heads, dim, v_dim, options, dtype=jnp.float32):
  kq, kk, kv, kseg, kseg2, ksink, kdo, kdl = fresh_keys(8)
  q = normal(kq, (batch, q_len, q_heads, dim), dtype)
  k = normal(kk, (batch, kv_len, kv_heads, dim), dtype)
  v = normal(kv, (batch, kv_len, kv_heads, v_dim), dtype)
  seg = None
  if options.get("segments"):  # Packed sequences: sorted ids, different cuts for q and kv.
    seg = (jnp.sort(jax.random.randint(kseg, (batch, q_len), 0, 3), -1).astype(jnp.int32),
           jnp.sort(jax.random.randint(kseg2, (batch, kv_len), 0, 3), -1).astype(jnp.int32))
  sinks = normal(ksink, (q_heads,)) if options.get("sinks") else None
  d_out = normal(kdo, (batch, q_len, q_heads, v_dim), dtype)
  d_lse = normal(kdl, (batch, q_heads, q_len))
  return q, k, v, seg, sinks, d_out, d_lse


def value_and_grads(fn, q, k, v, sinks, d_out, d_lse):
  """out, lse and the vjp (dq, dk, dv, dsinks) of fn(q, k, v, sinks) -> (out, lse)."""
  def run(q, k, v, sinks):
    (out, lse), vjp = jax.vjp(fn, q, k, v, sinks)
    return out, lse, vjp((d_out.astype(out.dtype), d_lse))
  return jit_quick(run, q, k, v, sinks)


def kernel_and_reference(flash_attention, shape, options, dtype, interpret=True,
                         **kernel_kwargs):
  """(out, lse, grads) of `flash_attention` (a kernel module's, in interpret mode unless
  told) and of the float32 XLA reference on the same random inputs."""
  q, k, v, seg, sinks, d_out, d_lse = inputs(*shape, options, dtype)
  q_seg, kv_seg = seg or (None, None)
  scale = 0.8 * q.shape[-1] ** -0.5
  cap = options.get("softcap")
  mask = AttentionMask.create(q.shape[1], k.shape[1], is_causal=options.get("is_causal", False),
                              local_window_size=options.get("window"),
                              has_segments=seg is not None)
  common = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, mask=mask, scale=scale,
                logits_soft_cap=cap, return_residuals=True)

  def kernel(q, k, v, sinks):
    return flash_attention(q, k, v, sinks=sinks, interpret=interpret, **common,
                           **kernel_kwargs)

  def reference(q, k, v, sinks):  # In float32 whatever the inputs' dtype.
    f32 = lambda x: x.astype(jnp.float32)
    return xla.flash_attention(f32(q), f32(k), f32(v), sinks=sinks, **common)

  got = value_and_grads(kernel, q, k, v, sinks, d_out, d_lse)
  # Full f32 products: XLA's default on a GPU is TF32 (relative error ~4e-4).
  with jax.default_matmul_precision("highest"):
    want = value_and_grads(reference, q, k, v, sinks, d_out.astype(jnp.float32), d_lse)
  return got, want


# dsinks is one number per head, a sum over every query row whose terms partly cancel:
# in bf16 its relative error has a heavy tail (0.0005-0.009 over six draws of the head
# dim 256 MQA case, where dq, dk, dv stay at 0.0025-0.0030). A wrong sink gradient is off
# by O(1), so 3x the tolerance still catches one.
DSINKS_SLACK = {"dsinks": 3}


def check(got, want, tol):
  """Relative errors below tol; rows that see no key exactly as the reference."""
  (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, want
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  assert rel_err(out, ref_out) < tol
  empty = np.all(np.asarray(ref_out) == 0, axis=-1)  # Rows that see no key: exactly zero.
  assert np.all(np.asarray(out)[empty] == 0)
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_array_equal(np.asarray(lse)[~finite], np.asarray(ref_lse)[~finite])
  assert rel_err(np.asarray(lse)[finite], np.asarray(ref_lse)[finite]) < tol
  for name, g, w in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
    assert (g is None) == (w is None), name
    if g is not None:
      assert g.shape == w.shape, name
      assert rel_err(g, w) < tol * DSINKS_SLACK.get(name, 1), (name, rel_err(g, w))
