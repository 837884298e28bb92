"""The Mosaic TPU linear-attention kernel against the naive recurrence, forward and gradients.

Off TPU the kernels run in TPU interpret mode with uninitialised memory poisoned with NaN
(a read of memory the kernel never wrote shows up as NaN) and race detection on. On a TPU
the same tests run the compiled kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_attention import pallas_tpu
from pallas_kernels.linear_attention.pallas_tpu import BlockSizes
from pallas_kernels.linear_attention.reference import linear_attention_reference
from tests.utils import fresh_keys, normal, rel_err

ON_TPU = jax.default_backend() == "tpu"
INTERPRET = False if ON_TPU else pltpu.InterpretParams(uninitialized_memory="nan",
                                                       detect_races=True)
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 2
  seq: int = 37
  heads: int = 1
  value_heads: int = 2
  key_dim: int = 16
  value_dim: int = 32
  gate: str = "scalar"  # "none", "fixed", "scalar" or "vector"
  max_decay: float = 0.5  # log decays are uniform in [-max_decay, 0] per token
  resets: bool = True
  dtype: str = "float32"
  chunk_size: int = 16
  blocks: BlockSizes | None = None

  def __str__(self):
    return (f"B{self.batch}-T{self.seq}-H{self.heads}:{self.value_heads}-K{self.key_dim}"
            f"-V{self.value_dim}-{self.gate}{self.max_decay:g}-{self.dtype}-C"
            f"{self.blocks.chunk if self.blocks else self.chunk_size}"
            + ("-resets" if self.resets else ""))


CASES = [
    Case(gate="none", heads=2, value_heads=2, resets=False),
    Case(gate="fixed", seq=9),  # shorter than one chunk
    Case(gate="scalar", seq=45, max_decay=5.0),
    Case(gate="vector", max_decay=5.0, blocks=BlockSizes(chunk=16, subchunk=8)),
    Case(gate="scalar", seq=40, dtype="bfloat16", max_decay=5.0),
    Case(gate="vector", seq=33, dtype="bfloat16", blocks=BlockSizes(chunk=16, subchunk=8)),
]


def _inputs(case):
  ks = fresh_keys(8)
  b, t, hk, hv, kd, vd = (case.batch, case.seq, case.heads, case.value_heads,
                          case.key_dim, case.value_dim)
  dtype = jnp.dtype(case.dtype)
  q, k = normal(ks[0], (b, t, hk, kd), dtype), normal(ks[1], (b, t, hk, kd), dtype)
  v = normal(ks[2], (b, t, hv, vd), dtype)
  shape = {"none": None, "fixed": (hv,), "scalar": (b, t, hv), "vector": (b, t, hv, kd)}
  log_decay = None
  if case.gate != "none":
    log_decay = -case.max_decay * jax.random.uniform(ks[3], shape[case.gate])
  s0 = normal(ks[4], (b, hv, kd, vd))
  resets = np.zeros((b, t), bool)
  if case.resets:
    resets = np.array(jax.random.uniform(ks[5], (b, t)) < 0.1)
    resets[0, min(16, t - 1)] = True  # one on a chunk boundary
  cotangents = (normal(ks[6], (b, t, hv, vd)), normal(ks[7], (b, hv, kd, vd)))
  return (q, k, v, log_decay, s0), jnp.asarray(resets), cotangents


def _kernel(case, resets):
  def fn(q, k, v, log_decay, s0):
    return pallas_tpu.linear_attention(
        q, k, v, log_decay, s0, resets, scale=case.key_dim ** -0.5,
        chunk_size=case.chunk_size, interpret=INTERPRET, block_sizes=case.blocks)
  return fn


def _reference(case, resets):
  def fn(q, k, v, log_decay, s0):
    b, t, hv = v.shape[:3]
    r = hv // q.shape[2]
    q, k = (jnp.repeat(x, r, axis=2) for x in (q, k))
    if log_decay is None:
      log_decay = jnp.zeros((b, t, hv))
    elif log_decay.ndim == 1:
      log_decay = jnp.broadcast_to(log_decay, (b, t, hv))
    return linear_attention_reference(q, k, v, log_decay=log_decay,
                                      scale=case.key_dim ** -0.5, initial_state=s0,
                                      resets=resets)
  return fn


def _forward_and_grads(fn, args, cotangents):
  (out, final), vjp = jax.vjp(fn, *args)
  grads = vjp((cotangents[0].astype(out.dtype), cotangents[1]))
  return out, final, grads


def _assert_no_races():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # noqa: PLC0415
  races = getattr(interpret_pallas_call, "races", None)
  assert races is None or not races.races_found


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_reference(case):
  args, resets, cotangents = _inputs(case)
  out, final, grads = jax.jit(
      lambda *a: _forward_and_grads(_kernel(case, resets), a, cotangents))(*args)
  if not ON_TPU:
    _assert_no_races()  # of the backward kernel, the last one to run
  assert out.dtype == args[0].dtype and final.dtype == jnp.float32
  f32_args = [None if x is None else x.astype(jnp.float32) for x in args]
  want = jax.jit(lambda *a: _forward_and_grads(_reference(case, resets), a, cotangents))(
      *f32_args)
  tol = TOLERANCE[case.dtype]
  names = ["out", "final_state", "dquery", "dkey", "dvalue", "dlog_decay", "dinitial_state"]
  for name, got, ref in zip(names, (out, final, *grads), (want[0], want[1], *want[2])):
    if ref is None:
      assert got is None, name
      continue
    assert got.shape == ref.shape, name
    err = rel_err(got, ref)
    assert err < tol, f"{name}: RMS-relative error {err:.2e} ≥ {tol:.0e}"


def test_forward_alone_and_chunk_independence():
  """The forward kernel without saved states; the result does not depend on the chunk."""
  case = Case(gate="vector", seq=50, max_decay=2.0)
  args, resets, _ = _inputs(case)
  outs = [jax.jit(_kernel(dataclasses.replace(case, blocks=blocks), resets))(*args)
          for blocks in (BlockSizes(16, 8), BlockSizes(32, 16))]
  if not ON_TPU:
    _assert_no_races()
  want_out, want_final = _reference(case, resets)(*args)
  for out, final in outs:
    assert rel_err(out, want_out) < 2e-5 and rel_err(final, want_final) < 2e-5


@pytest.mark.parametrize("gate,dtype,key_dim,value_dim", [
    ("vector", "bfloat16", 128, 128),
    ("scalar", "float32", 64, 128),
    ("fixed", "bfloat16", 64, 64),
    ("none", "float32", 32, 96),
])
def test_forward_and_backward_lower_for_tpu(gate, dtype, key_dim, value_dim):
  """Pallas -> Mosaic TPU lowering (block shapes, primitives) is checked without a TPU."""
  case = Case(batch=1, seq=200, heads=1, value_heads=2, key_dim=key_dim,
              value_dim=value_dim, gate=gate, dtype=dtype, chunk_size=64)
  args, resets, _ = _inputs(case)
  argnums = (0, 1, 2, 4) if gate == "none" else (0, 1, 2, 3, 4)

  def loss(q, k, v, log_decay, s0):
    out, final = pallas_tpu.linear_attention(q, k, v, log_decay, s0, resets, scale=0.1,
                                             chunk_size=64)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

  lowered = jax.jit(jax.grad(loss, argnums=argnums)).trace(*args).lower(
      lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 2  # forward, backward


def test_default_block_sizes():
  get = BlockSizes.get_default
  assert get(chunk_size=64, seq_len=4096, head_dim=128, vector_gate=False) == BlockSizes(64)
  assert get(chunk_size=1000, seq_len=4096, head_dim=128, vector_gate=False).chunk == 256
  assert get(chunk_size=256, seq_len=4096, head_dim=128, vector_gate=True).chunk == 64
  assert get(chunk_size=20, seq_len=4096, head_dim=64, vector_gate=True).chunk == 32
  assert get(chunk_size=64, seq_len=5, head_dim=64, vector_gate=False).chunk == 16


def test_errors_name_the_argument():
  q = jnp.zeros((1, 8, 2, 16), jnp.float16)
  s0 = jnp.zeros((1, 2, 16, 16))
  call = lambda q, log_decay=None: pallas_tpu.linear_attention(
      q, q, q, log_decay, s0, None, scale=1.0, chunk_size=16, interpret=INTERPRET)
  with pytest.raises(NotImplementedError, match="query dtype"):
    call(q)
  with pytest.raises(NotImplementedError, match="log_decay shape"):
    call(q.astype(jnp.float32), jnp.zeros((1, 8)))
  with pytest.raises(NotImplementedError, match="key_dim"):
    big = jnp.zeros((1, 8, 1, 512))
    pallas_tpu.linear_attention(big, big, big, None, None, None, scale=1.0, chunk_size=16)
  with pytest.raises(ValueError, match="chunk"):
    BlockSizes(chunk=24)
