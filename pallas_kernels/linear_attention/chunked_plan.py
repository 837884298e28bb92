"""The plan and composition of the chunked GPU linear-attention kernels, shared by
`pallas_triton`, `triton` (Triton language) and `pallas_mosaic_gpu`: each passes its own
kernel launches (`Launches`) to the same forward and backward.

Notation as `pallas_triton`'s module docstring (and `common`'s): per value head, chunks of
C tokens, b the cumulative log decay inside a chunk, rel each token's run within its
chunk, h_n the state entering chunk n.

  forward:  prepare (pad, b, rel, each piece's M) → the state entering each piece →
            `Launches.output` (o in one pass, the chunk states on chip)
  backward: prepare → the state passes forward (h_n) and in reverse over q and dO (dh_n,
            the gradient w.r.t. the state leaving chunk n) → `Launches.gradients` (dq,
            dk, dv and the decay gradient's parts per chunk) → `Launches.decay_gradient`

The backward recomputes h_n rather than keeping the forward's.

Sequence pieces: when batch × heads × value blocks is too small to fill the GPU, the
forward and the state passes split the sequence into P pieces that run in parallel. The
end state of a piece is affine in its start state, S_end = M ⊙ S_start + E, with M =
e^{Σ g} over the piece (zero if the piece holds a reset). A first launch gives every E from
a zero start, `common.affine_scan` over P in XLA chains the starts, and a second launch
from the true starts writes the h_n (or, fused, the output). The same holds in reverse for
the state gradient.

`BlockSizes` and `make_plan` are the Triton tiles' (powers of two); the Mosaic GPU kernels
take the plan's pieces, chunk and scale and keep their own tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import common

SUBCHUNK = 16  # rows per exact-decay block for the vector gate
# A vector-gate chunk whose log decay falls by at most this much in every key channel is
# factored like a scalar gate's: (q_i e^{b_i}) · (k_j e^{−b_j}), the key factor at most
# e^60 ≈ 1e26 (finite in f32 and bf16, its products with the ≥ e^-60 query factors too).
FACTORED_RANGE = 60.0
MIN_DOT = 16  # tl.dot needs every dimension ≥ 16
# Compiled (Triton 3.6, H100) with bf16 or f16 inputs, a vector gate's forward outputs are
# wrong at chunk 64: relative error 1.2-1.5 at every row, with the final state and the
# gradients right, and right at chunk 16 and 32, in f32 and in interpret mode: in the
# Triton-language kernels at every key dim (16-128), in the Pallas-Triton ones at a
# (padded) key dim of 32. Those calls run at chunk 32 (`call_with_plan`'s
# vector_chunk_cap; docs/reliability.md).
VECTOR_16BIT_CHUNK = 32
TARGET_PROGRAMS = 256  # about two state-pass programs per SM of an H100 (132 SMs)
MIN_PIECE_CHUNKS = 4  # shorter pieces cost more in the second launch than they save

# (max(key_dim, value_dim) up to, bytes per input element) →
#   (block_k, block_v, num_warps, num_stages, gradient_num_warps).
# Measured for (128, 2) on an H100 (docs/perf/linear_attention.md): the fused forward is
# fastest at block_v 64, 4 warps, 2 stages (64.7 M tokens/s; 8 warps or 1 stage
# 20-70 % slower, chunk 128 3.4× slower); the gradient kernel, which holds two whole
# [K, V] states, at 8 warps (backward 1.9× faster than at 4). Other rows: fla's choices.
_TUNING = {
    (64, 2): (64, 64, 4, 2, 8),
    (128, 2): (64, 64, 4, 2, 8),
    (64, 4): (32, 64, 4, 2, 4),
    (128, 4): (32, 64, 4, 2, 4),
}
# The vector gate, where measured (H100, seq 1k): the forward holds [C, K] f32 decay tiles
# and is fastest with the whole value width at 8 warps (2.66 ms; block_v 64 at 4 warps
# 5.10, at 8 warps 3.47; 128 at 4 warps 4.45), and so are the state passes (0.73 / 0.90 ms
# against 1.03 / 1.03). Other keys take `_TUNING`.
_VECTOR_TUNING = {
    (128, 2): (64, 128, 8, 2, 8),
}


def tuning_key(key_dim: int, value_dim: int, dtype) -> tuple[int, int]:
  """The key of the tuning tables: (64 or 128: the wider head dim, up to; bytes per input
  element, 2 or 4)."""
  width = 64 if max(key_dim, value_dim) <= 64 else 128
  return width, 4 if jnp.dtype(dtype).itemsize >= 4 else 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch settings of the Triton kernels (`pallas_triton`, `triton`).

  Attributes:
    block_k: key rows of the state per program in the state passes.
    block_v: value columns of the state and the output per program in the forward and
      the state passes.
    num_warps, num_stages: Triton launch settings for every kernel.
    pieces: sequence pieces the state passes run in parallel; None picks enough to give
      about `TARGET_PROGRAMS` programs, each piece at least `MIN_PIECE_CHUNKS` chunks.
    gradient_block_v: value columns per program in the gradient kernel; None takes them
      all. Fewer columns hold less of the two `[K, V]` states per program; dq, dk and the
      decay-gradient parts, linear in the value columns, are then summed over the blocks.
      (The Triton-language scalar-gate kernel instead loops over blocks of this many
      columns in one program, summing in registers.)
    gradient_num_warps, gradient_num_stages: the gradient kernel's launch settings;
      None for `num_warps`, `num_stages`.
  """
  block_k: int
  block_v: int
  num_warps: int = 4
  num_stages: int = 2
  pieces: int | None = None
  gradient_block_v: int | None = None
  gradient_num_warps: int | None = None
  gradient_num_stages: int | None = None

  @classmethod
  def get_default(cls, key_dim: int, value_dim: int, dtype,
                  vector: bool = False) -> BlockSizes:
    """The tuned settings for these head dims and dtype; `vector`: for a vector gate."""
    key = tuning_key(key_dim, value_dim, dtype)
    table = _VECTOR_TUNING if vector and key in _VECTOR_TUNING else _TUNING
    block_k, block_v, warps, stages, gradient_warps = table[key]
    return cls(min(block_k, key_dim), min(block_v, value_dim), warps, stages,
               gradient_block_v=min(value_dim, 128), gradient_num_warps=gradient_warps)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static configuration of one call (hashable: the custom_vjp's non-diff argument)."""
  scale: float
  chunk: int
  sub: int  # rows per block of the vector gate's intra-chunk part
  pieces: int
  chunks_per_piece: int
  block_k: int
  block_v: int
  num_warps: int
  num_stages: int
  gradient_block_v: int
  gradient_num_warps: int
  gradient_num_stages: int
  interpret: bool

  @property
  def chunks(self):
    return self.pieces * self.chunks_per_piece


class Launches(NamedTuple):
  """The kernel launches that `forward` and `backward` run, each backend its own, with
  these arguments and results (T whole pieces; H value heads, Hk key heads):

  output(q, k, v, b, rel, starts, plan) → o `[B, T, H, V]` and the state leaving each
    piece `[B, H, P, K, V]`, from starts, the state entering each piece.
  state(x, y, b, rel, start, plan, *, reverse, write_states) → ([h_n `[B, H, N, K, V]`,]
    ends `[B, H, P, K, V]`): the chunk-state recurrence over k, v (or, in reverse, over q,
    dO) from start, per piece.
  gradients(q, k, v, do, b, rel, states, d_states, plan) → dq, dk per value head
    `[B, T, H, K]`, dv, and the decay gradient's parts d_b, d_keys (like b) and through
    `[B, H, N, K]`.
  decay_gradient(b, rel, resets, d_b, d_keys, through, plan) → dL/dg, like b.
  chunk_cumsum(g, plan) → b for a vector gate g `[B, T, H, K]`; None: no vector gate.
  """
  output: Callable[..., Any]
  state: Callable[..., Any]
  gradients: Callable[..., Any]
  decay_gradient: Callable[..., Any]
  chunk_cumsum: Callable[..., Any] | None = None


def storage_dtype(dtype):
  """What intermediate tensors in memory use: the inputs' dtype if 16-bit, else f32."""
  return jnp.float32 if jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(dtype)


def make_plan(batch, seq, heads, key_dim, value_dim, dtype, vector, scale, chunk_size,
              block_sizes, interpret, default_blocks=BlockSizes.get_default) -> Plan:
  """The `Plan` of a call: block sizes (None for `default_blocks(key_dim, value_dim,
  dtype, vector)`) checked against what Triton tiles take, and the sequence cut into
  pieces.

  Raises:
    NotImplementedError: a size that is not a power of two, or below `MIN_DOT` when
      compiled; an empty sequence.
  """
  blocks = block_sizes or default_blocks(key_dim, value_dim, dtype, vector)
  block_k, block_v = min(blocks.block_k, key_dim), min(blocks.block_v, value_dim)
  gradient_block_v = min(blocks.gradient_block_v or value_dim, value_dim)
  sizes = {"key_dim (padded)": key_dim, "value_dim (padded)": value_dim,
           "chunk_size": chunk_size,
           "block_sizes.block_k": block_k, "block_sizes.block_v": block_v,
           "block_sizes.gradient_block_v": gradient_block_v}
  for name, size in sizes.items():
    if size < 1 or size & (size - 1):
      raise NotImplementedError(f"{name}={size} is not a power of two, which Triton "
                                "tiles need.")
    if not interpret and size < MIN_DOT:
      raise NotImplementedError(f"{name}={size} < {MIN_DOT}, the smallest tl.dot "
                                "dimension (interpret mode takes it).")
  if seq < 1:
    raise NotImplementedError(f"seq={seq}: an empty sequence has nothing to run.")
  chunks = -(-seq // chunk_size)
  pieces = blocks.pieces
  if pieces is None:
    # Counted for the fused forward, which keeps whole key rows.
    programs = batch * heads * (value_dim // block_v)
    pieces = min(TARGET_PROGRAMS // programs, chunks // MIN_PIECE_CHUNKS)
  per_piece = -(-chunks // max(1, min(pieces, chunks)))
  return Plan(scale=float(scale), chunk=chunk_size,
              sub=min(SUBCHUNK, chunk_size) if vector else chunk_size,
              pieces=-(-chunks // per_piece), chunks_per_piece=per_piece, block_k=block_k,
              block_v=block_v, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
              gradient_block_v=gradient_block_v,
              gradient_num_warps=blocks.gradient_num_warps or blocks.num_warps,
              gradient_num_stages=blocks.gradient_num_stages or blocks.num_stages,
              interpret=bool(interpret))


def token_gate(log_decay, key, value):
  """g: `common.per_token_log_decay` for key `[B, T, Hk, K]` and value `[B, T, H, V]`,
  after checking that H is a multiple of Hk."""
  batch, seq, key_heads = key.shape[:3]
  heads = value.shape[2]
  if heads % key_heads:
    raise ValueError(f"value heads ({heads}) must be a multiple of key heads ({key_heads}).")
  return common.per_token_log_decay(log_decay, batch, seq, heads)


def call_with_plan(kernel, query, key, value, log_decay, initial_state, resets, scale,
                   chunk_size, interpret, block_sizes, vector_chunk_cap=lambda key_dim: None,
                   default_blocks=BlockSizes.get_default):
  """kernel(q, k, v, g, h0, resets, plan), a VJP function over `forward` and `backward`
  (`pallas_triton`'s, `triton`'s): the public entry's work around it — per-token gate,
  head dims padded to what Triton tiles take (`padded_dim`), plan, dtypes. Arguments and
  results as `pallas_triton.linear_attention`. `vector_chunk_cap(padded key dim)`: the
  largest chunk a compiled vector gate with 16-bit inputs runs at (None: any), where
  larger chunks give wrong outputs (`WRONG_16BIT_VECTOR_CHUNKS`). `default_blocks`: the
  backend's `BlockSizes.get_default`."""
  batch, seq, _, key_dim = key.shape
  heads, value_dim = value.shape[2:]
  g = token_gate(log_decay, key, value)
  vector = g.ndim == 4
  key_to, value_to = (padded_dim(key_dim, interpret, vector=vector),
                      padded_dim(value_dim, interpret))
  pad = lambda x, axis, to: jnp.pad(x, [(0, to - x.shape[axis]) if a == axis % x.ndim
                                        else (0, 0) for a in range(x.ndim)])
  query, key = pad(query, -1, key_to), pad(key, -1, key_to)
  value = pad(value, -1, value_to)
  g = pad(g, -1, key_to) if vector else g
  h0 = pad(pad(initial_state.astype(jnp.float32), -2, key_to), -1, value_to)
  cap = vector_chunk_cap(key_to) if vector and not interpret else None
  if cap and jnp.dtype(query.dtype).itemsize == 2:
    chunk_size = min(chunk_size, cap)
  plan = make_plan(batch, seq, heads, key_to, value_to, query.dtype, vector, scale,
                   chunk_size, block_sizes, interpret, default_blocks)
  out, final = kernel(query, key, value, g, h0, resets.astype(bool), plan)
  return out[..., :value_dim], final[..., :key_dim, :value_dim]


def padded_dim(size: int, interpret: bool, vector: bool = False) -> int:
  """The head dim the kernels run `size` at: the next power of two (Triton tiles), at
  least `MIN_DOT` when compiled, and at least 32 for a vector gate's key dim when
  compiled (at 16, bf16 outputs were wrong on an H100: relative error 1.3, with the
  final state and gradients right; issue 17). Zero padding is exact: padded key
  channels add 0 to every score, padded value columns are cut off."""
  least = 1 if interpret else (2 * MIN_DOT if vector else MIN_DOT)
  return max(least, 1 << max(0, size - 1).bit_length())


def prepare(q, k, v, g, resets, plan, chunk_cumsum):
  """Pads to whole pieces (zero q, k, v, no decay, no reset: the state is unchanged) and
  derives b (cumulative log decay inside each chunk; chunk_cumsum(g, plan) computes it for
  a vector gate), rel (each token's run within its chunk) and each piece's decay M
  `[B, H, P, K|1, 1]` (zero if the piece holds a reset)."""
  batch, seq = k.shape[:2]
  t_pad = plan.chunks * plan.chunk
  pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - seq)] + [(0, 0)] * (x.ndim - 2))
  q, k, v, g, resets = map(pad, (q, k, v, g, resets))
  if g.ndim == 4:  # XLA's scan of a vector gate made a transposed copy of it (H100)
    b = chunk_cumsum(g, plan)
  else:  # where the kernel was 1 % slower
    b = common.cumsum_in_chunks(g, plan.chunk)
  rel = common.cumsum_in_chunks(resets.astype(jnp.int32), plan.chunk)
  split = lambda x, n: x.reshape(batch, n, -1, *x.shape[2:])
  total = split(g, plan.pieces).sum(axis=2)  # [B, P, H(, K)]
  clean = ~split(resets, plan.pieces).any(axis=2)
  decay = jnp.where(clean.reshape(clean.shape + (1,) * (total.ndim - 2)), jnp.exp(total), 0.0)
  decay = jnp.moveaxis(decay, 1, 2)
  decay = decay[..., None] if g.ndim == 4 else decay[..., None, None]
  return q, k, v, b, rel, resets, decay


def piece_starts(x, y, b, rel, boundary, piece_decay, plan, *, reverse, state_call):
  """The state entering each sequence piece (leaving it, in reverse) `[B, H, P, K, V]`.

  boundary is the initial state (dL/d(final state) in reverse); piece_decay
  `[B, H, P, K|1, 1]` is each piece's M. With P > 1 a first launch gives each piece's E
  from a zero start and `common.affine_scan` over P chains them. state_call:
  `Launches.state`.
  """
  if plan.pieces == 1:
    return boundary[:, :, None]
  zeros = jnp.zeros(boundary.shape[:2] + (plan.pieces,) + boundary.shape[2:], jnp.float32)
  (partial,) = state_call(x, y, b, rel, zeros, plan, reverse=reverse, write_states=False)
  _, starts = common.affine_scan(jnp.moveaxis(piece_decay, 2, 0),
                                 jnp.moveaxis(partial, 2, 0), boundary, reverse=reverse)
  return jnp.moveaxis(starts, 0, 2)


def state_pass(x, y, b, rel, boundary, piece_decay, plan, *, reverse, state_call):
  """The state recurrence over the whole sequence, pieces in parallel.

  Forward: boundary is the initial state; returns h_n for every chunk and the final state.
  Backward (x = q, y = dO): boundary is dL/d(final state); returns dh_n and
  dL/d(initial state).
  """
  starts = piece_starts(x, y, b, rel, boundary, piece_decay, plan, reverse=reverse,
                        state_call=state_call)
  states, ends = state_call(x, y, b, rel, starts, plan, reverse=reverse, write_states=True)
  return states, ends[:, :, 0 if reverse else -1]


def forward(q, k, v, g, h0, resets, plan, launches: Launches):
  """The forward of a custom_vjp over (q, k, v, g, h0, resets), plan non-differentiable:
  (out `[B, T, H, V]`, final state) and the residuals for `backward`."""
  qp, kp, vp, b, rel, _, decay = prepare(q, k, v, g, resets, plan, launches.chunk_cumsum)
  # One pass: the chunk states never leave the chip.
  starts = piece_starts(kp, vp, b, rel, h0, decay, plan, reverse=False,
                        state_call=launches.state)
  out, ends = launches.output(qp, kp, vp, b, rel, starts, plan)
  final = ends[:, :, -1]
  return (out[:, :k.shape[1]], final), (q, k, v, g, h0, resets, final)


def backward(plan, residuals, cotangents, launches: Launches):
  """The backward of that custom_vjp: dq, dk (summed over each key head's value heads),
  dv, dg, dh0 and None for the resets."""
  q, k, v, g, h0, resets, final = residuals
  d_out, d_final = cotangents
  batch, seq, key_heads, key_dim = k.shape
  ratio = v.shape[2] // key_heads
  qp, kp, vp, b, rel, resets_p, decay = prepare(q, k, v, g, resets, plan,
                                                launches.chunk_cumsum)
  d_out = jnp.pad(d_out.astype(q.dtype), [(0, 0), (0, qp.shape[1] - seq), (0, 0), (0, 0)])
  states, _ = state_pass(kp, vp, b, rel, h0, decay, plan, reverse=False,
                         state_call=launches.state)
  d_states, d_h0 = state_pass(qp, d_out, b, rel, d_final, decay, plan, reverse=True,
                              state_call=launches.state)
  dq, dk, dv, d_b, d_keys, through = launches.gradients(qp, kp, vp, d_out, b, rel, states,
                                                        d_states, plan)
  d_g = launches.decay_gradient(b, rel, resets_p, d_b, d_keys, through, plan)[:, :seq]
  group = lambda x: x[:, :seq].reshape(batch, seq, key_heads, ratio, key_dim).sum(3)
  return (group(dq).astype(q.dtype), group(dk).astype(k.dtype), dv[:, :seq], d_g, d_h0,
          None)


def with_vjp(launches: Launches):
  """`(q, k, v, g, h0, resets, plan) → (out, final)` with its VJP: `forward` and
  `backward` over `launches`, the plan non-differentiable (`pallas_triton`'s and
  `triton`'s kernel; `call_with_plan` calls it)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
  def run(q, k, v, g, h0, resets, plan):
    return forward(q, k, v, g, h0, resets, plan, launches)[0]

  run.defvjp(lambda *args: forward(*args, launches),
             lambda plan, residuals, cotangents: backward(plan, residuals, cotangents,
                                                          launches))
  return run
