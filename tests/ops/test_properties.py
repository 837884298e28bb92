"""Property tests (hypothesis) of both ops: random shapes (odd lengths, length 1, GQA and
grouped value heads), random masks and segment layouts (single-token segments included),
random decay forms, and a NaN or Inf planted in one token.

Checked against independent references (`numpy_attention`, float64; the linear
recurrence): every output and gradient of a query that does not see the planted token
equals the clean computation's and is finite; one that sees it is not finite. The XLA
paths carry this guarantee; the kernels are checked on clean inputs in interpret mode
(docs/reliability.md says what they guarantee).
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from attn_jax import ops
from pallas_kernels.linear_attention.reference import linear_attention_reference
from tests.ops.test_attention import numpy_attention
from tests.ops.test_linear_attention import _per_token
from tests.utils import rel_err

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _segment_ids(draw, batch, seq):
  """Contiguous segments of random lengths (1 token included), ids not in order."""
  rows = []
  for _ in range(batch):
    cuts = sorted(draw(st.sets(st.integers(1, max(1, seq - 1)), max_size=4)))
    ids = np.zeros(seq, np.int64)
    for n, cut in enumerate(cuts):
      ids[cut:] = draw(st.integers(-3, 2 ** 40)) if n % 2 else n + 1
    rows.append(ids)
  return np.stack(rows)


@st.composite
def softmax_cases(draw):
  batch, kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(
      st.integers(1, 2))
  q_len = draw(st.integers(1, 12))
  causal = draw(st.booleans())
  segments = draw(st.booleans())
  kv_len = q_len if (causal or segments) else draw(st.integers(1, 12))
  window = draw(st.one_of(st.none(), st.tuples(st.integers(0, 4), st.integers(0, 4))))
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.default_rng(seed)
  dim = draw(st.sampled_from([4, 8]))
  q = rng.standard_normal((batch, q_len, kv_heads * groups, dim)).astype(np.float32)
  k = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
  v = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
  ids = _segment_ids(draw, batch, q_len) if segments else None
  planted = (draw(st.sampled_from(["key", "value"])), draw(st.integers(0, kv_len - 1)),
             draw(st.sampled_from([np.nan, np.inf, -np.inf])))
  return q, k, v, dict(is_causal=causal, local_window_size=window, q_segment_ids=ids,
                       kv_segment_ids=ids), planted


def _sees(kwargs, q_len, kv_len, ids, token):
  """[batch, q_len] bool: query i sees key `token` (positions aligned at the end)."""
  rows = np.arange(q_len)[:, None] + kv_len - q_len
  d = token - rows
  sees = np.ones((q_len, 1), bool)
  if kwargs["is_causal"]:
    sees &= d <= 0
  if kwargs["local_window_size"] is not None:
    left, right = kwargs["local_window_size"]
    sees &= (d >= -left) & (d <= right)
  sees = np.broadcast_to(sees[:, 0], (1 if ids is None else ids.shape[0], q_len))
  if ids is not None:
    sees = sees & (ids == ids[:, token:token + 1])
  return sees


@SETTINGS
@given(softmax_cases())
def test_softmax_xla(case):
  q, k, v, kwargs, (which, token, bad) = case
  ids = kwargs["q_segment_ids"]
  window = kwargs["local_window_size"]
  ref, _ = numpy_attention(q, k, v, scale=q.shape[-1] ** -0.5, causal=kwargs["is_causal"],
                           left=None if window is None else window[0],
                           right=None if window is None else window[1], q_seg=ids,
                           kv_seg=ids, cap=None, sinks=None)
  run = jax.jit(lambda q, k, v: ops.dot_product_attention(q, k, v, implementation="xla",
                                                          **kwargs))
  assert rel_err(run(q, k, v), ref) < 1e-5
  inputs = dict(key=k.copy(), value=v.copy())
  inputs[which][:, token, :, 0] = bad
  sees = np.broadcast_to(_sees(kwargs, q.shape[1], k.shape[1], ids, token),
                         q.shape[:2])[..., None, None]
  out = np.asarray(run(q, inputs["key"], inputs["value"]))
  np.testing.assert_array_equal(np.isfinite(out).all(axis=(2, 3), keepdims=True), ~sees)
  np.testing.assert_allclose(np.where(sees, 0, out), np.where(sees, 0, ref), rtol=1e-4,
                             atol=1e-5)
  grads = jax.grad(lambda *a: jnp.sum(jnp.where(sees, 0.0, run(*a))), (0, 1, 2))(
      q, inputs["key"], inputs["value"])
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@st.composite
def linear_cases(draw):
  batch, heads, ratio = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(
      st.integers(1, 2))
  seq = draw(st.integers(1, 40))
  key_dim, value_dim = draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 6]))
  form = draw(st.sampled_from(["none", "fixed", "scalar", "vector"]))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  q = rng.standard_normal((batch, seq, heads, key_dim)).astype(np.float32)
  k = rng.standard_normal((batch, seq, heads, key_dim)).astype(np.float32)
  v = rng.standard_normal((batch, seq, heads * ratio, value_dim)).astype(np.float32)
  shape = {"none": None, "fixed": (heads * ratio,), "scalar": (batch, seq, heads * ratio),
           "vector": (batch, seq, heads * ratio, key_dim)}[form]
  decay = None if shape is None else -rng.uniform(0, 2, shape).astype(np.float32)
  ids = _segment_ids(draw, batch, seq) if draw(st.booleans()) else None
  planted = (draw(st.sampled_from(["query", "key", "value"])), draw(st.integers(0, seq - 1)),
             draw(st.sampled_from([np.nan, np.inf])))
  return q, k, v, decay, ids, draw(st.sampled_from([4, 8, 16])), planted


@SETTINGS
@given(linear_cases())
def test_linear_xla(case):
  q, k, v, decay, ids, chunk, (which, token, bad) = case
  batch, seq, heads, key_dim = k.shape
  value_heads = v.shape[2]
  run = jax.jit(lambda q, k, v: ops.linear_attention(
      q, k, v, log_decay=decay, segment_ids=ids, chunk_size=chunk, implementation="xla"))
  ratio = value_heads // heads
  resets = np.zeros((batch, seq), bool)
  if ids is not None:
    resets[:, 1:] = ids[:, 1:] != ids[:, :-1]
  ref, _ = linear_attention_reference(
      jnp.repeat(q, ratio, 2), jnp.repeat(k, ratio, 2), v,
      log_decay=_per_token(None if decay is None else jnp.asarray(decay), batch, seq,
                           value_heads),
      scale=key_dim ** -0.5, initial_state=jnp.zeros((batch, value_heads, key_dim,
                                                      v.shape[-1])),
      resets=jnp.asarray(resets))
  assert rel_err(run(q, k, v), ref) < 1e-4
  inputs = dict(query=q.copy(), key=k.copy(), value=v.copy())
  inputs[which][:, token, 0, 0] = bad
  t = np.arange(seq)
  run_id = np.cumsum(np.asarray(resets), axis=1)
  sees = ((t == token) if which == "query" else
          (t >= token) & (run_id == run_id[:, token:token + 1]))
  sees = np.broadcast_to(sees, (batch, seq))[:, :, None, None]
  hit = np.arange(value_heads) == 0 if which == "value" else (
      np.arange(value_heads) // ratio == 0)  # value head 0, or key head 0's values
  sees = sees & hit[None, None, :, None]
  out = np.asarray(run(inputs["query"], inputs["key"], inputs["value"]))
  np.testing.assert_array_equal(~np.isfinite(out).all(axis=3, keepdims=True), sees)
  np.testing.assert_allclose(np.where(sees, 0, out), np.where(sees, 0, ref), rtol=1e-4,
                             atol=1e-4)
  grads = jax.grad(lambda *a: jnp.sum(jnp.where(sees, 0.0, run(*a))), (0, 1, 2))(
      inputs["query"], inputs["key"], inputs["value"])
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
