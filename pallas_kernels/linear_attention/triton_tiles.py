"""Tile arithmetic and launches shared by the Triton-language linear-attention kernels
(`triton`'s, for both gates, and `triton_vector`'s), as `pallas_triton_tiles` is for the
Pallas Triton ones: the layouts of inputs and states, the decays and masks of one chunk's
runs, the chunk-state step, and the launch of a kernel under a `chunked_plan.Plan`.

Notation as `triton`: b the cumulative log decay inside a chunk, `[C, K]` for a vector
gate and `[C, 1]` for a scalar one (so that one expression serves both), b_C its last
row, rel each token's run within its chunk. Inputs `[B, T, H, W]` are addressed as
`[B·T, H, W]` with global rows n·T + t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.linear_attention import chunked_plan
from pallas_kernels.linear_attention.chunked_plan import storage_dtype
from pallas_kernels.triton_call import triton_call

# Factored vector-gate chunks: log decay falling by at most this in every channel.
FACTORED_RANGE = tl.constexpr(chunked_plan.FACTORED_RANGE)


@triton.jit
def heads_of(batch_head, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr):
  """(n, h, hk) of a program over batch × head: the batch row, the value head, and the
  key head it reads (value heads share key heads in groups of HEADS // KEY_HEADS)."""
  n, h = batch_head // HEADS, batch_head % HEADS
  return n, h, h // (HEADS // KEY_HEADS)


@triton.jit
def gradient_program(seq, HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, BV: tl.constexpr,
                     C: tl.constexpr):
  """(chunk, split, n, h, hk, vv, row0) of a gradient kernel's program over (chunk, value
  block, batch × head): the value block `split` and its columns vv, the heads as
  `heads_of`, and the chunk's first global row (T = seq)."""
  chunk, split, batch_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  n, h, hk = heads_of(batch_head, HEADS, KEY_HEADS)
  return (chunk, split, n, h, hk, split * BV + tl.arange(0, BV),
          n.to(tl.int64) * seq + chunk * C)


@triton.jit
def value_block_rows(split, batch, n, seq, first):
  """Global row of token `first` of batch row n in value block `split`'s part of a
  per-value-block output `[S, B, T, ...]` (summed over S after the launch)."""
  return (split * batch + n).to(tl.int64) * seq + first


@triton.jit
def offsets(rows, head, cols, HEADS: tl.constexpr, WIDTH: tl.constexpr):
  """Offsets of the `[rows, cols]` tile of one head of an array `[B·T, HEADS, WIDTH]`."""
  return (rows[:, None] * HEADS + head) * WIDTH + cols[None, :]


@triton.jit
def state_offsets(n, h, index, kk, vv, HEADS: tl.constexpr, COUNT: tl.constexpr,
                  K: tl.constexpr, V: tl.constexpr):
  """Offsets of the `[kk, vv]` tile of state `index` of an array `[B, HEADS, COUNT, K, V]`
  (one state per chunk or per sequence piece)."""
  return ((n * HEADS + h) * COUNT + index).to(tl.int64) * K * V + kk[:, None] * V + vv[None, :]


@triton.jit
def through_offsets(row, h, chunk, kk, HEADS: tl.constexpr, N: tl.constexpr,
                    K: tl.constexpr):
  """Offsets of `kk` of chunk `chunk` of an array `[R, HEADS, N, K]` (through: R = B, or
  S · B per value block)."""
  return ((row * HEADS + h) * N + chunk).to(tl.int64) * K + kk


@triton.jit
def gate_rows(b_ptr, rows, h, cols, HEADS: tl.constexpr, K: tl.constexpr,
              VECTOR: tl.constexpr):
  """b of `rows`: `[rows, cols]` of a vector gate's b `[B·T, H, K]`, `[rows, 1]` of a
  scalar gate's `[B·T, H]`."""
  if VECTOR:
    b = tl.load(b_ptr + offsets(rows, h, cols, HEADS, K))
  else:
    b = tl.load(b_ptr + offsets(rows, h, tl.arange(0, 1), HEADS, 1))
  return b


@triton.jit
def gate_row(b_ptr, row, h, cols, HEADS: tl.constexpr, K: tl.constexpr,
             VECTOR: tl.constexpr):
  """b of one global row: `[cols]` of a vector gate, `[1]` of a scalar one."""
  if VECTOR:
    b = tl.load(b_ptr + (row * HEADS + h) * K + cols)
  else:
    b = tl.load(b_ptr + row * HEADS + h + tl.arange(0, 1))
  return b


@triton.jit
def gradient_inputs(q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, rel_ptr, rows, hk, h, vv,
                    HEADS: tl.constexpr, KEY_HEADS: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, VECTOR: tl.constexpr):
  """(q, k, v, dO, b, rel) of `rows` (value columns vv): q `[R, K]` as stored, the next
  three in q's dtype (that of the gradient kernels' dots), b as `gate_rows`, rel `[R]`."""
  dtype = q_ptr.dtype.element_ty
  kk = tl.arange(0, K)
  q = tl.load(q_ptr + offsets(rows, hk, kk, KEY_HEADS, K))
  k = tl.load(k_ptr + offsets(rows, hk, kk, KEY_HEADS, K)).to(dtype)
  v = tl.load(v_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
  do = tl.load(do_ptr + offsets(rows, h, vv, HEADS, V)).to(dtype)
  b = gate_rows(b_ptr, rows, h, kk, HEADS, K, VECTOR)
  return q, k, v, do, b, tl.load(rel_ptr + rows)


@triton.jit
def pairs(rel, C: tl.constexpr):
  """`[C, C]` over one chunk: key j reaches query i (j ≤ i) within one run."""
  i = tl.arange(0, C)
  return (i[:, None] >= i[None, :]) & (rel[:, None] == rel[None, :])


@triton.jit
def key_decay(b, b_last, rel, rel_last):
  """e^{b_C − b_j}, the decay from key j to the end of its chunk, for the keys of the
  chunk's last run (the only ones that reach the state leaving it), else 0."""
  return tl.where(rel[:, None] == rel_last, tl.exp(b_last[None, :] - b), 0.0)


@triton.jit
def state_step(s, x, y, weight, b_last, rel_last, PRECISION: tl.constexpr):
  """s ← e^{b_C} ⊙ s + (x ⊙ weight)ᵀ y: the chunk-state recurrence over one chunk, x
  weighted in f32 and multiplied in its own dtype; e^{b_C} is 0 if the chunk holds a
  reset. s `[BK, BV]` f32, x `[C, BK]`, y `[C, BV]`, weight `[C, BK|1]`."""
  x = (x.to(tl.float32) * weight).to(x.dtype)
  carry = tl.where(rel_last == 0, tl.exp(b_last), 0.0)
  return carry[:, None] * s + tl.dot(tl.trans(x), y, input_precision=PRECISION)


def dot_precision(dtype) -> str:
  """tl.dot's input_precision: IEEE f32 for f32 operands, as `pallas_triton_tiles.dot`'s
  HIGHEST (not TF32); ignored for 16-bit operands."""
  return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def kernel_name(stage: str, vector: bool) -> str:
  """The launch's name (what a profile shows): linear_attention[_vector]_<stage>."""
  return f"linear_attention_{'vector_' if vector else ''}{stage}"


def launch(plan, kernel, *args, num_warps=None, num_stages=None, **kwargs):
  """`triton_call` with the plan's launch settings and interpret mode; num_warps,
  num_stages: None for the plan's."""
  return triton_call(kernel, *args, interpret=plan.interpret,
                     num_warps=num_warps or plan.num_warps,
                     num_stages=num_stages or plan.num_stages,
                     **kwargs)


def gradient_outputs(q, v, b, plan):
  """What a gradient kernel writes per value block (S = value_dim // gradient_block_v):
  dq, dk `[S, B, T, H, K]`, dv `[B, T, H, V]`, the decay-gradient parts like b
  `[S, ...]` f32, and through `[S, B, H, N, K]` f32."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  splits = value_dim // plan.gradient_block_v
  partial = lambda shape, dtype: jax.ShapeDtypeStruct((splits,) + shape, dtype)
  # f32 when summed over value blocks or over the value heads that share a key head.
  sums = splits > 1 or heads != key_heads
  per_head = partial((batch, seq, heads, key_dim), jnp.float32 if sums
                     else storage_dtype(q.dtype))
  return (per_head, jax.ShapeDtypeStruct(v.shape, v.dtype), partial(b.shape, jnp.float32),
          partial((batch, heads, plan.chunks, key_dim), jnp.float32))


def launch_gradients(plan, kernel, stage, q, k, v, do, b, rel, states, d_states, *more,
                     **kwargs):
  """Launches a gradient kernel over (chunk, value block, batch × head): its parameters
  are q, k, v, do, b, rel, h_n, dh_n, `more`, then batch, seq and scale, then its
  outputs (`kwargs["out_shape"]`)."""
  batch, seq, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  return launch(
      plan, kernel, q, k, v, do, b, rel, states, d_states, *more, batch, seq,
      np.float32(plan.scale),
      grid=(plan.chunks, value_dim // plan.gradient_block_v, batch * heads),
      num_warps=plan.gradient_num_warps, num_stages=plan.gradient_num_stages,
      name=kernel_name(stage, b.ndim == 4),
      HEADS=heads, KEY_HEADS=key_heads, N=plan.chunks, K=key_dim, V=value_dim,
      BV=plan.gradient_block_v, C=plan.chunk, PRECISION=dot_precision(q.dtype), **kwargs)


def sum_value_blocks(dq, dk, dv, d_b, d_keys, through):
  """`Launches.gradients`' results from the per-value-block outputs."""
  return (dq.sum(0), dk.sum(0), dv, d_b.sum(0), d_keys.sum(0), through.sum(0))
