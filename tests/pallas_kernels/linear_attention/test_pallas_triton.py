"""The Pallas/Triton linear-attention kernels against the naive recurrence, forward and
gradients (q, k, v, log decay of every form, initial state), with random cotangents on
both the output and the final state.

Off GPU the kernels run in Pallas interpret mode; on a GPU the same tests run the compiled
Triton kernels (every size here is ≥ 16, as tl.dot needs). Interpret-mode programs are
compiled by XLA with backend optimisation off: it cuts the file's run time by half and
changes no result.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import chunked_plan as cp
from pallas_kernels.linear_attention import pallas_triton as pt
from pallas_kernels.linear_attention.chunked_plan import BlockSizes
from pallas_kernels.linear_attention.pallas_triton_gradients import log_decay_gradient
from pallas_kernels.linear_attention.reference import linear_attention_reference
from tests.utils import rel_err

RNG = np.random.default_rng(20251123)
INTERPRET = jax.default_backend() != "gpu"
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0} if INTERPRET else None
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
# The fixed decay's gradient is one sum over every token of terms of both signs, small
# next to its terms: it gets ten times the tolerance (seen: up to 5e-5 in float32).
FIXED_DECAY_SLACK = 10


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 2
  seq: int = 50
  heads: int = 2
  value_heads: int = 2
  key_dim: int = 16
  value_dim: int = 16
  gate: str = "scalar"  # "none", "fixed", "scalar" or "vector"
  max_decay: float = 0.5  # log decays are uniform in [-max_decay, 0]
  resets: bool = False
  dtype: str = "float32"
  chunk_size: int = 16
  blocks: BlockSizes = BlockSizes(16, 16)

  def __str__(self):
    pieces = f"-P{self.blocks.pieces}" if self.blocks.pieces else ""
    return (f"B{self.batch}-T{self.seq}-H{self.heads}:{self.value_heads}-K{self.key_dim}"
            f"-V{self.value_dim}-{self.gate}{self.max_decay:g}-{self.dtype}"
            f"-C{self.chunk_size}{pieces}" + ("-resets" if self.resets else ""))


CASES = [
    # Grouped heads, packed sequences, initial state, T not a multiple of the chunk.
    Case(seq=77, value_heads=4, resets=True),
    # Vector gate at -5 per token, two 16-row blocks per chunk, two key blocks of the
    # state, the sequence in two pieces.
    Case(key_dim=32, gate="vector", max_decay=5.0, resets=True, chunk_size=32,
         blocks=BlockSizes(16, 16, pieces=2)),
    # Vector gate, four 16-row blocks per chunk and a sequence shorter than one chunk.
    Case(batch=1, seq=40, heads=1, value_heads=1, gate="vector", resets=True, chunk_size=64),
    # Fixed decay (its gradient sums over batch and tokens), three pieces, value blocks.
    Case(batch=1, seq=77, heads=1, value_dim=32, gate="fixed", max_decay=5.0,
         blocks=BlockSizes(16, 16, pieces=3)),
    # The fused forward over three pieces, packed sequences crossing piece boundaries.
    Case(batch=1, seq=77, heads=1, value_heads=2, max_decay=2.0, resets=True,
         blocks=BlockSizes(16, 16, pieces=3)),
    Case(gate="none"),
    Case(seq=33, value_heads=4, gate="scalar", max_decay=5.0, resets=True, dtype="bfloat16"),
    Case(gate="vector", resets=True, dtype="bfloat16", chunk_size=32),
    # bf16 at chunk 64, key dim 16 (32 when compiled, where the chunk is then capped at
    # 32: `chunked_plan.VECTOR_16BIT_CHUNK`); the second chunk partial.
    Case(batch=1, seq=70, heads=1, value_heads=1, gate="vector", resets=True,
         dtype="bfloat16", chunk_size=64),
    Case(seq=33, key_dim=32, value_dim=32, dtype="float16", blocks=BlockSizes(16, 16, 4, 2, 2)),
    # The gradient kernel split over two value blocks (dq, dk, decay parts summed),
    # grouped heads, packed sequences; scalar and vector gates.
    Case(seq=45, value_heads=4, value_dim=32, resets=True, max_decay=5.0,
         blocks=BlockSizes(16, 16, gradient_block_v=16)),
    Case(seq=45, value_dim=32, gate="vector", resets=True, chunk_size=32,
         blocks=BlockSizes(16, 16, gradient_block_v=16)),
    # One 16-row block per chunk for a vector gate; grouped heads.
    Case(seq=37, value_heads=4, key_dim=32, gate="vector", max_decay=5.0, resets=True),
    # A single token.
    Case(seq=1, value_heads=4, gate="vector", resets=True),
    # Head dims that are not powers of two (zero-padded to 32 and 32).
    Case(seq=45, key_dim=24, value_dim=20, resets=True, max_decay=2.0),
    Case(seq=37, key_dim=20, value_dim=24, gate="vector", resets=True, chunk_size=32),
]


def _inputs(case):
  """Fresh random inputs and cotangents; NumPy draws them (eager jax.random would compile a
  program per call, which costs more here than the kernels)."""
  dtype = jnp.dtype(case.dtype)
  b, t, hk, hv, kd, vd = (case.batch, case.seq, case.heads, case.value_heads, case.key_dim,
                          case.value_dim)
  normal = lambda *shape: RNG.standard_normal(shape, np.float32)
  q, k = (jnp.asarray(normal(b, t, hk, kd), dtype) for _ in range(2))
  v = jnp.asarray(normal(b, t, hv, vd), dtype)
  shape = {"none": None, "fixed": (hv,), "scalar": (b, t, hv), "vector": (b, t, hv, kd)}
  shape = shape[case.gate]
  g = None if shape is None else jnp.asarray(
      RNG.uniform(-case.max_decay, 0.0, shape).astype(np.float32))
  h0 = jnp.asarray(normal(b, hv, kd, vd))
  resets = RNG.random((b, t)) < (0.08 if case.resets else 0.0)
  resets[0, 0] = case.resets  # row 0 drops its initial state: dh0 is zero there
  resets = jnp.asarray(resets)
  cotangents = (jnp.asarray(normal(b, t, hv, vd), dtype), jnp.asarray(normal(b, hv, kd, vd)))
  return (q, k, v, g, h0), resets, cotangents


def _kernel(case, resets, module=pt, interpret=INTERPRET):
  """`module.linear_attention` with the case's settings, as a function of (q, k, v, g, h0)."""
  def run(q, k, v, g, h0):
    return module.linear_attention(q, k, v, g, h0, resets, scale=case.key_dim ** -0.5,
                                   chunk_size=case.chunk_size, interpret=interpret,
                                   block_sizes=case.blocks)
  return run


def _reference(case, resets):
  """The recurrence in float32, decays of every form as per-token gates, heads repeated."""
  b, t, hv = case.batch, case.seq, case.value_heads
  r = hv // case.heads

  def run(q, k, v, g, h0):
    f32 = lambda x: x.astype(jnp.float32)
    if g is None:
      g = jnp.zeros((b, t, hv))
    elif g.ndim == 1:
      g = jnp.broadcast_to(g, (b, t, hv))
    q, k = (jnp.repeat(f32(x), r, axis=2) for x in (q, k))
    return linear_attention_reference(q, k, f32(v), log_decay=g, scale=case.key_dim ** -0.5,
                                      initial_state=h0, resets=resets)
  return run


def _value_and_grads(fn, args, cotangents):
  def run(args, cotangents):
    (out, final), vjp = jax.vjp(fn, *args)
    d_out, d_final = cotangents
    return out, final, vjp((d_out.astype(out.dtype), d_final))
  return jax.jit(run, compiler_options=COMPILER_OPTIONS)(args, cotangents)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_recurrence(case):
  _check_against_reference(case, *_inputs(case))


def test_vector_gate_chunks_factored_and_exact():
  """Vector-gate chunks on both sides of FACTORED_RANGE in one call: mild decay (factored
  form), strong decay in every channel, and strong decay in some channels only (the exact
  row-block form)."""
  check_vector_gate_chunks_factored_and_exact(_kernel)


def check_vector_gate_chunks_factored_and_exact(kernel):
  """The test above for kernel(case, resets) (other modules' kernels too)."""
  case = Case(batch=1, seq=48, gate="vector", chunk_size=16, resets=True)
  (q, k, v, g, h0), resets, cotangents = _inputs(case)
  strong = jnp.asarray(RNG.uniform(-10.0, -6.0, g.shape).astype(np.float32))
  some_channels = jnp.arange(case.key_dim) % 2 == 0
  g = jnp.concatenate([0.1 * g[:, :16], strong[:, 16:32],
                       jnp.where(some_channels, strong, g)[:, 32:]], axis=1)
  falls = (-g).reshape(1, 3, 16, case.value_heads, case.key_dim).sum(2).max(-1)
  assert bool((falls[:, 0] < cp.FACTORED_RANGE).all())
  assert bool((falls[:, 1:] > cp.FACTORED_RANGE).all())
  _check_against_reference(case, (q, k, v, g, h0), resets, cotangents, kernel=kernel)


def _check_against_reference(case, args, resets, cotangents, kernel=_kernel):
  """kernel(case, resets) gives the function under test (default: this file's kernels)."""
  out, final, grads = _value_and_grads(kernel(case, resets), args, cotangents)
  ref_out, ref_final, ref_grads = _value_and_grads(_reference(case, resets), args,
                                                   cotangents)
  tol = TOLERANCE[case.dtype]
  assert out.shape == ref_out.shape and out.dtype == jnp.dtype(case.dtype)
  assert final.shape == ref_final.shape and final.dtype == jnp.float32
  assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
  assert rel_err(final, ref_final) < tol, rel_err(final, ref_final)
  for name, x, g, want in zip(("dq", "dk", "dv", "dg", "dh0"), args, grads, ref_grads):
    if x is None:
      continue
    assert g.shape == x.shape and g.dtype == x.dtype, name
    limit = tol * FIXED_DECAY_SLACK if name == "dg" and case.gate == "fixed" else tol
    assert rel_err(g, want) < limit, (name, rel_err(g, want))


def test_packed_sequences_equal_separate_runs():
  """Two sequences packed into one row (a reset between) give what each gives alone; the
  initial state reaches the first only."""
  case = Case(batch=1, seq=48, gate="vector", chunk_size=32, resets=True)
  (q, k, v, g, h0), _, _ = _inputs(case)
  resets = jnp.zeros((1, 48), bool).at[0, 24].set(True)
  out, final = jax.jit(_kernel(case, resets), compiler_options=COMPILER_OPTIONS)(
      q, k, v, g, h0)
  halves = lambda x: jnp.concatenate([x[:, :24], x[:, 24:]], axis=0)
  alone = dataclasses.replace(case, batch=2, seq=24)
  h0s = jnp.concatenate([h0, jnp.zeros_like(h0)], axis=0)
  out2, final2 = jax.jit(_kernel(alone, jnp.zeros((2, 24), bool)),
                         compiler_options=COMPILER_OPTIONS)(*map(halves, (q, k, v, g)), h0s)
  assert rel_err(halves(out), out2) < 1e-5
  assert rel_err(final, final2[1:]) < 1e-5


def decay_gradient_parts(vector, batch=2, seq=48, heads=2, key_dim=16, chunk=16):
  """Random decay-gradient parts (d_b, d_keys, b, through, resets, rel) with resets, one
  chunk of row 0 without one."""
  shape = (batch, seq, heads) + ((key_dim,) if vector else ())
  d_b, d_keys = (RNG.standard_normal(shape).astype(np.float32) for _ in range(2))
  b = -RNG.uniform(0.0, 3.0, shape).astype(np.float32)
  through = RNG.standard_normal((batch, heads, seq // chunk, key_dim)).astype(np.float32)
  resets = RNG.random((batch, seq)) < 0.15
  resets[0, :chunk] = False  # one chunk without a reset
  rel = np.cumsum(resets.reshape(batch, -1, chunk), axis=2).reshape(batch, seq)
  return d_b, d_keys, b, through, resets, rel


def decay_gradient_by_definition(d_b, d_keys, b, through, resets, rel, chunk):
  """dL/dg from the parts by a loop over the definition of
  `pallas_triton_gradients._decay_gradient_kernel`."""
  batch, seq, heads = d_b.shape[:3]
  want = np.zeros(d_b.shape, np.float32)
  for n, h, c in np.ndindex(batch, heads, seq // chunk):
    rows = range(c * chunk, (c + 1) * chunk)
    last = rel[n, rows[-1]]
    spans = through[n, h, c] if d_b.ndim == 4 else through[n, h, c].sum()
    for t in rows:
      if not resets[n, t]:
        want[n, t, h] = sum(d_b[n, u, h] for u in rows if u >= t and rel[n, u] == rel[n, t])
      if rel[n, t] == last and not resets[n, t]:
        want[n, t, h] += sum((d_keys[n, u, h] for u in rows if u < t and rel[n, u] == last),
                             np.zeros_like(spans))
        if last == 0:
          want[n, t, h] += np.exp(b[n, rows[-1], h]) * spans
  return want


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_decay_gradient_sums_within_runs(vector):
  """The per-chunk sums of the decay gradient against a loop over its definition, on
  arbitrary parts: from the gradient kernel the parts of a run after a reset sum to zero,
  so the end-to-end tests cannot see the runs; here they can."""
  batch, seq, heads, key_dim, chunk = 2, 48, 2, 16, 16
  plan = cp.make_plan(batch, seq, heads, key_dim, key_dim, jnp.float32, vector, 1.0,
                      chunk, BlockSizes(16, 16), INTERPRET)
  d_b, d_keys, b, through, resets, rel = decay_gradient_parts(vector)
  got = jax.jit(lambda *a: log_decay_gradient(*a, plan),
                compiler_options=COMPILER_OPTIONS)(
                    jnp.asarray(b), jnp.asarray(rel, jnp.int32), jnp.asarray(resets),
                    jnp.asarray(d_b), jnp.asarray(d_keys), jnp.asarray(through))
  want = decay_gradient_by_definition(d_b, d_keys, b, through, resets, rel, chunk)
  assert rel_err(got, want) < 1e-5


def test_unsupported_arguments_raise_not_implemented():
  q = jnp.zeros((1, 8, 1, 16))
  v, h0, resets = jnp.zeros((1, 8, 1, 24)), jnp.zeros((1, 1, 16, 24)), jnp.zeros((1, 8), bool)
  call = lambda q, v, h0, **kw: pt.linear_attention(q, q, v, None, h0, resets, scale=1.0,
                                                    **{"chunk_size": 16, **kw})
  with pytest.raises(NotImplementedError, match="chunk_size=24"):
    call(q, v[..., :16], h0[..., :16], chunk_size=24, interpret=True)


def test_head_dims_are_padded_to_what_triton_tiles_take():
  assert [cp.padded_dim(d, interpret=True) for d in (1, 8, 16, 24, 80, 96)] == [
      1, 8, 16, 32, 128, 128]
  assert [cp.padded_dim(d, interpret=False) for d in (8, 16, 24)] == [16, 16, 32]
  assert cp.padded_dim(16, interpret=False, vector=True) == 32  # bf16 wrong at 16 on H100


def test_default_block_sizes_come_from_the_table():
  for key_dim, value_dim, dtype, vector in [
      (64, 64, jnp.bfloat16, False), (128, 128, jnp.float32, False),
      (128, 256, jnp.float16, False), (16, 32, jnp.float32, True),
      (128, 128, jnp.bfloat16, True), (64, 64, jnp.bfloat16, True)]:
    blocks = BlockSizes.get_default(key_dim, value_dim, dtype, vector)
    for block, dim in ((blocks.block_k, key_dim), (blocks.block_v, value_dim)):
      assert block <= dim and dim % block == 0 and block & (block - 1) == 0
    assert blocks.pieces is None
    assert value_dim % blocks.gradient_block_v == 0 and blocks.gradient_num_warps in (4, 8)


def test_sequence_pieces_only_when_few_programs():
  plan = lambda batch, heads, seq: cp.make_plan(
      batch, seq, heads, 128, 128, jnp.bfloat16, False, 1.0, 64, None, False)
  few = plan(1, 2, 65536)  # 2 × 2 × 2 state tiles: the sequence is cut.
  assert few.pieces > 1 and few.chunks_per_piece >= cp.MIN_PIECE_CHUNKS
  assert few.pieces * few.chunks_per_piece * 64 >= 65536
  assert plan(8, 16, 65536).pieces == 1  # 512 programs already
  assert plan(1, 2, 128).pieces == 1  # too short to cut


def test_vmap_and_remat():
  case = Case(seq=20, gate="vector", resets=True)
  args, resets, (d_out, _) = _inputs(case)
  kernel = _kernel(case, resets)
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0] * d_out)
  plain = jax.jit(jax.grad(loss(kernel), range(5)), compiler_options=COMPILER_OPTIONS)(*args)

  def per_example(q, k, v, g, h0, r):
    return pt.linear_attention(q[None], k[None], v[None], g[None], h0[None], r[None],
                               scale=case.key_dim ** -0.5, chunk_size=case.chunk_size,
                               interpret=INTERPRET, block_sizes=case.blocks)[0][0]

  mapped = lambda *a: (jax.vmap(per_example)(*a, resets),)
  mapped = jax.jit(jax.grad(loss(jax.checkpoint(mapped)), range(5)),
                   compiler_options=COMPILER_OPTIONS)(*args)
  for a, b in zip(plain, mapped):
    assert rel_err(a, b) < 1e-6
