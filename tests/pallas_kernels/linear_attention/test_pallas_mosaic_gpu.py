"""`pallas_kernels.linear_attention.pallas_mosaic_gpu` (the forward, the state passes and
the gradient kernel; the decay gradient's sums in XLA) in JAX's Mosaic GPU
interpreter (CPU), against the naive recurrence: output, final state and the gradients of
q, k, v, log decay and initial state.

The interpreter runs the kernel's warpgroups, shared memory, TMA copies and mbarriers as
written, but its matmuls as plain dots of the same tiles (`_matmuls`). The same cases run
compiled, wgmma included, on a Hopper GPU (`gpu_only`: `JAX_PLATFORMS=cuda pytest -m
gpu_only ...`).
"""

import dataclasses
import functools
import types

import jax.numpy as jnp
import pytest

from pallas_kernels.linear_attention import pallas_mosaic_gpu as pm
from pallas_kernels.linear_attention import pallas_mosaic_gpu_gradients as pmg
from tests.pallas_kernels.linear_attention import test_pallas_triton as triton_tests
from tests.pallas_kernels.linear_attention.test_pallas_triton import Case
from tests.utils import rel_err


@dataclasses.dataclass(frozen=True)
class MosaicCase(Case):
  chunk_size: int = 64
  blocks: pm.BlockSizes = pm.BlockSizes()

  def __str__(self):
    return super().__str__().replace("-C64", "")


CASES = [
    # Grouped value heads, two compute warpgroups (V 128), packed sequences, two pieces,
    # T not a multiple of the chunk.
    MosaicCase(batch=1, seq=150, heads=1, value_heads=2, key_dim=64, value_dim=128,
               gate="scalar", max_decay=2.0, resets=True, dtype="bfloat16",
               blocks=pm.BlockSizes(pieces=2)),
    # Fixed decay, K 128 (the state's 128 rows) and one compute warpgroup (V 64), float16.
    MosaicCase(batch=2, seq=130, heads=2, value_heads=2, key_dim=128, value_dim=64,
               gate="fixed", max_decay=1.0, dtype="float16"),
    # Weak decay over four chunks: the chunk states (forward and reverse state passes)
    # carry most of every gradient. One CTA per 64 value columns, two pieces.
    MosaicCase(batch=1, seq=256, heads=2, value_heads=2, key_dim=64, value_dim=128,
               gate="scalar", max_decay=0.02, dtype="bfloat16",
               blocks=pm.BlockSizes(pieces=2, value_blocks=2)),
    # No decay; a sequence shorter than one chunk; three slots.
    MosaicCase(batch=1, seq=40, heads=1, value_heads=1, key_dim=64, value_dim=64,
               gate="none", dtype="bfloat16", blocks=pm.BlockSizes(slots=3)),
    # Vector gate, factored (chunks fall by at most 32 nats): grouped value heads, two
    # compute warpgroups, packed sequences, two pieces; the backward's per-chunk
    # gradients are the Triton-language kernels' (Triton's interpreter here).
    MosaicCase(batch=1, seq=150, heads=1, value_heads=2, key_dim=64, value_dim=128,
               gate="vector", max_decay=0.5, resets=True, dtype="bfloat16",
               blocks=pm.BlockSizes(pieces=2)),
    # Vector gate too steep to factor (chunks fall by about 96 nats): the whole call runs
    # the Triton-language kernels' exact form.
    MosaicCase(batch=1, seq=100, heads=1, value_heads=1, key_dim=64, value_dim=64,
               gate="vector", max_decay=3.0, resets=True, dtype="bfloat16"),
]


def _check(case, interpret):
  triton_tests._check_against_reference(
      case, *triton_tests._inputs(case),
      kernel=functools.partial(triton_tests._kernel, module=pm, interpret=interpret))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_recurrence(case):
  _check(case, True)


@pytest.mark.gpu_only
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiled_matches_recurrence_on_hopper(case):
  _check(case, False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.float32), "dtype"),
    (dict(key_dim=32), "key_dim"),
    (dict(chunk_size=128), "chunk_size"),
    (dict(vector=True, dtype=jnp.float16), "vector gate.*bfloat16 only"),
    (dict(seq=0), "seq=0"),
])
def test_unsupported_inputs_raise_not_implemented(kwargs, match):
  seq, key_dim = kwargs.get("seq", 8), kwargs.get("key_dim", 64)
  dtype = kwargs.get("dtype", jnp.bfloat16)
  q = jnp.zeros((1, seq, 2, key_dim), dtype)
  v = jnp.zeros((1, seq, 2, 64), dtype)
  g = jnp.zeros((1, seq, 2, key_dim)) if kwargs.get("vector") else None
  with pytest.raises(NotImplementedError, match=match):
    pm.linear_attention(q, q, v, g, jnp.zeros((1, 2, key_dim, 64)), jnp.zeros((1, seq), bool),
                        scale=1.0, chunk_size=kwargs.get("chunk_size", 64), interpret=True)


def test_vector_gate_is_factored_only_where_every_chunk_falls_at_most_60():
  """The check that picks the factored kernels or the exact fallback: per 64-token chunk
  and channel, the summed log decay against −60; chunk boundaries count."""
  pmv = pytest.importorskip("pallas_kernels.linear_attention.pallas_mosaic_gpu_vector")
  g = jnp.full((1, 128, 2, 4), -0.5)  # 32 nats per chunk
  assert pmv.factored(g)
  # One channel of the second chunk falls 31.5 + 40 nats.
  assert not pmv.factored(g.at[0, 70, 1, 3].set(-40.0))
  # A token each side of the chunk boundary: 31.5 + 28 = 59.5 nats per chunk fit, with
  # 29 (60.5) they do not, though 58 nats over the two tokens would in one chunk.
  assert pmv.factored(g.at[0, 63, 0, 0].set(-28.0).at[0, 64, 0, 0].set(-28.0))
  assert not pmv.factored(g.at[0, 63, 0, 0].set(-29.0).at[0, 64, 0, 0].set(-29.0))
  # A partial last chunk (seq 100: 36 tokens) is padded with no decay: 17.5 + 43 > 60.
  assert not pmv.factored(jnp.full((1, 100, 1, 1), -0.5).at[0, 90, 0, 0].set(-43.0))
  assert pmv.factored(jnp.full((1, 100, 1, 1), -0.5).at[0, 90, 0, 0].set(-42.0))


def test_decay_gradient_sums_within_runs():
  """The XLA decay-gradient sums of the Mosaic GPU path against their definition, with
  runs after resets (which the end-to-end tests cannot see)."""
  parts = triton_tests.decay_gradient_parts(vector=False, chunk=64, seq=128)
  d_b, d_keys, b, through, resets, rel = parts
  plan = types.SimpleNamespace(chunk=64)
  got = pmg.decay_gradient(jnp.asarray(b), jnp.asarray(rel, jnp.int32), jnp.asarray(resets),
                           jnp.asarray(d_b), jnp.asarray(d_keys), jnp.asarray(through), plan)
  want = triton_tests.decay_gradient_by_definition(*parts, chunk=64)
  assert rel_err(got, want) < 1e-5


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="slots"):
    pm.BlockSizes(slots=1)
  with pytest.raises(ValueError, match="pieces"):
    pm.BlockSizes(pieces=0)
  with pytest.raises(ValueError, match="value_blocks"):
    pm.BlockSizes(value_blocks=0)
