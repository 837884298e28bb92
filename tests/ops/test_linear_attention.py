"""`ops.linear_attention` (chunked) against the token-by-token recurrence, and its step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from attn_jax.ops.linear_attention import _resets
from pallas_kernels.linear_attention.reference import linear_attention_reference
from tests.utils import fresh_keys, normal, rel_err

FORMS = ("none", "fixed", "scalar", "vector")


def _log_decay(form, key, batch, seq, heads, key_dim, strength=1.0):
  shape = {"none": None, "fixed": (heads,), "scalar": (batch, seq, heads),
           "vector": (batch, seq, heads, key_dim)}[form]
  return None if shape is None else -strength * jax.random.uniform(key, shape)


def _per_token(log_decay, batch, seq, heads):
  if log_decay is None:
    return jnp.zeros((batch, seq, heads))
  if log_decay.ndim == 1:
    return jnp.broadcast_to(log_decay, (batch, seq, heads))
  return log_decay


def _segments(key, batch, seq):
  """Sorted random ids: contiguous segments of random lengths."""
  return jnp.sort(jax.random.randint(key, (batch, seq), 0, 4), axis=-1)


def _case(batch, seq, heads, value_heads, key_dim, value_dim, form, strength=1.0,
          dtype=jnp.float32):
  kq, kk, kv, kd, ks, kseg = fresh_keys(6)
  q = normal(kq, (batch, seq, heads, key_dim), dtype)
  k = normal(kk, (batch, seq, heads, key_dim), dtype)
  v = normal(kv, (batch, seq, value_heads, value_dim), dtype)
  decay = _log_decay(form, kd, batch, seq, value_heads, key_dim, strength)
  s0 = normal(ks, (batch, value_heads, key_dim, value_dim))
  return q, k, v, decay, s0, _segments(kseg, batch, seq)


def _reference(q, k, v, decay, s0, segment_ids, scale=None):
  batch, seq, heads, key_dim = k.shape
  value_heads = v.shape[2]
  r = value_heads // heads
  q, k = jnp.repeat(q, r, 2), jnp.repeat(k, r, 2)
  return linear_attention_reference(
      q, k, v, log_decay=_per_token(decay, batch, seq, value_heads),
      scale=key_dim ** -0.5 if scale is None else scale, initial_state=s0,
      resets=_resets(segment_ids, batch, seq))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 8, 6), (1, 50, 1, 2, 16, 8)],
                         ids=lambda s: "B{}-T{}-H{}-Hv{}-K{}-V{}".format(*s))
@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
def test_chunked_matches_recurrence(form, shape, packed):
  q, k, v, decay, s0, seg = _case(*shape, form)
  seg = seg if packed else None
  out, final = ops.linear_attention(q, k, v, log_decay=decay, initial_state=s0,
                                    segment_ids=seg, return_final_state=True, chunk_size=16)
  ref_out, ref_final = _reference(q, k, v, decay, s0, seg)
  assert out.shape == ref_out.shape and final.dtype == jnp.float32
  assert rel_err(out, ref_out) < 1e-5
  assert rel_err(final, ref_final) < 1e-5


@pytest.mark.parametrize("form", ["fixed", "scalar", "vector"])
def test_gradients_match_recurrence(form):
  q, k, v, decay, s0, seg = _case(2, 29, 2, 4, 8, 4, form)
  cot_out, cot_state = (normal(key, shape) for key, shape in zip(
      fresh_keys(2), (v.shape, s0.shape)))

  def loss(fn):
    return lambda *a: (jnp.sum(fn(*a)[0] * cot_out) + jnp.sum(fn(*a)[1] * cot_state))

  ours = lambda q, k, v, d, s: ops.linear_attention(
      q, k, v, log_decay=d, initial_state=s, segment_ids=seg, return_final_state=True,
      chunk_size=8)
  ref = lambda q, k, v, d, s: _reference(q, k, v, d, s, seg)
  got = jax.jit(jax.grad(loss(ours), argnums=range(5)))(q, k, v, decay, s0)
  want = jax.jit(jax.grad(loss(ref), argnums=range(5)))(q, k, v, decay, s0)
  for name, g, w in zip(("q", "k", "v", "log_decay", "initial_state"), got, want):
    assert rel_err(g, w) < 1e-4, name


@pytest.mark.parametrize("form", ["scalar", "vector"])
def test_strong_decay_is_stable(form):
  # 4096 tokens at log_decay down to -5 per token: cumulative sums reach -20,000 nats.
  q, k, v, decay, s0, _ = _case(1, 4096, 1, 1, 16, 8, form, strength=5.0)
  out, final = ops.linear_attention(q, k, v, log_decay=decay, initial_state=s0,
                                    return_final_state=True)
  ref_out, ref_final = _reference(q, k, v, decay, s0, None)
  assert np.isfinite(np.asarray(out)).all()
  assert rel_err(out, ref_out) < 1e-5 and rel_err(final, ref_final) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_step_by_step_equals_sequence(form):
  q, k, v, decay, s0, _ = _case(2, 12, 2, 4, 8, 8, form)
  out, final = ops.linear_attention(q, k, v, log_decay=decay, initial_state=s0,
                                    return_final_state=True, chunk_size=4)
  state, outs = s0, []
  for t in range(q.shape[1]):
    step_decay = decay if decay is None or decay.ndim == 1 else decay[:, t]
    o, state = ops.linear_attention_step(state, q[:, t], k[:, t], v[:, t],
                                         log_decay=step_decay)
    outs.append(o)
  assert rel_err(jnp.stack(outs, 1), out) < 1e-5
  assert rel_err(state, final) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_normalized_step_by_step_equals_sequence(form):
  q, k, v, decay, s0, _ = _case(2, 12, 2, 4, 8, 6, form)
  q, k = ops.feature_maps.elu_plus_one(q), ops.feature_maps.elu_plus_one(k)
  # A positive state with its key-sum column keeps the denominators away from zero.
  s0 = jnp.abs(jnp.concatenate([s0, s0[..., :1]], axis=-1))
  out, final = ops.linear_attention(q, k, v, log_decay=decay, initial_state=s0,
                                    normalize=True, return_final_state=True, chunk_size=4)
  state, outs = s0, []
  for t in range(q.shape[1]):
    step_decay = decay if decay is None or decay.ndim == 1 else decay[:, t]
    o, state = ops.linear_attention_step(state, q[:, t], k[:, t], v[:, t],
                                         log_decay=step_decay, normalize=True)
    outs.append(o)
  assert outs[0].shape == (2, 4, 6) and state.shape == (2, 4, 8, 7)
  assert rel_err(jnp.stack(outs, 1), out) < 1e-5
  assert rel_err(state, final) < 1e-5


def test_chunk_size_does_not_change_the_result():
  q, k, v, decay, s0, seg = _case(1, 45, 2, 2, 8, 8, "vector")
  run = jax.jit(functools.partial(ops.linear_attention, log_decay=decay, segment_ids=seg),
                static_argnames="chunk_size")
  outs = [run(q, k, v, chunk_size=c) for c in (1, 7, 16, 64)]
  for out in outs[1:]:
    assert rel_err(out, outs[0]) < 1e-5


def test_normalize_divides_by_key_sum():
  q, k, v, _, _, seg = _case(2, 21, 2, 2, 8, 4, "none")
  q, k = ops.feature_maps.elu_plus_one(q), ops.feature_maps.elu_plus_one(k)
  out, final = ops.linear_attention(q, k, v, normalize=True, segment_ids=seg,
                                    return_final_state=True, chunk_size=8)
  num, _ = _reference(q, k, v, None, jnp.zeros(final.shape[:-1] + (4,)), seg)
  den, _ = _reference(q, k, jnp.ones_like(v[..., :1]), None,
                      jnp.zeros(final.shape[:-1] + (1,)), seg)
  assert final.shape == (2, 2, 8, 5)
  assert rel_err(out, num / (den + 1e-6)) < 1e-5


def test_non_causal_sees_the_whole_segment():
  q, k, v, _, s0, seg = _case(2, 19, 1, 2, 8, 4, "none")
  out = ops.linear_attention(q, k, v, is_causal=False, segment_ids=seg)
  qr, kr = jnp.repeat(q, 2, 2), jnp.repeat(k, 2, 2)
  same = (seg[:, :, None] == seg[:, None, :]).astype(jnp.float32)
  want = jnp.einsum("bihk,bjhk,bij,bjhv->bihv", qr, kr, same, v) * 8 ** -0.5
  assert rel_err(out, want) < 1e-5
  out0 = ops.linear_attention(q, k, v, is_causal=False, initial_state=s0)
  want0 = jnp.einsum("bihk,bhkv->bihv", qr, s0 + jnp.einsum("bjhk,bjhv->bhkv", kr, v))
  assert rel_err(out0, want0 * 8 ** -0.5) < 1e-5


def test_non_causal_cross_attention_reads_the_whole_context():
  q, _, _, _, _, _ = _case(2, 5, 1, 2, 8, 4, "none")
  _, k, v, _, _, _ = _case(2, 13, 1, 2, 8, 4, "none")
  k = ops.feature_maps.elu_plus_one(k)
  q = ops.feature_maps.elu_plus_one(q)
  out = ops.linear_attention(q, k, v, is_causal=False, normalize=True)
  qr, kr = jnp.repeat(q, 2, 2), jnp.repeat(k, 2, 2)
  weights = jnp.einsum("bihk,bjhk->bhij", qr, kr)
  want = jnp.einsum("bhij,bjhv->bihv", weights / (weights.sum(-1, keepdims=True)
                                                   + 1e-6 / 8 ** -0.5), v)
  assert out.shape == (2, 5, 2, 4) and rel_err(out, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
  q, k, v, decay, s0, _ = _case(1, 40, 2, 2, 16, 16, "scalar", dtype=dtype)
  out = ops.linear_attention(q, k, v, log_decay=decay)
  ref, _ = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), decay, s0 * 0, None)
  assert out.dtype == dtype and rel_err(out, ref) < 2e-2


def test_jit_traces_with_traced_decay():
  q, k, v, decay, _, _ = _case(1, 10, 1, 1, 4, 4, "scalar")
  f = jax.jit(lambda *a: ops.linear_attention(*a[:3], log_decay=a[3]))
  assert rel_err(f(q, k, v, decay), ops.linear_attention(q, k, v, log_decay=decay)) < 1e-6


def _bad(**overrides):
  q, k, v, _, _, _ = _case(1, 8, 2, 2, 4, 4, "none")
  args = dict(query=q, key=k, value=v) | overrides
  return lambda: ops.linear_attention(**args)


@pytest.mark.parametrize("call, match", [
    (_bad(log_decay=jnp.full((2,), 0.5)), "≤ 0"),
    (_bad(log_decay=jnp.zeros((3,))), "fits no decay form"),
    (_bad(log_decay=jnp.zeros((1, 8, 2)), is_causal=False), "is_causal=False"),
    (_bad(initial_state=jnp.zeros((1, 2, 4, 5))), "initial_state must have shape"),
    (_bad(segment_ids=jnp.zeros((1, 7), int)), "segment_ids"),
    (_bad(chunk_size=0), "chunk_size"),
    (_bad(value=jnp.zeros((1, 8, 3, 4))), "multiple of the key heads"),
    (_bad(key=jnp.zeros((1, 8, 2, 4), jnp.bfloat16)), "one dtype"),
    (_bad(query=jnp.zeros((8, 2, 4))), "rank 4"),
    (_bad(query=jnp.zeros((1, 5, 2, 4))), "need is_causal=False"),
    (_bad(query=jnp.zeros((1, 5, 2, 4)), is_causal=False,
          segment_ids=jnp.zeros((1, 8), int)), "no segment_ids"),
    (_bad(query=jnp.zeros((1, 5, 2, 8)), is_causal=False), "same shape but for seq"),
    (_bad(implementation="pallas_triton_fast"), "unknown"),
])
def test_bad_arguments_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_step_rejects_bad_state():
  q = jnp.zeros((1, 2, 4))
  with pytest.raises(ValueError, match="state must have shape"):
    ops.linear_attention_step(jnp.zeros((1, 2, 4, 3)), q, q, q)
  with pytest.raises(ValueError, match="normalize=True adds the normaliser column"):
    ops.linear_attention_step(jnp.zeros((1, 2, 4, 4)), q, q, q, normalize=True)


@pytest.mark.parametrize("args, match", [
    (((1, 2, 4), (1, 2, 4), (1, 3, 4)), "multiple of the key heads"),
    (((1, 2, 4), (1, 2, 8), (1, 2, 4)), r"the same shape\)"),
    (((1, 1, 2, 4), (1, 2, 4), (1, 2, 4)), r"query must be \[batch, heads, dim\]"),
])
def test_step_rejects_bad_arguments(args, match):
  q, k, v = (jnp.zeros(shape) for shape in args)
  with pytest.raises(ValueError, match=match):
    ops.linear_attention_step(jnp.zeros((1, 2, 4, 4)), q, k, v)
