"""Non-finite values and out-of-range ids must not reach what cannot see them.

A NaN or Inf in a query, key or value reaches exactly the outputs that see that token
(the mask's visible pairs; for linear attention, the token's own run from the token on)
and no gradient of an output that does not see it. Segment ids are compared for
equality only: 64-bit ids past the int32 range keep their meaning. A positive log decay
under jit turns into NaN instead of a silently growing state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from tests.utils import fresh_keys, normal

pytestmark = pytest.mark.nonfinite_guard  # on, as users run (tests/conftest.py)

SEGMENTS = np.repeat(np.arange(4), 4)[None]  # [1, 16]: four runs of 4 tokens


def _qkv(batch=1, seq=16, heads=2, dim=8):
  return [normal(k, (batch, seq, heads, dim)) for k in fresh_keys(3)]


def _plant(x, token, head=None):
  return x.at[0, token].set(jnp.nan) if head is None else x.at[0, token, head, 1].set(jnp.inf)


def _softmax(q, k, v, causal, segments, window=None):
  seg = None if segments is None else jnp.asarray(segments)
  return ops.dot_product_attention(q, k, v, is_causal=causal, q_segment_ids=seg,
                                   kv_segment_ids=seg, local_window_size=window,
                                   implementation="xla")


@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("causal, segments, window", [
    (True, None, None), (False, SEGMENTS, None), (True, SEGMENTS, None),
    (True, None, (2, 0))])
def test_softmax_nonfinite_reaches_only_queries_that_see_it(which, causal, segments, window):
  q, k, v = _qkv()
  token = 9
  args = dict(key=k, value=v)
  args[which] = _plant(args[which], token)
  rows = np.arange(16)
  sees = np.ones(16, bool)
  if causal:
    sees &= rows >= token
  if segments is not None:
    sees &= SEGMENTS[0] == SEGMENTS[0, token]
  if window is not None:
    sees &= rows - token <= window[0]
  out = _softmax(q, args["key"], args["value"], causal, segments, window)
  bad = ~np.isfinite(np.asarray(out[0])).all(axis=(1, 2))
  np.testing.assert_array_equal(bad, sees)
  clean = _softmax(q, k, v, causal, segments, window)
  np.testing.assert_array_equal(np.asarray(out[0, ~sees]), np.asarray(clean[0, ~sees]))

  def loss(q, k, v):  # the outputs that do not see the planted token
    return jnp.sum(jnp.where(jnp.asarray(~sees)[None, :, None, None],
                             _softmax(q, k, v, causal, segments, window), 0.0))
  grads = jax.grad(loss, (0, 1, 2))(q, args["key"], args["value"])
  assert all(bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("form", ["none", "scalar", "vector"])
@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_linear_nonfinite_reaches_only_its_run(which, form, chunk_size):
  q, k, v = _qkv()
  log_decay = {"none": None,
               "scalar": -jax.random.uniform(fresh_keys(1)[0], (1, 16, 2)),
               "vector": -jax.random.uniform(fresh_keys(1)[0], (1, 16, 2, 8))}[form]
  token, head = 5, 1
  args = dict(query=q, key=k, value=v)
  args[which] = _plant(args[which], token, head)

  def run(q, k, v):
    return ops.linear_attention(q, k, v, log_decay=log_decay, segment_ids=SEGMENTS,
                                chunk_size=chunk_size, implementation="xla")
  out = run(args["query"], args["key"], args["value"])
  rows = np.arange(16)
  sees = (rows == token) if which == "query" else (
      (rows >= token) & (SEGMENTS[0] == SEGMENTS[0, token]))
  bad = ~np.isfinite(np.asarray(out[0, :, head])).all(axis=1)
  np.testing.assert_array_equal(bad, sees)
  assert np.isfinite(np.asarray(out[0, :, 1 - head])).all()
  clean = run(q, k, v)
  np.testing.assert_allclose(np.asarray(out[0, ~sees]), np.asarray(clean[0, ~sees]),
                             rtol=1e-6, atol=1e-6)

  def loss(q, k, v):
    return jnp.sum(jnp.where(jnp.asarray(~sees)[None, :, None, None], run(q, k, v), 0.0))
  grads = jax.grad(loss, (0, 1, 2))(args["query"], args["key"], args["value"])
  assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_int64_segment_ids_past_int32_stay_distinct():
  q, k, v = _qkv()
  small = np.repeat(np.arange(2), 8)[None]
  wide = np.where(small == 0, 2 ** 33, 2 ** 33 + 1).astype(np.int64)  # equal mod 2**32
  want = _softmax(q, k, v, True, small)
  np.testing.assert_array_equal(np.asarray(_softmax(q, k, v, True, wide)), np.asarray(want))
  linear = lambda ids: ops.linear_attention(q, k, v, segment_ids=ids, implementation="xla")
  np.testing.assert_array_equal(np.asarray(linear(wide)), np.asarray(linear(small)))


def test_positive_log_decay_under_jit_is_nan_not_silent():
  q, k, v = _qkv()
  decay = jnp.asarray([-0.1, 5.0])
  run = jax.jit(lambda g: ops.linear_attention(q, k, v, log_decay=g, implementation="xla"))
  out = run(decay)
  assert np.isnan(np.asarray(out[:, :, 1])).all()
  np.testing.assert_allclose(
      np.asarray(out[:, :, 0]),
      np.asarray(ops.linear_attention(q, k, v, log_decay=decay.at[1].set(-0.1),
                                      implementation="xla")[:, :, 0]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="log_decay must be finite and ≤ 0"):
    ops.linear_attention(q, k, v, log_decay=decay, implementation="xla")


# Through the fused kernels (interpret mode), whose masks multiply by 0 inside a tile:
# the op's guard (`ops.nonfinite_guard`) must give the XLA path's outputs (not its
# gradients: differentiated, the kernels run unguarded, docs/reliability.md). Each case
# plants an Inf in a key of the first run and a NaN in a value of the second, both at
# masked positions of tiles that also hold visible pairs.
SOFTMAX_KERNELS = [("pallas_triton", jnp.float32, 16, 29), ("triton", jnp.float32, 16, 29),
                   ("pallas_mosaic_gpu", jnp.bfloat16, 64, 61)]
LINEAR_KERNELS = [("pallas_triton", jnp.float32, 16, 29, "scalar"),
                  ("triton", jnp.float32, 16, 29, "scalar"),
                  ("pallas_mosaic_gpu", jnp.bfloat16, 64, 61, "scalar"),
                  ("pallas_mosaic_gpu", jnp.bfloat16, 64, 61, "vector")]


def _planted(dtype, dim, seq, heads=2):
  q, k, v = (x.astype(dtype) for x in _qkv(seq=seq, heads=heads, dim=dim))
  half = seq // 2
  segments = jnp.asarray((np.arange(seq) >= half)[None].astype(np.int32))
  bad_k = k.at[0, 3, 0, 1].set(jnp.inf)
  bad_v = v.at[0, half + 5].set(jnp.nan)
  return (q, k, v), (q, bad_k, bad_v), segments


def _check_against_xla(run, implementation, clean, planted, rtol, guarded_gradients=False):
  # Each call traced afresh (the guard is a context variable, not part of jit's key).
  run = lambda *a, run=run, **kw: jax.jit(functools.partial(run, **kw))(*a)
  want = run(*planted, implementation="xla")
  got = run(*planted, implementation=implementation)
  sees = ~np.isfinite(np.asarray(want, np.float32)).all(axis=-1)  # [1, seq, heads]
  assert sees.any() and not sees.all()
  np.testing.assert_array_equal(~np.isfinite(np.asarray(got, np.float32)).all(axis=-1), sees)
  np.testing.assert_allclose(np.asarray(got, np.float32)[~sees],
                             np.asarray(want, np.float32)[~sees], rtol=rtol, atol=rtol)
  with ops.nonfinite_guard(False):  # the case does exercise the kernel's leak
    unguarded = run(*planted, implementation=implementation)
  assert (~np.isfinite(np.asarray(unguarded, np.float32)).all(axis=-1) & ~sees).any()

  # Differentiated, the guard hands over to the kernel's own VJP: the same gradients;
  # with gradients guarded too, the same on finite inputs.
  loss = lambda q, k, v: jnp.sum(run(q, k, v, implementation=implementation)
                                 .astype(jnp.float32) ** 2)
  with ops.nonfinite_guard(False):
    unguarded_grads = jax.grad(loss, (0, 1, 2))(*clean)
  for gradients in (False, True):
    with ops.nonfinite_guard(True, gradients=gradients):
      grads = jax.grad(loss, (0, 1, 2))(*clean)
    for g, u in zip(grads, unguarded_grads):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(u, np.float32))

  # Gradients guarded, a loss of the outputs that do not see a bad row gets XLA's
  # gradients (the unguarded kernel's are not finite); a loss of all outputs, NaN ones.
  # (The guard is the same code around every kernel: checked on one kernel per op, the
  # fastest interpreter, to keep the suite's time.)
  if not guarded_gradients:
    return
  def unseen_loss(q, k, v, implementation):
    out = run(q, k, v, implementation=implementation).astype(jnp.float32)
    return jnp.sum(jnp.where(jnp.asarray(~sees)[..., None], out, 0.0) ** 2)
  want = jax.grad(unseen_loss, (0, 1, 2))(*planted, "xla")
  with ops.nonfinite_guard(True):
    leaked = jax.grad(unseen_loss, (0, 1, 2))(*planted, implementation)
  assert not all(bool(jnp.isfinite(g).all()) for g in leaked)
  with ops.nonfinite_guard(True, gradients=True):
    got = jax.grad(unseen_loss, (0, 1, 2))(*planted, implementation)
    nan = jax.grad(loss, (0, 1, 2))(*planted)
  for g, w in zip(got, want):  # bf16 gradients: relative to the largest
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= rtol * np.abs(w).max()
  assert all(bool(jnp.isnan(g).all()) for g in nan)


@pytest.mark.parametrize("implementation, dtype, dim, seq", SOFTMAX_KERNELS)
def test_softmax_kernels_keep_nonfinite_to_the_queries_that_see_it(
    monkeypatch, implementation, dtype, dim, seq):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  clean, planted, segments = _planted(dtype, dim, seq)

  def run(q, k, v, implementation):
    return ops.dot_product_attention(q, k, v, is_causal=True, q_segment_ids=segments,
                                     kv_segment_ids=segments, implementation=implementation)
  _check_against_xla(run, implementation, clean, planted,
                     rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5,
                     guarded_gradients=implementation == "pallas_triton")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # unguarded
@pytest.mark.parametrize("implementation, dtype, dim, seq, gate", LINEAR_KERNELS)
def test_linear_kernels_keep_nonfinite_to_its_run(monkeypatch, implementation, dtype, dim,
                                                  seq, gate):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  clean, planted, segments = _planted(dtype, dim, seq)
  shape = (1, seq, 2, dim) if gate == "vector" else (1, seq, 2)
  log_decay = -jax.random.uniform(fresh_keys(1)[0], shape)

  def run(q, k, v, implementation):
    return ops.linear_attention(q, k, v, log_decay=log_decay, segment_ids=segments,
                                chunk_size=64 if dim == 64 else 16,
                                implementation=implementation)
  _check_against_xla(run, implementation, clean, planted,
                     rtol=3e-2 if dtype == jnp.bfloat16 else 1e-4,
                     guarded_gradients=implementation == "triton")


@pytest.mark.parametrize("op", ["softmax", "linear"])
def test_kernels_keep_a_bad_query_to_its_own_row(monkeypatch, op):
  # The guard checks keys and values only: a query reaches just its own row in a kernel.
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  q, k, v = _qkv(seq=32, dim=16)
  q = q.at[0, 9, 1, 3].set(jnp.nan)
  if op == "softmax":
    run = lambda impl, q=q: ops.dot_product_attention(q, k, v, is_causal=True,
                                                      implementation=impl)
  else:
    run = lambda impl, q=q: ops.linear_attention(q, k, v, chunk_size=16,
                                                 implementation=impl)
  bad = lambda out: ~np.isfinite(np.asarray(out)).all(axis=-1)
  np.testing.assert_array_equal(bad(run("pallas_triton")), bad(run("xla")))
  assert bad(run("xla")).sum() == 1

  # Gradients guarded, a loss of the other rows gets the gradients of the query with
  # its bad row zeroed (the softmax kernel's backward spreads it through its tile
  # otherwise; the linear one does not).
  if op != "softmax":
    return
  others = jnp.asarray(~bad(run("xla")))[..., None]
  loss = lambda q, impl: jnp.sum(jnp.where(others, run(impl, q), 0.0) ** 2)
  with ops.nonfinite_guard(True, gradients=True):
    got = jax.grad(loss)(q, "pallas_triton")
  want = jax.grad(loss)(jnp.nan_to_num(q, nan=0.0), "xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_nonfinite_guard_rejects_what_it_cannot_do():
  with pytest.raises(ValueError, match="gradients takes True or False"):
    with ops.nonfinite_guard(True, gradients="yes"):
      pass
  with pytest.raises(ValueError, match="needs the guard on"):
    with ops.nonfinite_guard(False, gradients=True):
      pass
