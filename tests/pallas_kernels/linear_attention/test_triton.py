"""The Triton-language linear-attention kernels (`pallas_kernels.linear_attention.triton`,
`triton_vector` and `triton_tiles`) against the float32 recurrence: output, final
state and the gradients of q, k, v, log decay and initial state, with random cotangents
on the output and the final state, through the Pallas-Triton tests' helpers.

Off GPU the kernels run in Triton's interpreter (`pallas_kernels.triton_call`); on a GPU
the same tests run them compiled by jax_triton (every size here is ≥ 16, as tl.dot
needs): `JAX_PLATFORMS=cuda pytest tests/pallas_kernels/linear_attention/test_triton.py`.
The interpreter costs about 5 ms per program and loop iteration: shapes stay tiny.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import chunked_plan as cp
from pallas_kernels.linear_attention.chunked_plan import BlockSizes
from tests.pallas_kernels.linear_attention import test_pallas_triton as triton_tests
from tests.pallas_kernels.linear_attention.test_pallas_triton import Case
from tests.utils import rel_err

pytest.importorskip("triton", reason="triton is not installed (`pip install -e '.[test]'` "
                    "on Linux)")
from pallas_kernels.linear_attention import triton as lt  # noqa: E402

INTERPRET = triton_tests.INTERPRET
RNG = np.random.default_rng(20261208)

CASES = [
    # Grouped value heads, packed sequences, initial state, T not a multiple of the chunk;
    # the gradient kernel over two value blocks (a loop in one program).
    Case(seq=77, value_heads=4, value_dim=32, max_decay=2.0, resets=True,
         blocks=BlockSizes(16, 16, gradient_block_v=16)),
    # Fixed decay (its gradient sums over tokens), three pieces, two value blocks.
    Case(batch=1, seq=77, heads=1, value_heads=1, value_dim=32, gate="fixed",
         max_decay=5.0, blocks=BlockSizes(16, 16, pieces=3)),
    Case(gate="none", seq=40),
    Case(seq=33, value_heads=4, max_decay=5.0, resets=True, dtype="bfloat16"),
    # Weak decay over five chunks: the chunk states (forward and reverse state passes,
    # two pieces) carry most of every gradient; two state tiles per head (K 32).
    Case(batch=1, seq=80, heads=2, value_heads=2, key_dim=32, max_decay=0.02,
         blocks=BlockSizes(16, 16, pieces=2)),
    # A single token.
    Case(seq=1, value_heads=4, resets=True),
]

VECTOR_CASES = [
    # Strong decay (-5 per token): every chunk exact, two 16-row blocks per chunk; two
    # key blocks of the state, the sequence in two pieces.
    Case(batch=1, seq=48, key_dim=32, gate="vector", max_decay=5.0, resets=True,
         chunk_size=32, blocks=BlockSizes(16, 16, pieces=2)),
    # Mild decay: factored chunks; a sequence shorter than one chunk.
    Case(batch=1, seq=20, heads=1, value_heads=1, gate="vector", resets=True,
         chunk_size=32),
    # The gradient kernels over two value blocks (dq, dk, decay parts summed); factored.
    Case(batch=1, seq=45, value_dim=32, gate="vector", resets=True, chunk_size=32,
         blocks=BlockSizes(16, 16, gradient_block_v=16)),
    # Grouped value heads, exact chunks of one 16-row block.
    Case(batch=1, seq=37, value_heads=4, key_dim=32, gate="vector", max_decay=5.0,
         resets=True),
    # bf16: factored, and exact (both 16-row blocks).
    Case(batch=1, seq=40, gate="vector", resets=True, dtype="bfloat16", chunk_size=32),
    Case(batch=1, seq=33, value_heads=4, gate="vector", max_decay=5.0, resets=True,
         dtype="bfloat16", chunk_size=32),
    # bf16 at chunk 64 (compiled: capped at 32, `chunked_plan.VECTOR_16BIT_CHUNK`).
    Case(batch=1, seq=70, heads=1, value_heads=1, key_dim=64, gate="vector", resets=True,
         dtype="bfloat16", chunk_size=64),
    # Weak decay over four chunks, no reset: the chunk states (both passes, two pieces)
    # and the initial state carry most of every gradient.
    Case(batch=1, seq=64, heads=1, value_heads=1, key_dim=32, gate="vector",
         max_decay=0.05, blocks=BlockSizes(16, 16, pieces=2)),
    # A single token.
    Case(seq=1, value_heads=4, gate="vector", resets=True),
    Case(batch=1, seq=45, key_dim=24, value_dim=20, gate="vector", resets=True,
         chunk_size=32),  # head dims zero-padded to 32
]


KERNEL = functools.partial(triton_tests._kernel, module=lt, interpret=INTERPRET)


@pytest.mark.parametrize("case", CASES + VECTOR_CASES, ids=str)
def test_matches_recurrence(case):
  triton_tests._check_against_reference(case, *triton_tests._inputs(case), kernel=KERNEL)


def test_vector_gate_chunks_factored_and_exact():
  """Vector-gate chunks on both sides of FACTORED_RANGE in one call (as the Pallas-Triton
  test of that name): mild decay (factored), strong decay in every channel, and strong
  decay in some channels only (exact row blocks)."""
  triton_tests.check_vector_gate_chunks_factored_and_exact(KERNEL)


@pytest.mark.parametrize("module", ["triton", "pallas_triton"])
def test_compiled_16bit_vector_gate_runs_at_chunk_32(module, monkeypatch):
  """Compiled on an H100 (Triton 3.6), bf16 and f16 vector-gate outputs were wrong at
  chunk 64 (relative error 1.2-1.5, final state and gradients right; chunk 32 right): in
  the Triton-language kernels at every key dim, in the Pallas-Triton ones at key dim 32.
  Such calls run at chunk 32; every other call keeps its chunk."""
  from pallas_kernels.linear_attention import pallas_triton  # pylint: disable=g-import-not-at-top
  mod = {"triton": lt, "pallas_triton": pallas_triton}[module]
  plans = []
  monkeypatch.setattr(mod, "_linear_attention", lambda q, k, v, g, h0, resets, plan: (
      plans.append(plan) or (v, h0)))

  def chunk(dtype, gate, key_dim):
    q = jnp.zeros((1, 128, 1, key_dim), dtype)
    v = jnp.zeros((1, 128, 1, 32), dtype)
    g = jnp.zeros({"vector": (1, 128, 1, key_dim), "scalar": (1, 128, 1)}[gate])
    mod.linear_attention(q, q, v, g, jnp.zeros((1, 1, key_dim, 32)),
                         jnp.zeros((1, 128), bool), scale=1.0, chunk_size=64,
                         interpret=False)
    return plans[-1].chunk

  wrong_key_dims = (16, 64, 128) if module == "triton" else (16, 32)
  for key_dim in wrong_key_dims:
    assert chunk(jnp.bfloat16, "vector", key_dim) == 32
    assert chunk(jnp.float16, "vector", key_dim) == 32
    assert chunk(jnp.float32, "vector", key_dim) == 64
    assert chunk(jnp.bfloat16, "scalar", key_dim) == 64
  if module == "pallas_triton":
    assert chunk(jnp.bfloat16, "vector", 64) == 64  # right at chunk 64 on the H100


def test_default_plan_gives_the_looped_gradient_kernel_its_measured_settings(monkeypatch):
  """The scalar-gate gradient kernel at head dims 128 in 16-bit takes 32 value columns
  per step, 8 warps, 3 stages (the H100 sweep); every other launch keeps the shared
  defaults, and explicit block sizes are kept as given."""
  plans = []
  monkeypatch.setattr(lt, "_linear_attention", lambda q, k, v, g, h0, resets, plan: (
      plans.append(plan) or (v, h0)))

  def plan(dtype, gate, dim, block_sizes=None):
    q = jnp.zeros((1, 128, 1, dim), dtype)
    g = jnp.zeros({"vector": (1, 128, 1, dim), "scalar": (1, 128, 1)}[gate])
    lt.linear_attention(q, q, q, g, jnp.zeros((1, 1, dim, dim)), jnp.zeros((1, 128), bool),
                        scale=1.0, chunk_size=64, interpret=False, block_sizes=block_sizes)
    return plans[-1]

  shared = BlockSizes.get_default(128, 128, jnp.bfloat16)
  looped = plan(jnp.bfloat16, "scalar", 128)
  assert (looped.gradient_block_v, looped.gradient_num_warps,
          looped.gradient_num_stages) == (32, 8, 3)
  assert (looped.block_v, looped.num_warps, looped.num_stages) == (
      shared.block_v, shared.num_warps, shared.num_stages)
  for dtype, gate, dim in ((jnp.float32, "scalar", 128), (jnp.bfloat16, "vector", 128),
                           (jnp.bfloat16, "scalar", 64)):
    p = plan(dtype, gate, dim)
    assert p.gradient_num_stages == p.num_stages and p.gradient_block_v == dim
  given = plan(jnp.bfloat16, "scalar", 128, BlockSizes(64, 64))
  assert given.gradient_block_v == 128 and given.gradient_num_stages == 2


def test_vector_gate_runs_no_pallas_kernel():
  """The vector gate's forward and backward are Triton-language kernels only: no
  `pallas_call` (`pallas_triton`'s chunk cumsum is one) in the gradient's jaxpr."""
  case = Case(seq=20, gate="vector", resets=True)
  args, resets, (d_out, _) = triton_tests._inputs(case)
  loss = lambda *a: jnp.sum(KERNEL(case, resets)(*a)[0] * d_out)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, range(5)))(*args))
  assert "pallas_call" not in jaxpr
  assert "pure_callback" in jaxpr or not INTERPRET  # the interpreted Triton kernels


def test_vector_decay_gradient_sums_within_runs():
  """The vector form of `test_decay_gradient_sums_within_runs`, on the Pallas-Triton
  tests' parts and definition loop."""
  batch, seq, heads, key_dim, chunk = 2, 48, 2, 16, 16
  plan = cp.make_plan(batch, seq, heads, key_dim, key_dim, jnp.float32, True, 1.0, chunk,
                      BlockSizes(16, 16), INTERPRET)
  d_b, d_keys, b, through, resets, rel = triton_tests.decay_gradient_parts(True)
  got = jax.jit(lambda *a: lt._decay_gradient_call(*a, plan))(
      jnp.asarray(b), jnp.asarray(rel, jnp.int32), jnp.asarray(resets), jnp.asarray(d_b),
      jnp.asarray(d_keys), jnp.asarray(through))
  want = triton_tests.decay_gradient_by_definition(d_b, d_keys, b, through, resets, rel,
                                                   chunk)
  assert rel_err(got, want) < 1e-5


def test_decay_gradient_sums_within_runs():
  """`_decay_gradient_call` against a loop over its definition, on arbitrary parts: from
  the gradient kernel the parts of a run after a reset sum to zero, so the end-to-end
  tests cannot see the runs; here they can."""
  batch, seq, heads, key_dim, chunk = 2, 48, 2, 16, 16
  plan = cp.make_plan(batch, seq, heads, key_dim, key_dim, jnp.float32, False, 1.0, chunk,
                      BlockSizes(16, 16), INTERPRET)
  d_b, d_keys = (RNG.standard_normal((batch, seq, heads)).astype(np.float32)
                 for _ in range(2))
  b = -RNG.uniform(0.0, 3.0, (batch, seq, heads)).astype(np.float32)
  through = RNG.standard_normal((batch, heads, seq // chunk, key_dim)).astype(np.float32)
  resets = RNG.random((batch, seq)) < 0.15
  resets[0, :chunk] = False  # one chunk without a reset
  rel = np.cumsum(resets.reshape(batch, -1, chunk), axis=2).reshape(batch, seq)
  got = jax.jit(lambda *a: lt._decay_gradient_call(*a, plan))(
      jnp.asarray(b), jnp.asarray(rel, jnp.int32), jnp.asarray(resets), jnp.asarray(d_b),
      jnp.asarray(d_keys), jnp.asarray(through))
  want = np.zeros((batch, seq, heads), np.float32)
  for n, h, c in np.ndindex(batch, heads, seq // chunk):
    rows = range(c * chunk, (c + 1) * chunk)
    last = rel[n, rows[-1]]
    for t in rows:
      if resets[n, t]:
        continue
      want[n, t, h] = sum(d_b[n, u, h] for u in rows if u >= t and rel[n, u] == rel[n, t])
      if rel[n, t] == last:
        want[n, t, h] += sum(d_keys[n, u, h] for u in rows if u < t and rel[n, u] == last)
        if last == 0:
          want[n, t, h] += np.exp(b[n, rows[-1], h]) * through[n, h, c].sum()
  assert rel_err(got, want) < 1e-5


def test_unsupported_sizes_raise_not_implemented():
  q, resets = jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8), bool)
  v, h0 = jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 1, 16, 16))
  with pytest.raises(NotImplementedError, match="chunk_size=24"):
    lt.linear_attention(q, q, v, None, h0, resets, scale=1.0, chunk_size=24, interpret=True)
