"""`pallas_kernels.flash_attention.pallas_triton` in Pallas interpret mode, against the XLA
reference `attn_jax.ops.attention_xla`: output, log-sum-exp and the gradients of q, k, v and
sinks (random cotangents on both the output and the log-sum-exp)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.ops.attention_mask import AttentionMask
from attn_jax.ops.attention_xla import attention_xla
from pallas_kernels.flash_attention import pallas_triton as pt
from tests.utils import fresh_keys, normal, rel_err

# Blocks of 16 keep interpret mode quick and make the odd lengths below span several blocks.
SMALL = pt.BlockSizes(16, 16, 16, 16, 16, 16)
# Interpret mode is a jit of loops over the grid and the key/query blocks; compiling it takes
# most of each test's time, and LLVM's optimisation level 0 halves that.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(f, *args):
  """f(*args) through jit, compiled for speed of compilation."""
  return jax.jit(f).lower(*args).compile(compiler_options=_QUICK_COMPILE)(*args)

CASES = {
    # name: (batch, q_len, kv_len, q_heads, kv_heads, dim, v_dim, options)
    "causal-B2-T37": (2, 37, 37, 2, 2, 16, 16, dict(is_causal=True)),
    "full-Tq70-Tk37": (1, 70, 37, 2, 2, 16, 16, {}),
    "causal-decode-Tq5-Tk70-gqa2-D8-Dv32": (1, 5, 70, 4, 2, 8, 32, dict(is_causal=True)),
    "causal-left20-gqa4-T70": (1, 70, 70, 8, 2, 16, 16, dict(is_causal=True, window=(20, None))),
    "window7-12-Tq45-Tk70-mqa": (1, 45, 70, 2, 1, 32, 32, dict(window=(7, 12))),
    "segments-causal-B2-T37": (2, 37, 37, 2, 2, 16, 16, dict(segments=True, is_causal=True)),
    "segments-Tq33-Tk50-gqa2-D8": (2, 33, 50, 4, 2, 8, 8, dict(segments=True)),
    "softcap-sinks-causal-Tq37-Tk50": (2, 37, 50, 4, 2, 16, 16,
                                       dict(is_causal=True, softcap=3.0, sinks=True)),
    "sinks-window5-0-mqa-T40": (1, 40, 40, 2, 1, 16, 16, dict(sinks=True, window=(5, 0))),
    # Causal with q_len > kv_len: the first 20 queries sit before every key and see nothing
    # (out 0, lse -inf or the sink logit, finite gradients).
    "causal-Tq40-Tk20-empty-rows": (1, 40, 20, 2, 1, 16, 16, dict(is_causal=True)),
    "causal-Tq40-Tk20-empty-rows-sinks": (1, 40, 20, 2, 1, 16, 16,
                                          dict(is_causal=True, sinks=True)),
}

LOW_PRECISION_CASES = {
    "bf16-causal-gqa2-T37-D32": (2, 37, 37, 4, 2, 32, 32, dict(is_causal=True), jnp.bfloat16),
    "bf16-segments-sinks-left9-T50": (1, 50, 50, 2, 1, 16, 16,
                                      dict(segments=True, sinks=True, window=(9, None)),
                                      jnp.bfloat16),
    "f16-softcap-Tq30-Tk45": (1, 30, 45, 2, 2, 16, 16, dict(softcap=5.0), jnp.float16),
}


def _inputs(batch, q_len, kv_len, q_heads, kv_heads, dim, v_dim, options, dtype=jnp.float32):
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


def _value_and_grads(fn, q, k, v, sinks, d_out, d_lse):
  """out, lse and the vjp (dq, dk, dv, dsinks) of fn(q, k, v, sinks) -> (out, lse)."""
  def run(q, k, v, sinks):
    (out, lse), vjp = jax.vjp(fn, q, k, v, sinks)
    return out, lse, vjp((d_out.astype(out.dtype), d_lse))
  return _jit(run, q, k, v, sinks)


def _kernel_and_reference(shape, options, dtype):
  q, k, v, seg, sinks, d_out, d_lse = _inputs(*shape, options, dtype)
  q_seg, kv_seg = seg or (None, None)
  scale = 0.8 * q.shape[-1] ** -0.5
  causal, window, cap = options.get("is_causal", False), options.get("window", (None, None)), \
      options.get("softcap")

  def kernel(q, k, v, sinks):
    return pt.flash_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                              sinks=sinks, scale=scale, is_causal=causal, window=window,
                              logits_soft_cap=cap, return_residuals=True,
                              block_sizes=SMALL, interpret=True)

  mask = AttentionMask(q.shape[1], k.shape[1], causal, *window)

  def reference(q, k, v, sinks):  # In float32 whatever the inputs' dtype.
    f32 = lambda x: x.astype(jnp.float32)
    return attention_xla(f32(q), f32(k), f32(v), q_seg, kv_seg, sinks, mask=mask,
                         scale=scale, logits_soft_cap=cap, return_residuals=True)

  got = _value_and_grads(kernel, q, k, v, sinks, d_out, d_lse)
  want = _value_and_grads(reference, q, k, v, sinks, d_out.astype(jnp.float32), d_lse)
  return got, want


def _check(got, want, tol):
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
      assert rel_err(g, w) < tol, (name, rel_err(g, w))


@pytest.mark.parametrize("name", CASES)
def test_float32_matches_reference(name):
  *shape, options = CASES[name]
  got, want = _kernel_and_reference(shape, options, jnp.float32)
  assert got[0].dtype == jnp.float32
  _check(got, want, 1e-5)


@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_close_to_float32_reference(name):
  *shape, options, dtype = LOW_PRECISION_CASES[name]
  got, want = _kernel_and_reference(shape, options, dtype)
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2][:3])
  _check(got, want, 2e-2)


def test_block_ranges_skip_only_invisible_blocks_and_unmask_only_visible_ones():
  """Every (q block, kv block) pair: outside [lo, hi) nothing is visible; inside
  [full_lo, full_hi) everything is (so the unmasked loop is exact)."""
  for q_len, kv_len, left, right, bq, bk in [(37, 37, None, 0, 16, 16), (45, 70, 7, 12, 16, 32),
                                             (70, 37, 20, None, 32, 16), (40, 20, None, 0, 16, 16),
                                             (50, 50, 10, None, 16, 16), (33, 50, 3, -2, 16, 16)]:
    mask = pt._Mask(q_len, kv_len, left, right, has_segments=False)
    rows, cols = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    d = cols - (rows + kv_len - q_len)
    vis = np.ones((q_len, kv_len), bool)
    if right is not None:
      vis &= d <= right
    if left is not None:
      vis &= d >= -left
    n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
    blocks = lambda a, b: vis[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
    for i in range(n_q):
      lo, full_lo, full_hi, hi = map(int, mask.kv_blocks(i * bq, bq, bk))
      for j in range(n_k):
        assert blocks(i, j).any() <= (lo <= j < hi), (q_len, kv_len, left, right, i, j)
        if full_lo <= j < full_hi:
          assert blocks(i, j).all() and blocks(i, j).shape[1] == bk
    for j in range(n_k):
      lo, full_lo, full_hi, hi = map(int, mask.q_blocks(j * bk, bk, bq))
      for i in range(n_q):
        assert blocks(i, j).any() <= (lo <= i < hi), (q_len, kv_len, left, right, i, j)
        if full_lo <= i < full_hi:
          assert blocks(i, j).all() and blocks(i, j).shape[1] == bk


def test_causal_window_visits_a_fraction_of_the_blocks():
  # A causal window of 1k on 16k tokens should cost about 1/8 of full causal attention.
  t, b = 16384, 128
  visited = lambda mask: sum(int(hi) - int(lo) for lo, *_, hi in
                             (mask.kv_blocks(i * b, b, b) for i in range(t // b)))
  causal = visited(pt._Mask(t, t, None, 0, False))
  window = visited(pt._Mask(t, t, 1024, 0, False))
  assert window / causal < 0.14


def test_reference_beside_the_kernel_matches_xla():
  *shape, options = CASES["softcap-sinks-causal-Tq37-Tk50"]
  q, k, v, _, sinks, _, _ = _inputs(*shape, options)
  q_seg = jnp.array([[0] * 20 + [1] * 17, [0] * 37], jnp.int32)
  kv_seg = jnp.array([[0] * 30 + [1] * 20, [1] * 50], jnp.int32)  # Batch 1 sees nothing.
  kwargs = dict(scale=0.3, is_causal=True, window=(9, None), logits_soft_cap=3.0)
  out, lse = pt.flash_attention_reference(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                          sinks=sinks, **kwargs)
  mask = AttentionMask(q.shape[1], k.shape[1], True, 9, None)
  ref_out, ref_lse = attention_xla(q, k, v, q_seg, kv_seg, sinks, mask=mask, scale=0.3,
                                   logits_soft_cap=3.0, return_residuals=True)
  assert rel_err(out, ref_out) < 1e-6 and rel_err(lse, ref_lse) < 1e-6


def test_vmap_and_remat():
  q, k, v, _, _, d_out, _ = _inputs(2, 20, 20, 2, 1, 16, 16, {})
  f = lambda q, k, v: pt.flash_attention(q, k, v, scale=0.3, is_causal=True,
                                         window=(None, None), logits_soft_cap=None,
                                         return_residuals=False, block_sizes=SMALL,
                                         interpret=True)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * d_out)
  plain = _jit(jax.grad(loss(f), (0, 1, 2)), q, k, v)
  per_example = lambda q, k, v: f(q[None], k[None], v[None])[0]
  mapped = _jit(jax.grad(loss(jax.checkpoint(jax.vmap(per_example))), (0, 1, 2)), q, k, v)
  for a, b in zip(plain, mapped):
    assert rel_err(a, b) < 1e-6


def test_default_block_sizes_come_from_the_table():
  for dim, dtype in [(64, jnp.bfloat16), (128, jnp.float16), (256, jnp.float32),
                     (8, jnp.float32), (96, jnp.bfloat16)]:
    blocks = pt.BlockSizes.get_default(dim, dtype)
    key = (64 if dim <= 64 else 128 if dim <= 128 else 256,
           "float32" if dtype == jnp.float32 else "16bit")
    assert blocks == pt._TUNING[key]
  with pytest.raises(ValueError, match="block_k"):
    pt.BlockSizes(block_k=48)


@pytest.mark.parametrize("what, kwargs, match", [
    ("dtype", dict(dtype=jnp.int8), "dtype"),
    ("head_dim", dict(dim=512), "head_dim"),
    ("empty kv", dict(kv_len=0), "kv_seq"),
])
def test_unsupported_inputs_raise_not_implemented(what, kwargs, match):
  dim, kv_len = kwargs.get("dim", 16), kwargs.get("kv_len", 8)
  q = jnp.zeros((1, 8, 2, dim), kwargs.get("dtype", jnp.float32))
  k = jnp.zeros((1, kv_len, 2, dim), q.dtype)
  with pytest.raises(NotImplementedError, match=match):
    pt.flash_attention(q, k, k, scale=1.0, is_causal=False, window=(None, None),
                       logits_soft_cap=None, return_residuals=False, interpret=True)
