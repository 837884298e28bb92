"""`pallas_kernels.triton_call`: Triton-language kernels through Triton's interpreter on
CPU (and, on a GPU, the same kernels compiled by jax_triton), against NumPy; the calling
convention of jax_triton (outputs after inputs, scalars in place, aliases, zeroed
outputs); the interpreter fixes; clear errors without triton."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import triton_call as tc

triton = pytest.importorskip(
    "triton", reason="triton is not installed (`pip install -e '.[test]'` on Linux)")
tl = pytest.importorskip("triton.language")

INTERPRET = jax.default_backend() != "gpu"
RNG = np.random.default_rng(20261206)


@triton.jit
def _add_kernel(x_ptr, y_ptr, size, out_ptr, BLOCK: tl.constexpr):
  offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  mask = offsets < size
  x = tl.load(x_ptr + offsets, mask=mask)
  y = tl.load(y_ptr + offsets, mask=mask)
  tl.store(out_ptr + offsets, x + y, mask=mask)


@triton.jit
def _dot_tile(a, b):
  return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, k_blocks, c_ptr, M: tl.constexpr, N: tl.constexpr,
                   BK: tl.constexpr):
  """c = a·b for a [M, k_blocks·BK] and b [k_blocks·BK, N]: the loop bound is a run-time
  scalar (interpreter fix 1), the operands are the inputs' dtype (fix 2 for bf16)."""
  rows, cols, inner = tl.arange(0, M), tl.arange(0, N), tl.arange(0, BK)
  k = k_blocks * BK
  acc = tl.zeros((M, N), tl.float32)
  for i in range(0, k_blocks):
    a = tl.load(a_ptr + rows[:, None] * k + (i * BK + inner)[None, :])
    b = tl.load(b_ptr + (i * BK + inner)[:, None] * N + cols[None, :])
    acc += _dot_tile(a, b)
  tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _convention_kernel(x_ptr, scale, acc_ptr, scaled_ptr, acc_out_ptr, count_ptr,
                       untouched_ptr, SIZE: tl.constexpr):
  """Outputs: scaled = scale·x, acc_out (aliased to acc) += x, count (zeroed) += 1;
  untouched is never written."""
  offsets = tl.arange(0, SIZE)
  tl.static_assert(scale.dtype == tl.float64)  # a Python float is fp64, as in jax_triton
  x = tl.load(x_ptr + offsets)
  tl.store(scaled_ptr + offsets, (x * scale).to(tl.float32))
  tl.store(acc_out_ptr + offsets, tl.load(acc_out_ptr + offsets) + x)
  tl.store(count_ptr + offsets, tl.load(count_ptr + offsets) + 1)


def _add(x, y, block=4):
  return tc.triton_call(_add_kernel, x, y, x.size, out_shape=jax.ShapeDtypeStruct(
      x.shape, x.dtype), grid=lambda meta: (-(-x.size // meta["BLOCK"]),),
                        interpret=INTERPRET, BLOCK=block)


def _matmul(a, b, bk=16):
  m, k = a.shape
  return tc.triton_call(_matmul_kernel, a, b, k // bk,
                        out_shape=jax.ShapeDtypeStruct((m, b.shape[1]), a.dtype), grid=1,
                        interpret=INTERPRET, num_warps=4, num_stages=2, M=m, N=b.shape[1],
                        BK=bk)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_add_matches_numpy(dtype):
  x, y = (RNG.standard_normal(10).astype(np.float32) for _ in range(2))
  got = jax.jit(_add)(jnp.asarray(x, dtype), jnp.asarray(y, dtype))
  assert got.dtype == jnp.dtype(dtype)
  want = (jnp.asarray(x, dtype).astype(np.float32) + jnp.asarray(y, dtype).astype(np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want.astype(dtype), np.float32), rtol=0, atol=0)


# bf16: the only error allowed is the final rounding to 8 bits, at most 2^-8 relative.
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-6), ("bfloat16", 2.0**-8)])
def test_dot_matches_numpy(dtype, rtol):
  a = jnp.asarray(RNG.standard_normal((16, 48)), dtype)
  b = jnp.asarray(RNG.standard_normal((48, 32)), dtype)
  got = jax.jit(_matmul)(a, b)
  want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)  # exact product of inputs
  assert got.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's output conventions")
def test_calling_convention_outputs_aliases_zeroed_and_poison():
  x = jnp.asarray(RNG.standard_normal(8), jnp.float32)
  acc = jnp.arange(8, dtype=jnp.float32)
  f32 = jax.ShapeDtypeStruct((8,), jnp.float32)
  # acc is array argument 1 (the scalar is not counted) and output 1.
  scaled, acc_out, count, untouched = jax.jit(lambda x, acc: tc.triton_call(
      _convention_kernel, x, 0.5, acc, grid=(1,), interpret=True,
      out_shape=[f32, f32, jax.ShapeDtypeStruct((8,), jnp.int32), f32],
      input_output_aliases={1: 1}, zeroed_outputs=lambda meta: (2,), SIZE=8))(x, acc)
  np.testing.assert_allclose(scaled, 0.5 * np.asarray(x), rtol=1e-6)
  np.testing.assert_allclose(acc_out, np.asarray(acc) + np.asarray(x), rtol=1e-6)
  np.testing.assert_array_equal(count, np.ones(8, np.int32))
  assert np.isnan(np.asarray(untouched)).all()


@pytest.mark.skipif(not INTERPRET, reason="interpret mode only")
def test_interpreter_state_restored_after_a_call():
  from triton.runtime import interpreter  # pylint: disable=import-outside-toplevel
  before = (interpreter._get_np_dtype, interpreter._patch_lang,  # pylint: disable=protected-access
            interpreter.InterpreterBuilder.cast_impl)
  _matmul(jnp.ones((16, 16), jnp.bfloat16), jnp.ones((16, 16), jnp.bfloat16))
  assert (interpreter._get_np_dtype, interpreter._patch_lang,  # pylint: disable=protected-access
          interpreter.InterpreterBuilder.cast_impl) == before
  assert isinstance(tl.zeros, triton.JITFunction)
  assert isinstance(_dot_tile, triton.JITFunction)


def test_env_var_selects_the_interpreter(monkeypatch):
  monkeypatch.setenv("ATTN_JAX_INTERPRET", "1")
  x = jnp.arange(6, dtype=jnp.float32)
  got = tc.triton_call(_add_kernel, x, x, 6, out_shape=jax.ShapeDtypeStruct((6,), x.dtype),
                       grid=(2,), BLOCK=4)
  np.testing.assert_array_equal(got, 2 * np.arange(6))


@pytest.mark.skipif(not INTERPRET, reason="compiling is what a GPU does")
def test_compiled_call_off_gpu_says_how_to_interpret(monkeypatch):
  monkeypatch.delenv("ATTN_JAX_INTERPRET", raising=False)
  x = jnp.ones(4, jnp.float32)
  with pytest.raises(NotImplementedError, match="ATTN_JAX_INTERPRET=1"):
    tc.triton_call(_add_kernel, x, x, 4, out_shape=x, grid=1, BLOCK=4)


def test_missing_triton_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
  x = jnp.ones(4, jnp.float32)
  with pytest.raises(ModuleNotFoundError, match=r"triton==3\.6\.0"):
    tc.triton_call(_add_kernel, x, x, 4, out_shape=x, grid=1, interpret=True, BLOCK=4)


def test_missing_jax_triton_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax_triton", None)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x = jnp.ones(4, jnp.float32)
  with pytest.raises(ModuleNotFoundError, match=r"jax-triton==0\.3\.1"):
    tc.triton_call(_add_kernel, x, x, 4, out_shape=x, grid=1, interpret=False, BLOCK=4)


def test_importing_the_packages_needs_no_triton():
  code = ("import sys, attn_jax, attn_jax.ops, pallas_kernels.triton_call; "
          "bad = [m for m in ('triton', 'jax_triton') if m in sys.modules]; "
          "assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
