"""`ops.dot_product_attention` against an independent float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from tests.utils import fresh_keys, normal, rel_err


def numpy_attention(q, k, v, *, scale, causal, left, right, q_seg, kv_seg, cap, sinks):
  """Row by row, in float64, straight from the definition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, tq, hq, _ = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  lse = np.full((b_, hq, tq), -np.inf)
  for b in range(b_):
    for h in range(hq):
      kh = h // (hq // hkv)
      for i in range(tq):
        d = np.arange(tk) - (i + tk - tq)
        ok = np.ones(tk, bool)
        if causal:
          ok &= d <= 0
        if left is not None:
          ok &= d >= -left
        if right is not None:
          ok &= d <= right
        if q_seg is not None:
          ok &= np.asarray(kv_seg)[b] == np.asarray(q_seg)[b, i]
        s = k[b, :, kh] @ q[b, i, h] * scale
        if cap is not None:
          s = cap * np.tanh(s / cap)
        s = s[ok]
        cols = [s] if sinks is None else [s, [float(sinks[h])]]
        allv = np.concatenate(cols)
        if allv.size == 0:
          continue
        m = allv.max()
        denom = np.exp(allv - m).sum()
        out[b, i, h] = np.exp(s - m) @ v[b, ok, kh] / denom
        lse[b, h, i] = m + np.log(denom)
  return out, lse


CASES = {
    # name: (batch, q_len, kv_len, q_heads, kv_heads, dim, options)
    "plain": (2, 9, 9, 2, 2, 8, {}),
    "causal": (2, 11, 11, 4, 4, 8, dict(is_causal=True)),
    "causal-gqa2-decode": (1, 3, 13, 4, 2, 8, dict(is_causal=True)),
    "mqa-window": (2, 17, 17, 4, 1, 16, dict(local_window_size=(3, 2))),
    "causal-left-window": (1, 20, 20, 2, 1, 8, dict(is_causal=True, local_window_size=(4, None))),
    "symmetric-window-int": (1, 10, 12, 2, 2, 8, dict(local_window_size=2)),
    "segments": (2, 12, 12, 2, 2, 8, dict(segments=True, is_causal=True)),
    "softcap-sinks": (2, 7, 10, 4, 2, 8, dict(logits_soft_cap=2.0, sinks=True)),
    "cross-segments-sinks": (1, 6, 9, 2, 2, 8, dict(segments=True, sinks=True)),
    "scale": (1, 5, 5, 2, 2, 4, dict(scale=0.7, is_causal=True)),
}


def _inputs(batch, q_len, kv_len, q_heads, kv_heads, dim, options, dtype=jnp.float32):
  kq, kk, kv, ks, kseg = fresh_keys(5)
  q = normal(kq, (batch, q_len, q_heads, dim), dtype)
  k = normal(kk, (batch, kv_len, kv_heads, dim), dtype)
  v = normal(kv, (batch, kv_len, kv_heads, dim), dtype)
  kwargs = {key: val for key, val in options.items() if key not in ("segments", "sinks")}
  if options.get("segments"):
    kwargs["q_segment_ids"] = jax.random.randint(kseg, (batch, q_len), 0, 3)
    kwargs["kv_segment_ids"] = jnp.sort(jax.random.randint(kseg, (batch, kv_len), 0, 3), -1)
  if options.get("sinks"):
    kwargs["sinks"] = normal(ks, (q_heads,))
  return q, k, v, kwargs


def _reference(q, k, v, kwargs):
  window = kwargs.get("local_window_size")
  if isinstance(window, int):
    window = (window, window)
  left, right = window or (None, None)
  return numpy_attention(
      q, k, v, scale=kwargs.get("scale", q.shape[-1] ** -0.5),
      causal=kwargs.get("is_causal", False), left=left, right=right,
      q_seg=kwargs.get("q_segment_ids"), kv_seg=kwargs.get("kv_segment_ids"),
      cap=kwargs.get("logits_soft_cap"), sinks=kwargs.get("sinks"))


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_numpy(name):
  q, k, v, kwargs = _inputs(*CASES[name])
  out, lse = ops.dot_product_attention(q, k, v, return_residuals=True, **kwargs)
  ref_out, ref_lse = _reference(q, k, v, kwargs)
  assert out.shape == ref_out.shape and out.dtype == q.dtype
  assert rel_err(out, ref_out) < 1e-5
  finite = np.isfinite(ref_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


def dense_attention(q, k, v, sinks=None, **kwargs):
  """An independent jnp formulation (repeat K/V, jax.nn.softmax) for gradient checks."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, 2), jnp.repeat(v, groups, 2)
  mask = ops.AttentionMask.create(q.shape[1], k.shape[1],
                                  is_causal=kwargs.get("is_causal", False),
                                  local_window_size=kwargs.get("local_window_size"))
  visible = mask.dense(kwargs.get("q_segment_ids"), kwargs.get("kv_segment_ids"))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  cap = kwargs.get("logits_soft_cap")
  if cap:
    s = cap * jnp.tanh(s / cap)
  s = jnp.where(visible[:, None], s, -1e30)
  if sinks is not None:
    s = jnp.concatenate([s, jnp.broadcast_to(sinks[None, :, None, None],
                                             s.shape[:3] + (1,))], -1)
  p = jax.nn.softmax(s, -1)[..., :k.shape[1]]
  p = jnp.where(visible[:, None], p, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("name", ["causal-gqa2-decode", "mqa-window", "segments",
                                  "softcap-sinks", "causal-left-window"])
def test_gradients_match_dense(name):
  q, k, v, kwargs = _inputs(*CASES[name])
  (cot,) = fresh_keys(1)
  cot = normal(cot, q.shape[:3] + (v.shape[-1],))
  sinks = kwargs.pop("sinks", None)
  args = (q, k, v) if sinks is None else (q, k, v, sinks)

  def loss(fn):
    def f(*a):
      extra = {} if len(a) == 3 else {"sinks": a[3]}
      return jnp.sum(fn(*a[:3], **extra, **kwargs) * cot)
    return f

  got = jax.grad(loss(ops.dot_product_attention), argnums=tuple(range(len(args))))(*args)
  want = jax.grad(loss(dense_attention), argnums=tuple(range(len(args))))(*args)
  for g, w in zip(got, want):
    assert rel_err(g, w) < 1e-5


def test_fully_masked_rows_are_zero_without_nan():
  q, k, v, _ = _inputs(1, 4, 6, 2, 2, 8, {})
  q_seg = jnp.array([[0, 1, 7, 7]])  # segment 7 has no keys
  kv_seg = jnp.array([[0, 0, 1, 1, 1, 2]])

  def f(q, k, v):
    out, lse = ops.dot_product_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                         return_residuals=True)
    return out, lse

  out, lse = f(q, k, v)
  assert np.all(np.asarray(out[0, 2:]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[0, :, 2:])))
  grads = jax.grad(lambda *a: jnp.sum(f(*a)[0]) + jnp.sum(jnp.where(
      jnp.isfinite(f(*a)[1]), f(*a)[1], 0.0)), argnums=(0, 1, 2))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_close_to_float32(dtype):
  q, k, v, kwargs = _inputs(2, 33, 33, 4, 2, 16, dict(is_causal=True), dtype)
  out = ops.dot_product_attention(q, k, v, **kwargs)
  ref, _ = _reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                      kwargs)
  assert out.dtype == dtype
  assert rel_err(out, ref) < 1e-2


def test_jit_and_vmap():
  q, k, v, kwargs = _inputs(2, 8, 8, 2, 1, 8, dict(is_causal=True))
  f = jax.jit(lambda q, k, v: ops.dot_product_attention(q, k, v, is_causal=True))
  batched = jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0])(q, k, v)
  assert rel_err(batched, f(q, k, v)) < 1e-6


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: ops.dot_product_attention(q[0], k, v), "query must be"),
    (lambda q, k, v: ops.dot_product_attention(q, k[:, :, :1].repeat(3, 2), v), "key and value"),
    (lambda q, k, v: ops.dot_product_attention(q, k.astype(jnp.bfloat16), v), "one dtype"),
    (lambda q, k, v: ops.dot_product_attention(q, k[..., :4], v), "head_dim"),
    (lambda q, k, v: ops.dot_product_attention(jnp.concatenate([q, q[:, :, :1]], 2), k, v),
     "multiple"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, local_window_size=-1), "non-negative"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, local_window_size=(1, 2, 3)), "left, right"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, q_segment_ids=jnp.zeros((1, 8), int)),
     "together"),
    (lambda q, k, v: ops.dot_product_attention(
        q, k, v, q_segment_ids=jnp.zeros((1, 7), int), kv_segment_ids=jnp.zeros((1, 8), int)),
     r"q_segment_ids must be integers of shape \(batch, seq\) = \(1, 8\)"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, sinks=jnp.zeros(3)), "sinks"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, logits_soft_cap=0.0), "logits_soft_cap"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, implementation="fast"), "unknown"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, dropout_rate=1.0), "dropout_rate"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, dropout_rate=True), "dropout_rate"),
    (lambda q, k, v: ops.dot_product_attention(q, k, v, dropout_rate=0.1), "dropout_rng"),
])
def test_bad_arguments_raise_value_error(call, match):
  q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8, {})
  with pytest.raises(ValueError, match=match):
    call(q, k, v)


def test_unavailable_implementations_say_why(monkeypatch):
  monkeypatch.delenv("ATTN_JAX_INTERPRET", raising=False)
  q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8, {})
  with pytest.raises(NotImplementedError, match="cudnn needs an NVIDIA GPU"):
    ops.dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.parametrize("q_len, kwargs, match", [
    (8, dict(local_window_size=(3, 3)), "right window bound"),
    (8, dict(local_window_size=(3, None)), "left window without a causal mask"),
    (5, dict(is_causal=True), "q_seq != kv_seq"),
    (8, dict(is_causal=True, logits_soft_cap=2.0), "logits_soft_cap"),
])
def test_cudnn_says_which_mask_it_cannot_serve(monkeypatch, q_len, kwargs, match):
  """The op's mask as cuDNN reads it (on a pretended GPU: each case is refused before any
  cuDNN call)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8, {}, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=match):
    ops.dot_product_attention(q[:, :q_len], k, v, implementation="cudnn", **kwargs)


def test_attention_dropout_is_unbiased_seeded_and_xla_only(monkeypatch):
  """Dropout keeps each weight with probability 1 - rate, scaled by 1 / (1 - rate): the
  same key gives the same output, the mean over keys is the output without dropout, and
  a kernel asked for it refuses, naming the XLA path."""
  q, k, v, _ = _inputs(2, 8, 8, 4, 2, 8, {})
  call = lambda key, rate=0.25: ops.dot_product_attention(
      q, k, v, is_causal=True, dropout_rate=rate, dropout_rng=key)
  plain = ops.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_array_equal(call(None, 0.0), plain)
  key = jax.random.key(0)
  np.testing.assert_array_equal(call(key), call(key))
  assert rel_err(call(key), call(jax.random.key(1))) > 0.05
  mean = jax.vmap(call)(jax.random.split(key, 4000)).mean(0)
  assert rel_err(mean, plain) < 0.03
  # Row 0 sees one key: its weight 1 is kept (out = v_0 / 0.75) or dropped (0).
  row0 = np.asarray(call(key)[:, 0])
  v0 = np.repeat(np.asarray(v[:, 0]), 2, axis=1) / 0.75
  assert np.all(np.isclose(row0, v0, rtol=1e-5) | (row0 == 0))
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  with pytest.raises(NotImplementedError, match="implementation='xla'"):
    ops.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=key,
                              implementation="pallas_triton")
