"""Tile arithmetic shared by the Pallas Triton linear-attention kernels (`pallas_triton`'s
forward and state passes, `pallas_triton_gradients`' gradients): dots in the inputs'
dtype, the masks of one chunk's runs, the vector gate's exact and reference-point forms,
and the launch of a kernel under a `chunked_plan.Plan`.

Notation as `pallas_triton`: b the cumulative log decay inside a chunk (`[C, K]` for a
vector gate, `[C]` for a scalar one), rel each token's run within its chunk.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear_attention.chunked_plan import FACTORED_RANGE


def dot(a, b, dims, dtype):
  """a·b ("nn"), a·bᵀ ("nt") or aᵀ·b ("tn") with operands in `dtype`, f32 accumulation."""
  contract = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}[dims]
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def gate(b_ref, rows):
  """Cumulative log decay of `rows` as `[n, K]` (vector gate) or `[n, 1]` (scalar)."""
  return b_ref[rows, :] if len(b_ref.shape) == 2 else b_ref[rows][:, None]


def iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def pairs(rel, strict=False):
  """[C, C] bool over a whole chunk: key j reaches query i (j ≤ i, or j < i if strict)
  within one run."""
  rows, cols = iota((rel.shape[0], 1), 0), iota((1, rel.shape[0]), 1)
  return ((rows > cols) if strict else (rows >= cols)) & (rel[:, None] == rel[None, :])


def scalar_scores(q, b, rel, k, b_all):
  """Σ_k q_ik k_jk e^{b_i − b_j} for j ≤ i in one run, and the decays; the whole chunk,
  scalar gate (b `[C, 1]`, b_all `[C]`)."""
  decay = jnp.exp(jnp.where(pairs(rel), b - b_all[None, :], -jnp.inf))
  return dot(q, k, "nt", q.dtype) * decay, decay


def factored(b_last):
  """Whether a vector-gate chunk may use the factored form (see FACTORED_RANGE)."""
  return jnp.min(b_last) >= -FACTORED_RANGE


def vector_diag(q, b, rel, k_ref, b_ref, row0, d_scores=None):
  """The exact diagonal block for a vector gate.

  scores[i, j] = Σ_k q_ik k_jk e^{b_ik − b_jk} for j ≤ i in one run, built one key row j
  at a time so the [s, K] decay tile never meets a positive exponent. With `d_scores`
  (dL/dscores) also the block's parts of dq and dk from the pairs j < i.
  """
  sub = q.shape[0]
  rows, cols = iota((sub, 1), 0), iota((1, sub), 1)
  mask = (rows >= cols) & (rel[:, None] == rel[None, :])
  q = q.astype(jnp.float32)
  if d_scores is not None:
    d_scores = jnp.where(mask & (rows > cols), d_scores, 0.0)

  def body(j, carry):
    scores, dq, dk = carry
    k_j = k_ref[pl.ds(row0 + j, 1), :].astype(jnp.float32)  # [1, K]
    decay = jnp.exp(jnp.where(rows >= j, b - b_ref[pl.ds(row0 + j, 1), :], -jnp.inf))
    scores = jnp.where(cols == j, jnp.sum(q * k_j * decay, axis=1, keepdims=True), scores)
    if d_scores is not None:
      d_col = jnp.sum(jnp.where(cols == j, d_scores, 0.0), axis=1, keepdims=True)
      dq = dq + d_col * k_j * decay
      dk = jnp.where(rows == j, jnp.sum(d_col * q * decay, axis=0, keepdims=True), dk)
    return scores, dq, dk

  zeros = jnp.zeros(q.shape, jnp.float32)
  scores, dq, dk = lax.fori_loop(0, sub, body,
                                 (jnp.zeros((sub, sub), jnp.float32), zeros, zeros))
  return jnp.where(mask, scores, 0.0), dq, dk


def earlier(b, r, k_all, b_all, start):
  """Vector gate, a row block against the chunk's keys before it (rows < start), through
  r = b just before the block `[1, K]`.

  Returns the query factor e^{b_i − r} `[s, K]` and the keys k_j e^{r − b_j} `[C, K]`
  (zero for j ≥ start); both factors are ≤ 1 and their product is e^{b_i − b_j}.
  """
  before = iota((k_all.shape[0], 1), 0) < start
  return jnp.exp(b - r), k_all * jnp.exp(jnp.where(before, r - b_all, -jnp.inf))


def chunk_rows_spec(x, chunk):
  """BlockSpec of one chunk's rows of `[B, T, H(, K)]` or `[B, T]` over a (batch, chunk,
  head) grid."""
  if x.ndim == 2:
    return pl.BlockSpec((None, chunk), lambda n, t, h: (n, t))
  if x.ndim == 3:
    return pl.BlockSpec((None, chunk, None), lambda n, t, h: (n, t, h))
  return pl.BlockSpec((None, chunk, None, x.shape[3]), lambda n, t, h: (n, t, h, 0))


def pallas_call(plan, kernel, name, num_warps=None, num_stages=None, **kwargs):
  """`pl.pallas_call` of a Triton kernel with the plan's launch settings and interpret
  mode; num_warps, num_stages: None for the plan's."""
  params = plgpu.CompilerParams(num_warps=num_warps or plan.num_warps,
                                num_stages=num_stages or plan.num_stages)
  return pl.pallas_call(kernel, name=name, interpret=plan.interpret,
                        compiler_params=params, **kwargs)
