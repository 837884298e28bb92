"""The Triton-language linear-attention forward (scalar gates) against the naive
recurrence: output and final state, with grouped heads, packed sequences, an initial
state and sequences that are not whole chunks.

Off GPU the kernels run in Triton's interpreter (`pallas_kernels.triton_call`); on a GPU
the same tests run them compiled by jax_triton (every size here is ≥ 16, as tl.dot needs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.ops.linear_attention_reference import linear_attention_reference
from pallas_kernels.linear_attention.pallas_triton import BlockSizes
from tests.utils import rel_err

pytest.importorskip("triton", reason="triton is not installed (`pip install -e '.[test]'` "
                    "on Linux)")
from pallas_kernels.linear_attention import triton as lt  # noqa: E402

RNG = np.random.default_rng(20261207)
INTERPRET = jax.default_backend() != "gpu"
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 1
  seq: int = 40
  heads: int = 1
  value_heads: int = 2
  key_dim: int = 16
  value_dim: int = 32
  gate: str = "scalar"  # "none", "fixed" or "scalar"
  max_decay: float = 2.0  # log decays are uniform in [-max_decay, 0]
  resets: bool = True
  dtype: str = "float32"
  chunk_size: int = 16
  blocks: BlockSizes = BlockSizes(16, 16, pieces=1)

  def __str__(self):
    return (f"B{self.batch}-T{self.seq}-H{self.heads}:{self.value_heads}-K{self.key_dim}"
            f"-V{self.value_dim}-{self.gate}{self.max_decay:g}-{self.dtype}"
            f"-C{self.chunk_size}" + ("-resets" if self.resets else ""))


CASES = [
    # Grouped heads, packed sequences, two value blocks, T not a multiple of the chunk.
    Case(),
    Case(dtype="bfloat16", key_dim=32, value_dim=16, max_decay=5.0),
    Case(gate="fixed", resets=False, value_heads=1),
    Case(gate="none", resets=False, value_heads=1, seq=20, value_dim=16),
    # Two batch rows and key heads, the sequence in two pieces (their starts from
    # pallas_triton's state pass).
    Case(batch=2, heads=2, value_heads=4, max_decay=0.5, blocks=BlockSizes(16, 16, pieces=2)),
]


def _inputs(case):
  dtype = jnp.dtype(case.dtype)
  b, t, hk, hv, kd, vd = (case.batch, case.seq, case.heads, case.value_heads, case.key_dim,
                          case.value_dim)
  normal = lambda *shape: RNG.standard_normal(shape, np.float32)
  q, k = (jnp.asarray(normal(b, t, hk, kd), dtype) for _ in range(2))
  v = jnp.asarray(normal(b, t, hv, vd), dtype)
  shape = {"none": None, "fixed": (hv,), "scalar": (b, t, hv)}[case.gate]
  g = None if shape is None else jnp.asarray(
      RNG.uniform(-case.max_decay, 0.0, shape).astype(np.float32))
  h0 = jnp.asarray(normal(b, hv, kd, vd))
  resets = RNG.random((b, t)) < (0.08 if case.resets else 0.0)
  resets[0, 0] = case.resets
  return q, k, v, g, h0, jnp.asarray(resets)


def _reference(case, q, k, v, g, h0, resets):
  b, t, hv = case.batch, case.seq, case.value_heads
  if g is None:
    g = jnp.zeros((b, t, hv))
  elif g.ndim == 1:
    g = jnp.broadcast_to(g, (b, t, hv))
  r = hv // case.heads
  q, k = (jnp.repeat(x.astype(jnp.float32), r, axis=2) for x in (q, k))
  return linear_attention_reference(q, k, v.astype(jnp.float32), log_decay=g,
                                    scale=case.key_dim ** -0.5, initial_state=h0,
                                    resets=resets)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case):
  q, k, v, g, h0, resets = _inputs(case)
  run = jax.jit(lambda q, k, v, g, h0: lt.linear_attention_forward(
      q, k, v, g, h0, resets, scale=case.key_dim ** -0.5, chunk_size=case.chunk_size,
      interpret=INTERPRET, block_sizes=case.blocks))
  out, final = run(q, k, v, g, h0)
  want_out, want_final = _reference(case, q, k, v, g, h0, resets)
  assert out.shape == want_out.shape and out.dtype == q.dtype
  assert final.shape == want_final.shape and final.dtype == jnp.float32
  tolerance = TOLERANCE[case.dtype]
  assert rel_err(out, want_out) < tolerance
  assert rel_err(final, want_final) < tolerance


def test_vector_gate_is_refused_by_name():
  case = Case()
  q, k, v, _, h0, resets = _inputs(case)
  g = jnp.zeros(v.shape[:3] + (case.key_dim,))
  with pytest.raises(NotImplementedError, match="vector gate"):
    lt.linear_attention_forward(q, k, v, g, h0, resets, scale=1.0, chunk_size=16,
                                interpret=INTERPRET)
