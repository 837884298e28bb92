"""`pallas_kernels.flash_attention.pallas_mosaic_gpu` (forward and `mosaic_gpu_backward`) in
JAX's Mosaic GPU interpreter (CPU), against the float32 XLA reference: output, log-sum-exp and
the gradients of q, k, v and sinks (head_dim 256: the Triton backward).

The interpreter runs the kernels' warpgroups, shared memory, TMA copies and mbarriers as
written, but not wgmma with a register operand nor `run_state`, so there the kernels'
matmuls are plain dots of the same shared-memory tiles (`mosaic_gpu_parts`). The same cases run compiled, wgmma
included, on a Hopper GPU (`gpu_only` below: `JAX_PLATFORMS=cuda pytest -m gpu_only ...`).
"""

import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import pallas_mosaic_gpu as pm
from tests.pallas_kernels.flash_attention.util import check, kernel_and_reference

# One CTA holds 2 x 64 query rows; 64-key blocks make the lengths below span several CTAs
# and key blocks, with padding at both ends.
SMALL = pm.BlockSizes(64, 64)

CASES = {
    # name: (batch, q_len, kv_len, q_heads, kv_heads, dim, v_dim, options, dtype)
    "full-T128-D64": (1, 128, 128, 1, 1, 64, 64, {}, jnp.bfloat16),
    "full-Tq70-Tk200-gqa2": (2, 70, 200, 4, 2, 64, 64, {}, jnp.bfloat16),
    "causal-T150-gqa2": (2, 150, 150, 4, 2, 64, 64, dict(is_causal=True), jnp.bfloat16),
    # Queries 128-255 see keys from 78 (first warpgroup) and 142 (second) on: the CTA streams
    # blocks 1-3; the second warpgroup passes over block 1, the first over block 3.
    "causal-left50-T300-mqa": (1, 300, 300, 2, 1, 64, 64, dict(is_causal=True, window=(50, None)),
                               jnp.float16),
    "window30-10-segments-sinks-softcap-Tq130-Tk200": (
        1, 130, 200, 2, 2, 64, 64,
        dict(window=(30, 10), segments=True, sinks=True, softcap=4.0), jnp.bfloat16),
    # Causal with q_len > kv_len: the first 100 queries see nothing (out 0, lse the sink).
    "causal-Tq200-Tk100-empty-rows-sinks": (1, 200, 100, 2, 1, 64, 64,
                                            dict(is_causal=True, sinks=True), jnp.bfloat16),
    "causal-T130-D128": (1, 130, 130, 2, 2, 128, 128, dict(is_causal=True), jnp.bfloat16),
    "segments-T100-D256": (1, 100, 100, 2, 1, 256, 256, dict(segments=True), jnp.float16),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_float32_reference(name):
  *shape, options, dtype = CASES[name]
  got, want = kernel_and_reference(pm.flash_attention, shape, options, dtype,
                                   block_sizes=SMALL)
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2][:3])
  check(got, want, 2e-2)


@pytest.mark.gpu_only
@pytest.mark.parametrize("name", CASES)
def test_compiled_matches_float32_reference_on_hopper(name):
  *shape, options, dtype = CASES[name]
  got, want = kernel_and_reference(pm.flash_attention, shape, options, dtype,
                                   interpret=False, block_sizes=SMALL)
  check(got, want, 2e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.float32), "dtype"),
    (dict(dim=96), "head_dim"),
    (dict(v_dim=128), "value head_dim"),
    (dict(kv_len=0), "kv_seq"),
])
def test_unsupported_inputs_raise_not_implemented(kwargs, match):
  dim = kwargs.get("dim", 64)
  q = jnp.zeros((1, 8, 2, dim), kwargs.get("dtype", jnp.bfloat16))
  k = jnp.zeros((1, kwargs.get("kv_len", 8), 2, dim), q.dtype)
  v = jnp.zeros(k.shape[:3] + (kwargs.get("v_dim", dim),), q.dtype)
  with pytest.raises(NotImplementedError, match=match):
    pm.flash_attention(q, k, v, scale=1.0, is_causal=False, window=(None, None),
                       logits_soft_cap=None, return_residuals=False, interpret=True)


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="block_kv"):
    pm.BlockSizes(block_kv=96)
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    pm.BlockSizes(max_concurrent_steps=1)
  assert pm.BlockSizes.get_default(128) == pm._TUNING[128]
