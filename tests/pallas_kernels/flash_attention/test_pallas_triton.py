"""`pallas_kernels.flash_attention.pallas_triton` in Pallas interpret mode, against the XLA
reference `pallas_kernels.flash_attention.xla`: output, log-sum-exp and the gradients of q, k, v and
sinks (random cotangents on both the output and the log-sum-exp)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention import pallas_triton as pt
from pallas_kernels.flash_attention import xla
from pallas_kernels.flash_attention.mask import AttentionMask
from tests.pallas_kernels.flash_attention.util import (check, inputs, jit_quick,
                                                       kernel_and_reference)
from tests.utils import rel_err

# Blocks of 16 keep interpret mode quick and make the odd lengths below span several blocks.
SMALL = pt.BlockSizes(16, 16, 16, 16, 16, 16)

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


@pytest.mark.parametrize("name", CASES)
def test_float32_matches_reference(name):
  *shape, options = CASES[name]
  got, want = kernel_and_reference(pt.flash_attention, shape, options, jnp.float32,
                                   block_sizes=SMALL)
  assert got[0].dtype == jnp.float32
  check(got, want, 1e-5)


@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_close_to_float32_reference(name):
  *shape, options, dtype = LOW_PRECISION_CASES[name]
  got, want = kernel_and_reference(pt.flash_attention, shape, options, dtype,
                                   block_sizes=SMALL)
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2][:3])
  check(got, want, 2e-2)


def test_reference_beside_the_kernel_matches_xla():
  *shape, options = CASES["softcap-sinks-causal-Tq37-Tk50"]
  q, k, v, _, sinks, _, _ = inputs(*shape, options)
  q_seg = jnp.array([[0] * 20 + [1] * 17, [0] * 37], jnp.int32)
  kv_seg = jnp.array([[0] * 30 + [1] * 20, [1] * 50], jnp.int32)  # Batch 1 sees nothing.
  mask = AttentionMask.create(q.shape[1], k.shape[1], is_causal=True,
                              local_window_size=(9, None), has_segments=True)
  kwargs = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=sinks, mask=mask, scale=0.3,
                logits_soft_cap=3.0)
  out, lse = pt.flash_attention_reference(q, k, v, **kwargs)
  ref_out, ref_lse = xla.flash_attention(q, k, v, return_residuals=True, **kwargs)
  assert rel_err(out, ref_out) < 1e-6 and rel_err(lse, ref_lse) < 1e-6


def test_vmap_and_remat():
  q, k, v, _, _, d_out, _ = inputs(2, 20, 20, 2, 1, 16, 16, {})
  f = lambda q, k, v: pt.flash_attention(q, k, v, mask=AttentionMask(q.shape[1], k.shape[1],
                                                                      right=0),
                                         scale=0.3, logits_soft_cap=None,
                                         return_residuals=False, block_sizes=SMALL,
                                         interpret=True)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * d_out)
  plain = jit_quick(jax.grad(loss(f), (0, 1, 2)), q, k, v)
  per_example = lambda q, k, v: f(q[None], k[None], v[None])[0]
  mapped = jit_quick(jax.grad(loss(jax.checkpoint(jax.vmap(per_example))), (0, 1, 2)), q, k, v)
  for a, b in zip(plain, mapped):
    assert rel_err(a, b) < 1e-6


def test_default_block_sizes_come_from_the_table():
  for dim, dtype in [(64, jnp.bfloat16), (128, jnp.float16), (256, jnp.float32),
                     (8, jnp.float32), (96, jnp.bfloat16)]:
    blocks = pt.BlockSizes.get_default(dim, dtype)
    key = (64 if dim <= 64 else 128 if dim <= 128 else 256,
           "float32" if dtype == jnp.float32 else "16bit")
    assert blocks == common.TRITON_TUNING[key]
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
    pt.flash_attention(q, k, k, mask=AttentionMask(8, kv_len), scale=1.0,
                       logits_soft_cap=None, return_residuals=False, interpret=True)


@pytest.mark.parametrize("mask, segments, match", [
    (AttentionMask(8, 9), False, r"mask lengths \(q_len, kv_len\) = \(8, 9\)"),
    (AttentionMask(8, 8), True, "has_segments=False but segment ids were given"),
    (AttentionMask(8, 8, has_segments=True), False, "has_segments=True but segment ids"),
])
def test_a_mask_of_another_call_is_refused(mask, segments, match):
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32) if segments else None
  with pytest.raises(ValueError, match=match):
    pt.flash_attention(q, q, q, q_segment_ids=ids, kv_segment_ids=ids, mask=mask, scale=1.0,
                       logits_soft_cap=None, return_residuals=False, interpret=True)
