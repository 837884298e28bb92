"""The Triton-language flash attention (`pallas_kernels.flash_attention.triton`) against the
XLA reference, on the Pallas-Triton tests' cases: output, log-sum-exp and the gradients of
q, k, v and sinks (random cotangents on the output and the log-sum-exp). Its argument
checks are `pallas_triton`'s (`common.triton_flash_attention`), tested there.

Off GPU the kernels run in Triton's interpreter (`pallas_kernels.triton_call`); on a GPU
the same tests run them compiled by jax_triton:
`JAX_PLATFORMS=cuda pytest tests/pallas_kernels/flash_attention/test_triton.py`.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.triton_call import interpret_by_default
from tests.pallas_kernels.flash_attention.test_pallas_triton import (CASES,
                                                                     LOW_PRECISION_CASES,
                                                                     SMALL)
from tests.pallas_kernels.flash_attention.util import check, kernel_and_reference

pytest.importorskip("triton", reason="triton is not installed (`pip install -e '.[test]'` "
                    "on Linux)")
from pallas_kernels.flash_attention import triton as ft  # noqa: E402

# Compiled on a GPU, interpreted elsewhere.
INTERPRET = interpret_by_default() or jax.default_backend() == "cpu"
# Every feature of the Pallas-Triton cases once, the interpreter being slow: causal,
# decode and GQA with odd head dims, a two-sided window with MQA, soft cap and sinks, rows
# that see nothing; segment ids and a left window in bf16, a full mask in f16, and the
# default blocks below.
FLOAT32_CASES = ["causal-decode-Tq5-Tk70-gqa2-D8-Dv32", "window7-12-Tq45-Tk70-mqa",
                 "softcap-sinks-causal-Tq37-Tk50", "causal-Tq40-Tk20-empty-rows-sinks"]


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_matches_reference(name):
  *shape, options = CASES[name]
  got, want = kernel_and_reference(ft.flash_attention, shape, options, jnp.float32,
                                   interpret=INTERPRET, block_sizes=SMALL)
  assert got[0].dtype == jnp.float32
  check(got, want, 1e-5)


@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_close_to_float32_reference(name):
  *shape, options, dtype = LOW_PRECISION_CASES[name]
  got, want = kernel_and_reference(ft.flash_attention, shape, options, dtype,
                                   interpret=INTERPRET, block_sizes=SMALL)
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[2][:3])
  check(got, want, 2e-2)


def test_default_blocks_span_several_key_blocks():
  # The tuned blocks (128 queries, 64 keys) over 150 keys: full, partial and skipped
  # blocks of the default path, causal with a left window.
  got, want = kernel_and_reference(ft.flash_attention, (1, 150, 150, 2, 1, 32, 32),
                                   dict(is_causal=True, window=(70, None)), jnp.float32,
                                   interpret=INTERPRET)
  check(got, want, 1e-5)
