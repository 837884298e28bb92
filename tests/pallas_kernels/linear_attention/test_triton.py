"""The Triton-language linear-attention kernels (`pallas_kernels.linear_attention.triton`,
scalar gates) against the float32 recurrence: output, final state and the gradients of
q, k, v, log decay and initial state, with random cotangents on the output and the final
state, through the Pallas-Triton tests' helpers.

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

from pallas_kernels.linear_attention.pallas_triton import BlockSizes
from tests.pallas_kernels.linear_attention import test_pallas_triton as triton_tests
from tests.pallas_kernels.linear_attention.test_pallas_triton import Case
from tests.utils import rel_err

pytest.importorskip("triton", reason="triton is not installed (`pip install -e '.[test]'` "
                    "on Linux)")
from pallas_kernels.linear_attention import pallas_triton as pt  # noqa: E402
from pallas_kernels.linear_attention import triton as lt  # noqa: E402

INTERPRET = triton_tests.INTERPRET
RNG = np.random.default_rng(20261208)

CASES = [
    # Grouped value heads, packed sequences, initial state, T not a multiple of the chunk;
    # the gradient kernel over two value blocks (dq, dk, decay parts summed).
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


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_recurrence(case):
  triton_tests._check_against_reference(
      case, *triton_tests._inputs(case),
      kernel=functools.partial(triton_tests._kernel, module=lt, interpret=INTERPRET))


def test_decay_gradient_sums_within_runs():
  """`_decay_gradient_call` against a loop over its definition, on arbitrary parts: from
  the gradient kernel the parts of a run after a reset sum to zero, so the end-to-end
  tests cannot see the runs; here they can."""
  batch, seq, heads, key_dim, chunk = 2, 48, 2, 16, 16
  plan = pt._make_plan(batch, seq, heads, key_dim, key_dim, jnp.float32, False, 1.0, chunk,
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


def test_vector_gate_is_refused_by_name():
  case = Case(seq=16)
  (q, k, v, _, h0), resets, _ = triton_tests._inputs(case)
  g = jnp.zeros(v.shape[:3] + (case.key_dim,))
  with pytest.raises(NotImplementedError, match="log_decay.*vector gate"):
    lt.linear_attention(q, k, v, g, h0, resets, scale=1.0, chunk_size=16,
                        interpret=INTERPRET)


def test_unsupported_sizes_raise_not_implemented():
  q, resets = jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8), bool)
  v, h0 = jnp.zeros((1, 8, 1, 24)), jnp.zeros((1, 1, 16, 24))
  with pytest.raises(NotImplementedError, match="value_dim=24"):
    lt.linear_attention(q, q, v, None, h0, resets, scale=1.0, chunk_size=16, interpret=True)
