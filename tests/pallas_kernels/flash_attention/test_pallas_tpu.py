"""The Mosaic TPU flash-attention kernel against the XLA reference, forward and gradients.

Off TPU the kernels run in TPU interpret mode with uninitialised memory poisoned with NaN and
race detection on, so a read of memory the kernel never wrote shows up as NaN. On a TPU the
same tests run the compiled kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attn_jax.ops.attention import dot_product_attention
from pallas_kernels.flash_attention import pallas_tpu
from pallas_kernels.flash_attention.mask import AttentionMask
from pallas_kernels.flash_attention.pallas_tpu import BlockSizes
from tests.utils import rel_err

ON_TPU = jax.default_backend() == "tpu"
INTERPRET = False if ON_TPU else pltpu.InterpretParams(uninitialized_memory="nan",
                                                       detect_races=True)
# The interpreted kernels are large CPU programs; optimising them costs more than it saves.
_FAST_COMPILE = None if ON_TPU else {"xla_backend_optimization_level": 0,
                                     "xla_llvm_disable_expensive_passes": True}
SMALL = BlockSizes()  # 128 everywhere: several blocks per axis at these lengths


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int = 1
  q_len: int = 200
  kv_len: int = 200
  q_heads: int = 2
  kv_heads: int = 2
  head_dim: int = 64
  v_dim: int | None = None
  dtype: str = "float32"
  causal: bool = False
  window: tuple[int | None, int | None] = (None, None)
  segments: bool = False  # packed sequences, some query segments absent from the keys
  soft_cap: float | None = None
  sinks: bool = False
  blocks: BlockSizes | None = SMALL

  def __str__(self):
    parts = [f"B{self.batch}-Tq{self.q_len}-Tk{self.kv_len}-H{self.q_heads}:{self.kv_heads}"
             f"-D{self.head_dim}" + (f"-Dv{self.v_dim}" if self.v_dim else ""), self.dtype]
    parts += [name for name, on in (("causal", self.causal), ("seg", self.segments),
                                    ("sinks", self.sinks)) if on]
    if self.window != (None, None):
      parts.append(f"w{self.window[0]},{self.window[1]}")
    if self.soft_cap:
      parts.append(f"cap{self.soft_cap:g}")
    if self.blocks is None:
      parts.append("default-blocks")
    elif self.blocks != SMALL:
      parts.append("mixed-blocks")
    return "-".join(parts)


GRAD_CASES = [
    # float32: tight tolerances.
    Case(batch=2, kv_heads=1, causal=True),
    Case(q_len=130, kv_len=300, q_heads=2, kv_heads=1, head_dim=128, sinks=True,
         soft_cap=5.0),
    Case(q_len=300, kv_len=270, v_dim=128, window=(64, 32),
         blocks=BlockSizes(128, 256, 256, 128, 128, 256)),
    Case(q_len=260, kv_len=140, causal=True, window=(30, None)),  # 120 rows see no key
    Case(q_len=200, kv_len=200, q_heads=4, kv_heads=1, causal=True, segments=True,
         sinks=True),  # queries of a segment no key has see only the sink
    Case(q_len=300, kv_len=300, q_heads=1, kv_heads=1, head_dim=192, causal=True,
         window=(100, None), blocks=None),  # head_dim padded to 256 inside
    # bfloat16: compared with the float32 reference on the same (rounded) inputs.
    Case(q_len=256, kv_len=256, q_heads=4, head_dim=128, dtype="bfloat16", causal=True,
         segments=True, soft_cap=10.0, sinks=True),
    Case(q_len=100, kv_len=200, q_heads=2, kv_heads=1, head_dim=256, dtype="bfloat16",
         window=(20, 20)),
    Case(q_len=64, kv_len=300, q_heads=4, kv_heads=1, dtype="bfloat16", causal=True),
]


def _inputs(case, seed=0):
  # numpy draws: jax.random would compile once per new shape, which dominates small tests.
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(case.dtype)
  v_dim = case.v_dim or case.head_dim
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q = normal(case.batch, case.q_len, case.q_heads, case.head_dim).astype(dtype)
  k = normal(case.batch, case.kv_len, case.kv_heads, case.head_dim).astype(dtype)
  v = normal(case.batch, case.kv_len, case.kv_heads, v_dim).astype(dtype)
  sinks = normal(case.q_heads) if case.sinks else None
  seg = None
  if case.segments:
    # Keys hold segments 0..3 in runs; queries also use segment 7, which no key has.
    kv_seg = np.sort(rng.integers(0, 4, (case.batch, case.kv_len)), axis=1)
    q_seg = np.sort(rng.integers(0, 5, (case.batch, case.q_len)), axis=1)
    seg = (jnp.asarray(np.where(q_seg == 4, 7, q_seg), jnp.int32),
           jnp.asarray(kv_seg, jnp.int32))
  return (q, k, v, sinks), seg


def _attention(case, seg, impl):
  """(q, k, v, sinks) -> (out, lse) through the kernel or the XLA reference."""
  q_seg, kv_seg = seg if seg is not None else (None, None)
  scale = case.head_dim ** -0.5

  mask = AttentionMask.create(case.q_len, case.kv_len, is_causal=case.causal,
                              local_window_size=case.window, has_segments=seg is not None)

  def kernel(q, k, v, sinks):
    return pallas_tpu.flash_attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=sinks, mask=mask,
        scale=scale, logits_soft_cap=case.soft_cap, return_residuals=True,
        block_sizes=case.blocks, interpret=INTERPRET)

  def reference(q, k, v, sinks):
    return dot_product_attention(
        q, k, v, scale=scale, is_causal=case.causal, local_window_size=case.window,
        q_segment_ids=q_seg, kv_segment_ids=kv_seg, logits_soft_cap=case.soft_cap,
        sinks=sinks, return_residuals=True, implementation="xla")

  return kernel if impl == "kernel" else reference


def _forward_and_grads(fn, args, cotangents):
  diff = tuple(i for i, a in enumerate(args) if a is not None)

  def run(*diff_args):
    full = list(args)
    for i, a in zip(diff, diff_args):
      full[i] = a
    return fn(*full)

  (out, lse), vjp = jax.vjp(run, *(args[i] for i in diff))
  return out, lse, vjp(cotangents)


def _check(name, got, want, f32):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  if f32:
    np.testing.assert_allclose(got, want, atol=2e-5 * (1 + np.abs(want).max()), rtol=1e-4,
                               err_msg=name)
  else:
    err = rel_err(got, want)
    assert err < 1e-2, f"{name}: rms-relative error {err:.3g} against float32 reference"


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_forward_and_gradients_match_xla(case):
  (q, k, v, sinks), seg = _inputs(case)
  f32 = case.dtype == "float32"
  rng = np.random.default_rng(1)
  d_out = jnp.asarray(rng.standard_normal(
      (case.batch, case.q_len, case.q_heads, case.v_dim or case.head_dim), np.float32),
      q.dtype)
  d_lse = jnp.asarray(rng.standard_normal((case.batch, case.q_heads, case.q_len),
                                          np.float32))

  args = (q, k, v, sinks)
  kernel = jax.jit(lambda *a: _forward_and_grads(_attention(case, seg, "kernel"), a,
                                                  (d_out, d_lse)))
  got = kernel.lower(*args).compile(_FAST_COMPILE)(*args)
  # The reference runs in float32 on the same inputs, so bf16 checks see only kernel error.
  up = lambda x: None if x is None else x.astype(jnp.float32)
  want = jax.jit(lambda *a: _forward_and_grads(_attention(case, seg, "reference"), a,
                                                (up(d_out), d_lse)))(*map(up, args))

  out, lse, grads = got
  want_out, want_lse, want_grads = want
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  _check("out", out, want_out, f32)
  dead = np.isneginf(np.asarray(want_lse))
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), dead, err_msg="lse -inf rows")
  _check("lse", np.where(dead, 0.0, lse), np.where(dead, 0.0, want_lse), f32)
  for name, g, w in zip(("dq", "dk", "dv", "dsinks"), grads, want_grads):
    assert g.dtype == (jnp.float32 if name == "dsinks" else q.dtype), name
    _check(name, g, w, f32)


def test_empty_key_sequence():
  case = Case(q_len=5, kv_len=0, sinks=True)
  (q, k, v, sinks), _ = _inputs(case)
  out, lse = _attention(case, None, "kernel")(q, k, v, sinks)
  assert out.shape == (1, 5, 2, 64) and np.all(np.asarray(out) == 0)
  np.testing.assert_array_equal(lse, jnp.broadcast_to(sinks[None, :, None], (1, 2, 5)))


def test_without_residuals_matches_with():
  case = Case(q_len=130, kv_len=130, causal=True)
  (q, k, v, _), _ = _inputs(case)
  out = jax.jit(lambda q, k, v: pallas_tpu.flash_attention(
      q, k, v, mask=AttentionMask(130, 130, right=0), scale=0.125, logits_soft_cap=None,
      return_residuals=False, interpret=INTERPRET))(q, k, v)
  want = dot_product_attention(q, k, v, scale=0.125, is_causal=True, implementation="xla")
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,v_dim,dtype,causal,window,segments,sinks", [
    (64, 64, "bfloat16", True, (100, None), True, True),
    (128, 128, "float32", False, (None, None), False, False),
    (256, 256, "bfloat16", False, (30, 40), False, True),
    (192, 192, "float32", True, (None, None), False, False),
    (32, 96, "bfloat16", True, (None, None), True, False),
])
def test_forward_and_backward_lower_for_tpu(head_dim, v_dim, dtype, causal, window,
                                            segments, sinks):
  """Pallas -> Mosaic TPU lowering (block shapes, primitives) is checked without a TPU."""
  case = Case(q_len=200, kv_len=300, q_heads=4, head_dim=head_dim, v_dim=v_dim, dtype=dtype,
              causal=causal, window=window, segments=segments, sinks=sinks, soft_cap=5.0,
              blocks=None)
  (q, k, v, s), seg = _inputs(case)
  q_seg, kv_seg = seg if seg else (None, None)

  mask = AttentionMask.create(200, 300, is_causal=causal, local_window_size=window,
                              has_segments=segments)

  def loss(q, k, v, s):
    out, lse = pallas_tpu.flash_attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, sinks=s, mask=mask, scale=0.1,
        logits_soft_cap=5.0, return_residuals=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v, s).lower(
      lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3  # fwd, dq, dkv


def test_vmap_lowers_for_tpu():
  """vmap adds a grid axis in front; Mosaic lowering must take it.

  Lowering only: JAX 0.11.2's TPU interpret mode fails on a vmapped pallas_call that sets
  dimension_semantics (it zips the vmapped grid with the unvmapped semantics).
  """
  case = Case(q_len=130, kv_len=130, causal=True)
  (q, k, v, _), _ = _inputs(case)
  fn = lambda q, k, v: pallas_tpu.flash_attention(
      q, k, v, mask=AttentionMask(130, 130, right=0), scale=0.125, logits_soft_cap=None,
      return_residuals=False)
  loss = lambda q, k, v: jnp.sum(jax.vmap(fn)(q, k, v))
  stacked = [jnp.stack([x, x]) for x in (q, k, v)]
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*stacked).lower(
      lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3


def test_default_block_sizes():
  assert BlockSizes.get_default(128, jnp.bfloat16) == BlockSizes(512, 512, 256, 512, 512, 256)
  assert BlockSizes.get_default(64, jnp.float32).block_q == 256
  assert BlockSizes.get_default(512, jnp.bfloat16) == BlockSizes()


def test_errors_name_the_argument():
  q = jnp.zeros((1, 8, 2, 64), jnp.float16)
  with pytest.raises(NotImplementedError, match="query dtype"):
    pallas_tpu.flash_attention(q, q, q, mask=AttentionMask(8, 8), scale=1.0,
                               logits_soft_cap=None, return_residuals=False)
  with pytest.raises(ValueError, match="block_kv_dq"):
    BlockSizes(block_kv_dq=100)
  q = q.astype(jnp.float32)
  with pytest.raises(ValueError, match="sinks"):
    pallas_tpu.flash_attention(q, q, q, sinks=jnp.zeros(3), mask=AttentionMask(8, 8),
                               scale=1.0, logits_soft_cap=None, return_residuals=False)
