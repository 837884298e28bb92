"""Chunked causal linear attention with decays and gates: Pallas kernels, Triton lowering.

The recurrence (per value head; Katharopoulos et al. 2020, Lightning Attention-2, RetNet,
GLA, Mamba-2 SSD):

  S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(g_t), g_t ≤ 0,

with S zeroed before every token where `resets` is set. g is a scalar per token (fixed per
head and "no decay" are broadcast to this form by the wrapper) or a vector over the key
dimension (GLA). The sequence is cut into chunks of C tokens; b_i is the cumulative log
decay inside a chunk (b_i = Σ_{j≤i} g_j, falling, ≤ 0) and h_n the state entering chunk n:

  o_i     = scale · [ Σ_{j≤i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j + (q_i ⊙ e^{b_i})ᵀ h_n ]
  h_{n+1} = e^{b_C} ⊙ h_n + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ

For a scalar gate every exponent is ≤ 0, so nothing overflows however strong the decay.
A vector gate's pairwise decay e^{b_i − b_j} differs per key column, so it cannot sit
outside a matmul. A chunk whose log decay falls by at most FACTORED_RANGE (60) in every
channel is factored, `(q_i e^{b_i}) · (k_j e^{−b_j})` (the key factor ≤ e^60, finite;
GLA's gates fall by about 0.1-1 per token, so chunks of 64 take this form), and costs a
scalar gate's matmuls. A chunk with stronger decay is split into row blocks of 16 (as in
fla's GLA kernels): pairs in different blocks go through a reference point r (b just
before the later block, or at the end of the earlier one), `(q_i e^{b_i − r}) · (k_j
e^{r − b_j})`, both factors ≤ 1; pairs inside one block use the exact [16, K] decay, one
key row at a time — every exponent ≤ 0 again, at several times the cost.

Resets are masks, never decays (log 0 would poison the factorisations): `rel`, the number
of resets so far inside the chunk, tells a token's run. Token i reads the incoming state
only while rel_i = 0; key j feeds the outgoing state only if it is in the chunk's last
run; the state passes a chunk only if the chunk has no reset; pairs (i, j) interact only
within one run.

Kernels. The forward is one pass, Lightning Attention-2's: `_fused_output_kernel`, one
program per (batch, head, sequence piece, value block), walks the chunks in order with
the state on chip and writes o, so the chunk states never touch memory. The backward
uses the classic design of flash-linear-attention `ops/common/chunk_h.py` and
`ops/gla/chunk.py`, written anew:

  1. `_state_kernel`: one program per (batch, head, sequence piece, key block, value
     block) walks the chunks in order (fori_loop), storing each chunk's incoming state
     h_n and the piece's end state. Run in reverse over q and dO it is also the
     backward state pass: dh_n, the gradient with respect to the state leaving chunk n.
  2. `_gradient_kernel`: one program per (batch, head, chunk, value block) gives dq, dk,
     dv of the chunk from h_n and dh_n, and the parts of the decay gradient (all but dv
     summed over the value blocks, by default one). Vector-gate chunks too strongly
     decayed to factor are left to a second launch of it.

Sequence pieces: when batch × heads × value blocks is too small to fill the GPU, the
forward and the state passes split the sequence into P pieces that run in
parallel. The end state of a piece is affine in its start state, S_end = M ⊙ S_start +
E, with M = e^{Σ g} over the piece (zero if the piece holds a reset). A first launch
gives every E from a zero start, a scan over P in XLA chains the starts, and a second
launch from the true starts writes the h_n (or, fused, the output). The same holds in
reverse for the state gradient.

Decay gradient: each pair (query i, key j < i; the initial state is a key before the
sequence, the final state a query after it) carries e^{B_i − B_j}, B the cumulative log
decay of the sequence, so its share P_ij of the loss moves dL/dg_t for every j < t ≤ i
in their run; a reset token's own decay multiplies a zeroed state and gets 0. The
gradient kernel gives per token q ⊙ dq − k ⊙ dk over the pairs inside the chunk and with
the state entering it, and k ⊙ dk over the pairs with the state leaving it, both without
the pair (i, i), which cancels exactly, and per chunk Σ_v dh_n ⊙ h_n;
`_decay_gradient_kernel` sums the first two inside each chunk and adds the pairs that
span the whole chunk, e^{b_C} times the third. No sum runs past a chunk,
so rounding does not grow with the sequence: the textbook q ⊙ dq − k ⊙ dk summed over
the whole sequence lost 2e-3 of a fixed-decay gradient at −2.3 per token and T = 77;
this form loses 5e-5.

Precision: inputs are read in their dtype, the dot operands are cast to it (bf16/f16
tensor-core matmuls; f32 inputs use IEEE f32 dots, not TF32), and everything accumulates
in f32; the carried state is f32. The chunk states h_n and dh_n that the backward writes
to memory (it recomputes them rather than keeping the forward's), and the per-head dq and
dk, are stored in the inputs' dtype when it is 16-bit, since the dots read them in it.

Limits: key_dim, value_dim, chunk_size and block sizes must be powers of two (Triton
tensor shapes), and at least 16 when compiled (tl.dot); interpret mode takes smaller ones.
"No decay" runs as a zero scalar gate (no cheaper special case). The output and gradient
kernels hold whole key rows (and, for gradients, the whole [K, V] state) per program.

The naive reference is `attn_jax.ops.linear_attention_reference` (kernels do not import
attn_jax); the tests compare with it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUBCHUNK = 16  # rows per exact-decay block for the vector gate
# A vector-gate chunk whose log decay falls by at most this much in every key channel is
# factored like a scalar gate's: (q_i e^{b_i}) · (k_j e^{−b_j}), the key factor at most
# e^60 ≈ 1e26 (finite in f32 and bf16, its products with the ≥ e^-60 query factors too).
FACTORED_RANGE = 60.0
MIN_DOT = 16  # tl.dot needs every dimension ≥ 16
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


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch settings of the kernels.

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
    gradient_num_warps: the gradient kernel's num_warps; None for `num_warps`.
  """
  block_k: int
  block_v: int
  num_warps: int = 4
  num_stages: int = 2
  pieces: int | None = None
  gradient_block_v: int | None = None
  gradient_num_warps: int | None = None

  @classmethod
  def get_default(cls, key_dim: int, value_dim: int, dtype,
                  vector: bool = False) -> BlockSizes:
    """The tuned settings for these head dims and dtype; `vector`: for a vector gate."""
    width = 64 if max(key_dim, value_dim) <= 64 else 128
    nbytes = 4 if jnp.dtype(dtype).itemsize >= 4 else 2
    table = _VECTOR_TUNING if vector and (width, nbytes) in _VECTOR_TUNING else _TUNING
    block_k, block_v, warps, stages, gradient_warps = table[(width, nbytes)]
    return cls(min(block_k, key_dim), min(block_v, value_dim), warps, stages,
               gradient_block_v=min(value_dim, 128), gradient_num_warps=gradient_warps)


def _dot(a, b, dims, dtype):
  """a·b ("nn"), a·bᵀ ("nt") or aᵀ·b ("tn") with operands in `dtype`, f32 accumulation."""
  contract = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}[dims]
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _gate(b_ref, rows):
  """Cumulative log decay of `rows` as `[n, K]` (vector gate) or `[n, 1]` (scalar)."""
  return b_ref[rows, :] if len(b_ref.shape) == 2 else b_ref[rows][:, None]


def _storage_dtype(dtype):
  """What intermediate tensors in memory use: the inputs' dtype if 16-bit, else f32."""
  return jnp.float32 if jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(dtype)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _state_update(s, x, y, b, b_last, rel, rel_last, *, reverse, scale):
  """One chunk of the state recurrence (see `_state_kernel`): s `[bk, bv]` f32; x, y the
  chunk's `[C, bk]` and `[C, bv]` rows; b `[C, bk|1]`, b_last `[1, bk|1]`, rel `[C, 1]`."""
  if reverse:
    weight = jnp.where(rel == 0, scale * jnp.exp(b), 0.0)
  else:
    weight = jnp.where(rel == rel_last, jnp.exp(b_last - b), 0.0)
  decay = jnp.where(rel_last == 0, jnp.exp(b_last), 0.0).reshape(-1, 1)  # rows of s
  return decay * s + _dot(x * weight, y, "tn", x.dtype)


def _state_kernel(x_ref, y_ref, b_ref, rel_ref, start_ref, *out_refs, chunk, chunks,
                  reverse, scale):
  """The chunk-state recurrence over one sequence piece, for one state tile.

  Forward (x = k, y = v, chunks in order): stores h_n, then
    h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ   (j in the chunk's last run).
  Backward (x = q, y = dO, chunks in reverse): stores dh_n (w.r.t. the state leaving
  chunk n), then dh ← e^{b_C} ⊙ dh + scale Σ_i (q_i ⊙ e^{b_i}) dO_iᵀ (i before any reset).
  The decay factor is zero when the chunk holds a reset. `out_refs` is (states, end) or
  (end,) when only the piece's end is wanted.
  """
  *states_ref, end_ref = out_refs

  def body(t, s):
    j = chunks - 1 - t if reverse else t
    if states_ref:
      states_ref[0][j] = s.astype(states_ref[0].dtype)
    rows = pl.ds(j * chunk, chunk)
    return _state_update(s, x_ref[rows, :], y_ref[rows, :], _gate(b_ref, rows),
                         _gate(b_ref, pl.ds(j * chunk + chunk - 1, 1)).reshape(1, -1),
                         rel_ref[rows][:, None], rel_ref[j * chunk + chunk - 1],
                         reverse=reverse, scale=scale)

  end_ref[...] = lax.fori_loop(0, chunks, body, start_ref[...])


def _pairs(rel, strict=False):
  """[C, C] bool over a whole chunk: key j reaches query i (j ≤ i, or j < i if strict)
  within one run."""
  rows, cols = _iota((rel.shape[0], 1), 0), _iota((1, rel.shape[0]), 1)
  return ((rows > cols) if strict else (rows >= cols)) & (rel[:, None] == rel[None, :])


def _scalar_scores(q, b, rel, k, b_all):
  """Σ_k q_ik k_jk e^{b_i − b_j} for j ≤ i in one run, and the decays; the whole chunk,
  scalar gate (b `[C, 1]`, b_all `[C]`)."""
  decay = jnp.exp(jnp.where(_pairs(rel), b - b_all[None, :], -jnp.inf))
  return _dot(q, k, "nt", q.dtype) * decay, decay


def _factored(b_last):
  """Whether a vector-gate chunk may use the factored form (see FACTORED_RANGE)."""
  return jnp.min(b_last) >= -FACTORED_RANGE


def _vector_diag(q, b, rel, k_ref, b_ref, row0, d_scores=None):
  """The exact diagonal block for a vector gate.

  scores[i, j] = Σ_k q_ik k_jk e^{b_ik − b_jk} for j ≤ i in one run, built one key row j
  at a time so the [s, K] decay tile never meets a positive exponent. With `d_scores`
  (dL/dscores) also the block's parts of dq and dk from the pairs j < i.
  """
  sub = q.shape[0]
  rows, cols = _iota((sub, 1), 0), _iota((1, sub), 1)
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


def _earlier(b, r, k_all, b_all, start):
  """Vector gate, a row block against the chunk's keys before it (rows < start), through
  r = b just before the block `[1, K]`.

  Returns the query factor e^{b_i − r} `[s, K]` and the keys k_j e^{r − b_j} `[C, K]`
  (zero for j ≥ start); both factors are ≤ 1 and their product is e^{b_i − b_j}.
  """
  earlier = _iota((k_all.shape[0], 1), 0) < start
  return jnp.exp(b - r), k_all * jnp.exp(jnp.where(earlier, r - b_all, -jnp.inf))


def _later(b, r, q_all, b_all, end):
  """Vector gate, a row block's keys against the chunk's queries after it (rows ≥ end),
  through r = b at the block's last row: the key factor e^{r − b_j} `[s, K]` and the
  queries q_i e^{b_i − r} `[C, K]` (zero for i < end)."""
  later = _iota((q_all.shape[0], 1), 0) >= end
  return jnp.exp(r - b), q_all * jnp.exp(jnp.where(later, b_all - r, -jnp.inf))


def _vector_block_output(q_ref, k_ref, v_ref, b_ref, rel_ref, s, base, chunk, start, sub):
  """Vector gate: o (before `scale`) of the rows start … start + sub − 1 of the chunk of
  `chunk` rows that begins at row `base` of the refs, from the state entering the chunk
  s `[K, bv]`: q·s, the exact diagonal block, and the chunk's earlier rows through a
  reference point (the whole chunk is read and masked: Triton tiles are powers of two).
  """
  rows = pl.ds(base + start, sub)
  q, b, rel = q_ref[rows, :], b_ref[rows, :], rel_ref[rows]
  dtype = q.dtype
  # Tokens still in the run that entered the chunk read the carried state.
  out = _dot(jnp.where(rel[:, None] == 0, q * jnp.exp(b), 0.0), s, "nn", dtype)
  scores, _, _ = _vector_diag(q, b, rel, k_ref, b_ref, base + start)
  out += _dot(scores, v_ref[rows, :], "nn", dtype)
  if start > 0:
    whole = pl.ds(base, chunk)
    r = b_ref[pl.ds(base + start - 1, 1), :]
    q_factor, k_r = _earlier(b, r, k_ref[whole, :], b_ref[whole, :], start)
    same_run = rel[:, None] == rel_ref[whole][None, :]
    scores = jnp.where(same_run, _dot(q * q_factor, k_r, "nt", dtype), 0.0)
    out += _dot(scores, v_ref[whole, :], "nn", dtype)
  return out


def _fused_output_kernel(q_ref, k_ref, v_ref, b_ref, rel_ref, start_ref, o_ref, end_ref, *,
                         chunk, chunks, scale, sub):
  """The whole forward for one sequence piece and one value block: walks the chunks in
  order carrying h `[K, bv]` on chip (f32), writing
    o_i = scale · [ (q_i ⊙ e^{b_i})ᵀ h_n + Σ_{j≤i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j ]
  and then h ← e^{b_C} ⊙ h + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ, with the masks of
  `_state_kernel`; end_ref gets the state leaving the piece. A scalar gate takes a chunk
  as one `[C, C]` score tile, a vector gate in row blocks of `sub`
  (`_vector_block_output`).
  """
  vector = len(b_ref.shape) == 2

  def body(t, s):
    base = t * chunk
    rows = pl.ds(base, chunk)
    k, v, rel = k_ref[rows, :], v_ref[rows, :], rel_ref[rows]
    b = _gate(b_ref, rows)  # [C, K] | [C, 1]
    b_last = _gate(b_ref, pl.ds(base + chunk - 1, 1)).reshape(1, -1)
    rel_last = rel_ref[base + chunk - 1]
    dtype = k.dtype
    if vector:
      factored = _factored(b_last)

      @pl.when(factored)
      def _factored_chunk():
        q = q_ref[rows, :]
        q_decayed = q * jnp.exp(b)
        scores = jnp.where(_pairs(rel), _dot(q_decayed, k * jnp.exp(-b), "nt", dtype), 0.0)
        out = _dot(jnp.where(rel[:, None] == 0, q_decayed, 0.0), s, "nn", dtype)
        out += _dot(scores, v, "nn", dtype)
        o_ref[rows, :] = (scale * out).astype(o_ref.dtype)

      @pl.when(jnp.logical_not(factored))
      def _exact_chunk():
        for start in range(0, chunk, sub):
          out = _vector_block_output(q_ref, k_ref, v_ref, b_ref, rel_ref, s, base, chunk,
                                     start, sub)
          o_ref[pl.ds(base + start, sub), :] = (scale * out).astype(o_ref.dtype)
    else:
      q = q_ref[rows, :]
      scores, _ = _scalar_scores(q, b, rel, k, b_ref[rows])
      out = _dot(jnp.where(rel[:, None] == 0, q * jnp.exp(b), 0.0), s, "nn", dtype)
      out += _dot(scores, v, "nn", dtype)
      o_ref[rows, :] = (scale * out).astype(o_ref.dtype)
    return _state_update(s, k, v, b, b_last, rel[:, None], rel_last, reverse=False,
                         scale=scale)

  end_ref[...] = lax.fori_loop(0, chunks, body, start_ref[...])


def _gradient_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, rel_ref, h_ref, dh_ref, *refs,
                     scale, sub, stage):
  """dq, dk, dv and the decay-gradient parts for one chunk (all but dv: this value head's
  share): in one piece for a scalar gate and a factored vector-gate chunk, in row blocks
  of `sub` for a vector-gate chunk whose decay is too strong to factor.

  `stage` (refs: the outputs, after any aliased inputs):
    "all"      scalar gate: dq, dk, dv, db, dkeys, through.
    "queries"  vector gate, factored chunks: dq, and q ⊙ dq into db.
    "keys"     vector gate, factored chunks: dk, dv, db (−k ⊙ dk added to the aliased
               input db), dkeys, through. Split from "queries", each program holds
               fewer `[C, K]` f32 tiles.
    "exact"    vector gate, the chunks left unfactored: dq, dk, dv, db, dkeys over the
               first launches' outputs, aliased. Compiled into them, its code made the
               backward 1.37x slower at seq 1k on an H100 even where no chunk took it.

  h_n is the state entering the chunk, dh_n the gradient w.r.t. the state leaving it.
  Each pair (query i, key j < i) adds its share P_ij to dL/dB_i and takes it from
  dL/dB_j. db = q ⊙ dq − k ⊙ dk gets the pairs inside the chunk and those with the
  state entering it; dkeys = k ⊙ dk gets those with the state leaving it; through =
  Σ_v dh_n ⊙ h_n `[K]` those of later queries with keys before the chunk. The pair
  (i, i) is left out: it cancels exactly, and under strong decay it would dominate the
  sums and leave only rounding noise.
  """
  db_in_ref = through_ref = None
  if stage == "all":
    dq_ref, dk_ref, dv_ref, db_ref, dkeys_ref, through_ref = refs
  elif stage == "queries":
    dq_ref, db_ref = refs
  elif stage == "keys":
    db_in_ref, dk_ref, dv_ref, db_ref, dkeys_ref, through_ref = refs
  else:
    dq_ref, dk_ref, dv_ref, db_ref, dkeys_ref = refs[5:]  # refs[:5]: the same, aliased
  queries, keys = stage != "keys", stage != "queries"
  chunk = q_ref.shape[0]
  vector = len(b_ref.shape) == 2
  b_last = _gate(b_ref, pl.ds(chunk - 1, 1)).reshape(1, -1)

  def rows_gradients(start, size, form, h, dh):  # form: "scalar", "factored" or "exact"
    rows = pl.ds(start, size)
    q, k, v, do = (ref[rows, :] for ref in (q_ref, k_ref, v_ref, do_ref))
    b, rel = _gate(b_ref, rows), rel_ref[rows]
    dtype = q.dtype
    # Inter-chunk: o_i ∋ scale (q_i e^{b_i})ᵀ h_n and h_{n+1} ∋ (k_j e^{b_C − b_j}) v_jᵀ.
    if queries:
      q_decay = jnp.where(rel[:, None] == 0, jnp.exp(b), 0.0)
      dq = scale * q_decay * _dot(do, h, "nt", dtype)
    if keys:
      k_decay = jnp.where(rel[:, None] == rel_ref[chunk - 1], jnp.exp(b_last - b), 0.0)
      dk_state = k_decay * _dot(v, dh, "nt", dtype)
      dv = _dot(k * k_decay, dh, "nn", dtype)
    # Intra-chunk, the rows' own block: o_i ∋ scale Σ_j scores_ij v_j (pairs j < i here).
    d_scores = scale * _dot(do, v, "nt", dtype)
    if form == "scalar":
      scores, decay = _scalar_scores(q, b, rel, k, b_ref[...])
      d_scores = jnp.where(_pairs(rel, strict=True), d_scores * decay, 0.0)
      dq += _dot(d_scores, k, "nn", dtype)
      dk = _dot(d_scores, q, "tn", dtype)
    elif form == "factored":
      # The dot operands in the input dtype at once: fewer [C, K] f32 tiles held.
      q_decayed, k_grown = ((x * jnp.exp(y)).astype(dtype) for x, y in ((q, b), (k, -b)))
      d_scores = jnp.where(_pairs(rel, strict=True), d_scores, 0.0)
      if queries:
        dq += jnp.exp(b) * _dot(d_scores, k_grown, "nn", dtype)
      if keys:
        scores = jnp.where(_pairs(rel), _dot(q_decayed, k_grown, "nt", dtype), 0.0)
        dk = jnp.exp(-b) * _dot(d_scores, q_decayed, "tn", dtype)
    else:
      scores, dq_diag, dk = _vector_diag(q, b, rel, k_ref, b_ref, start, d_scores)
      dq += dq_diag
    if keys:
      dv += _dot(scale * scores, do, "tn", dtype)
    if form == "exact" and start > 0:  # the rows' queries against the earlier keys
      r = b_ref[pl.ds(start - 1, 1), :]
      q_factor, k_r = _earlier(b, r, k_ref[...], b_ref[...], start)
      d_scores = scale * _dot(do, v_ref[...], "nt", dtype)
      d_scores = jnp.where(rel[:, None] == rel_ref[...][None, :], d_scores, 0.0)
      dq += q_factor * _dot(d_scores, k_r, "nn", dtype)
    if form == "exact" and start + size < chunk:  # the rows' keys against later queries
      r = b_ref[pl.ds(start + size - 1, 1), :]
      k_factor, q_r = _later(b, r, q_ref[...], b_ref[...], start + size)
      same_run = rel_ref[...][:, None] == rel[None, :]  # [C, s]
      scores = jnp.where(same_run, scale * _dot(q_r, k * k_factor, "nt", dtype), 0.0)
      d_scores = jnp.where(same_run, scale * _dot(do_ref[...], v, "nt", dtype), 0.0)
      dv += _dot(scores, do_ref[...], "tn", dtype)
      dk += k_factor * _dot(d_scores, q_r, "tn", dtype)
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    per_token = (lambda x: x) if vector else (lambda x: jnp.sum(x, axis=1))
    own = scale * jnp.sum(do.astype(jnp.float32) * v.astype(jnp.float32), axis=1,
                          keepdims=True)
    if queries:
      dq_ref[rows, :] = (dq + own * k).astype(dq_ref.dtype)
    q_part = q * dq if queries else db_in_ref[rows]  # "keys": the "queries" launch's
    if not keys:
      db_ref[rows] = q_part
      return
    db_ref[rows] = per_token(q_part - k * dk)
    dkeys_ref[rows] = per_token(k * dk_state)
    dk_ref[rows, :] = (dk + dk_state + own * q).astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)

  if stage == "exact":
    @pl.when(jnp.logical_not(_factored(b_last)))
    def _exact_chunk():
      h, dh = h_ref[...], dh_ref[...]
      for start in range(0, chunk, sub):
        rows_gradients(start, sub, "exact", h, dh)
    return
  h, dh = h_ref[...], dh_ref[...]
  if through_ref is not None:
    through_ref[...] = jnp.sum(dh.astype(jnp.float32) * h.astype(jnp.float32), axis=1)
  if vector:
    pl.when(_factored(b_last))(lambda: rows_gradients(0, chunk, "factored", h, dh))
  else:
    rows_gradients(0, chunk, "scalar", h, dh)


def _chunk_cumsum_kernel(g_ref, b_ref):
  """b = the cumulative sum of g over one chunk's rows `[C, K]`, f32."""
  b_ref[...] = jnp.cumsum(g_ref[...], axis=0)


def _decay_gradient_kernel(db_ref, dkeys_ref, through_ref, b_ref, rel_ref, reset_ref,
                           dg_ref):
  """dL/dg_t over one chunk from the gradient kernel's parts (see `_log_decay_gradient`):

    inner_t = Σ_{u ≥ t in t's run} db_u                        (0 at a reset token)
    outer_t = Σ_{u < t} dkeys_u (u in the last run) + e^{b_C} through   (t in the last
              run, not a reset token; the second term only if the chunk has no reset)

  With forward prefix sums S = cumsum(db): inner_t = E_t − S_t + db_t, E_t the sum up to
  the end of t's run — the chunk's total when it has no reset, else a masked sum over
  the runs up to t's (a `[C, C]` matmul for a vector gate, f32 IEEE).
  """
  db, rel, reset = db_ref[...], rel_ref[...], reset_ref[...] != 0
  vector = db.ndim == 2
  chunk = db.shape[0]
  rows = (lambda x: x[:, None]) if vector else (lambda x: x)
  rel_last = rel_ref[chunk - 1]
  last_run = rows(rel == rel_last)
  prefix = jnp.cumsum(db, axis=0)
  keys = jnp.where(last_run, dkeys_ref[...], 0.0)
  through = through_ref[...]
  through = through[None, :] if vector else jnp.sum(through)
  b_last = _gate(b_ref, pl.ds(chunk - 1, 1)).reshape(1, -1) if vector else b_ref[chunk - 1]
  through = jnp.where(rel_last == 0, jnp.exp(b_last) * through, 0.0)
  outer = jnp.where(last_run & ~rows(reset), jnp.cumsum(keys, axis=0) - keys + through, 0.0)

  def write(run_end):
    dg_ref[...] = jnp.where(rows(reset), 0.0, run_end - prefix + db) + outer

  pl.when(rel_last == 0)(lambda: write(jnp.sum(db, axis=0, keepdims=vector)))

  @pl.when(rel_last != 0)
  def _runs():
    up_to_run = rel[None, :] <= rel[:, None]  # [t, u]: u in t's run or an earlier one
    if vector:
      write(_dot(up_to_run.astype(jnp.float32), db, "nn", jnp.float32))
    else:
      write(jnp.sum(jnp.where(up_to_run, db[None, :], 0.0), axis=1))


@dataclasses.dataclass(frozen=True)
class _Plan:
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
  interpret: bool

  @property
  def chunks(self):
    return self.pieces * self.chunks_per_piece

  def call(self, kernel, name, num_warps=None, **kwargs):
    params = plgpu.CompilerParams(num_warps=num_warps or self.num_warps,
                                  num_stages=self.num_stages)
    return pl.pallas_call(kernel, name=name, interpret=self.interpret,
                          compiler_params=params, **kwargs)


def _state_call(x, y, b, rel, start, plan, *, reverse, write_states):
  """Launches `_state_kernel`; x `[B, T, Hx, K]` (Hx divides H), y `[B, T, H, V]`,
  start `[B, H, P, K, V]`. Returns ([h_n `[B, H, N, K, V]`,] ends `[B, H, P, K, V]`)."""
  batch, _, x_heads, key_dim = x.shape
  heads, value_dim = y.shape[2:]
  ratio = heads // x_heads
  bk, bv, piece = plan.block_k, plan.block_v, plan.chunks_per_piece * plan.chunk
  if b.ndim == 4:
    b_spec = pl.BlockSpec((None, piece, None, bk), lambda n, h, p, i, j: (n, p, h, i))
  else:
    b_spec = pl.BlockSpec((None, piece, None), lambda n, h, p, i, j: (n, p, h))
  tile = lambda length: pl.BlockSpec((None, None, length, bk, bv),
                                     lambda n, h, p, i, j: (n, h, p, i, j))
  in_specs = [
      pl.BlockSpec((None, piece, None, bk), lambda n, h, p, i, j: (n, p, h // ratio, i)),
      pl.BlockSpec((None, piece, None, bv), lambda n, h, p, i, j: (n, p, h, j)),
      b_spec,
      pl.BlockSpec((None, piece), lambda n, h, p, i, j: (n, p)),
      tile(None),
  ]
  out_specs = [tile(None)]
  out_shape = [jax.ShapeDtypeStruct(start.shape, jnp.float32)]
  if write_states:
    out_specs.insert(0, tile(plan.chunks_per_piece))
    # Stored in the inputs' 16-bit dtype (the kernels' dots read them in it anyway).
    out_shape.insert(0, jax.ShapeDtypeStruct(
        (batch, heads, plan.chunks, key_dim, value_dim), _storage_dtype(x.dtype)))
  kernel = functools.partial(_state_kernel, chunk=plan.chunk, chunks=plan.chunks_per_piece,
                             reverse=reverse, scale=plan.scale)
  return plan.call(
      kernel, "linear_attention_state_bwd" if reverse else "linear_attention_state_fwd",
      grid=(batch, heads, plan.pieces, key_dim // bk, value_dim // bv),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape)(x, y, b, rel, start)


def _piece_starts(x, y, b, rel, boundary, piece_decay, plan, *, reverse, state_call):
  """The state entering each sequence piece (leaving it, in reverse) `[B, H, P, K, V]`.

  boundary is the initial state (dL/d(final state) in reverse); piece_decay
  `[B, H, P, K|1, 1]` is each piece's M. With P > 1 a first launch gives each piece's E
  from a zero start and a scan over P chains them. state_call: `_state_call` or a launch
  with its arguments and results.
  """
  if plan.pieces == 1:
    return boundary[:, :, None]
  zeros = jnp.zeros(boundary.shape[:2] + (plan.pieces,) + boundary.shape[2:], jnp.float32)
  (partial,) = state_call(x, y, b, rel, zeros, plan, reverse=reverse, write_states=False)

  def chain(s, xs):  # S_end = M ⊙ S_start + E, piece by piece
    decay, end = xs
    return decay * s + end, s

  _, starts = lax.scan(chain, boundary, (jnp.moveaxis(piece_decay, 2, 0),
                                         jnp.moveaxis(partial, 2, 0)), reverse=reverse)
  return jnp.moveaxis(starts, 0, 2)


def _state_pass(x, y, b, rel, boundary, piece_decay, plan, *, reverse, state_call):
  """The state recurrence over the whole sequence, pieces in parallel.

  Forward: boundary is the initial state; returns h_n for every chunk and the final state.
  Backward (x = q, y = dO): boundary is dL/d(final state); returns dh_n and
  dL/d(initial state).
  """
  starts = _piece_starts(x, y, b, rel, boundary, piece_decay, plan, reverse=reverse,
                         state_call=state_call)
  states, ends = state_call(x, y, b, rel, starts, plan, reverse=reverse, write_states=True)
  return states, ends[:, :, 0 if reverse else -1]


def _chunk_specs(q, v, b, chunk, width):
  """BlockSpecs over a (batch, head, chunk, value block) grid: whole-chunk q/k (by key
  head), v-like arrays and states `width` columns wide, b and rel."""
  ratio = v.shape[2] // q.shape[2]
  key_dim = q.shape[-1]
  qk = pl.BlockSpec((None, chunk, None, key_dim), lambda n, h, t, j: (n, t, h // ratio, 0))
  vv = pl.BlockSpec((None, chunk, None, width), lambda n, h, t, j: (n, t, h, j))
  if b.ndim == 4:
    bb = pl.BlockSpec((None, chunk, None, key_dim), lambda n, h, t, j: (n, t, h, 0))
  else:
    bb = pl.BlockSpec((None, chunk, None), lambda n, h, t, j: (n, t, h))
  rel = pl.BlockSpec((None, chunk), lambda n, h, t, j: (n, t))
  state = pl.BlockSpec((None, None, None, key_dim, width), lambda n, h, t, j: (n, h, t, 0, j))
  return qk, vv, bb, rel, state


def _fused_output_call(q, k, v, b, rel, starts, plan):
  """Launches `_fused_output_kernel` over (batch, head, piece, value block); starts
  `[B, H, P, K, V]`. Returns o and the state leaving each piece `[B, H, P, K, V]`."""
  batch, _, key_heads, key_dim = q.shape
  heads, value_dim = v.shape[2:]
  ratio = heads // key_heads
  bv, piece = plan.block_v, plan.chunks_per_piece * plan.chunk
  qk = pl.BlockSpec((None, piece, None, key_dim), lambda n, h, p, j: (n, p, h // ratio, 0))
  vo = pl.BlockSpec((None, piece, None, bv), lambda n, h, p, j: (n, p, h, j))
  if b.ndim == 4:
    bb = pl.BlockSpec((None, piece, None, key_dim), lambda n, h, p, j: (n, p, h, 0))
  else:
    bb = pl.BlockSpec((None, piece, None), lambda n, h, p, j: (n, p, h))
  state = pl.BlockSpec((None, None, None, key_dim, bv), lambda n, h, p, j: (n, h, p, 0, j))
  kernel = functools.partial(_fused_output_kernel, chunk=plan.chunk,
                             chunks=plan.chunks_per_piece, scale=plan.scale, sub=plan.sub)
  return plan.call(
      kernel, "linear_attention_fused_fwd",
      grid=(batch, heads, plan.pieces, value_dim // bv),
      in_specs=[qk, qk, vo, bb, pl.BlockSpec((None, piece), lambda n, h, p, j: (n, p)),
                state],
      out_specs=[vo, state],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct(starts.shape, jnp.float32)],
  )(q, k, v, b, rel, starts)


def _gradient_call(q, k, v, do, b, rel, states, d_states, plan):
  """Launches `_gradient_kernel` over (batch, head, chunk, value block).

  Returns dq, dk per value head `[B, T, H, K]`, dv, and the decay-gradient parts (d_b,
  d_keys like b, through `[B, H, N, K]`); all but dv are partial sums over one value
  block, summed here when there are several.
  """
  batch, _, heads, value_dim = v.shape
  key_dim, chunk, bv = k.shape[-1], plan.chunk, plan.gradient_block_v
  splits = value_dim // bv
  qk, vv, bb, rr, state = _chunk_specs(q, v, b, chunk, bv)
  partial = lambda shape, dtype: jax.ShapeDtypeStruct((splits,) + shape, dtype)
  # dq, dk per value head; f32 when summed over value blocks or over a group of value
  # heads that share a key head.
  sums = splits > 1 or heads != q.shape[2]
  per_head = partial(k.shape[:2] + (heads, key_dim),
                     jnp.float32 if sums else _storage_dtype(q.dtype))
  dqk_spec = pl.BlockSpec((None, None, chunk, None, key_dim),
                          lambda n, h, t, j: (j, n, t, h, 0))
  if b.ndim == 4:
    db_spec = dqk_spec
  else:
    db_spec = pl.BlockSpec((None, None, chunk, None), lambda n, h, t, j: (j, n, t, h))
  through_spec = pl.BlockSpec((None, None, None, None, key_dim),
                              lambda n, h, t, j: (j, n, h, t, 0))
  in_specs = [qk, qk, vv, vv, bb, rr, state, state]
  db_shape = partial(b.shape, jnp.float32)
  out_specs = [dqk_spec, dqk_spec, vv, db_spec, db_spec]  # dq, dk, dv, d_b, d_keys
  out_shape = [per_head, per_head, jax.ShapeDtypeStruct(v.shape, v.dtype), db_shape,
               db_shape]
  launch = lambda stage, **kwargs: plan.call(
      functools.partial(_gradient_kernel, scale=plan.scale, sub=plan.sub, stage=stage),
      "linear_attention_gradients_" + stage,
      num_warps=plan.gradient_num_warps, grid=(batch, heads, plan.chunks, splits),
      **kwargs)
  inputs = (q, k, v, do, b, rel, states, d_states)
  through_shape = partial((batch, heads, plan.chunks, key_dim), jnp.float32)
  if b.ndim == 3:
    *grads, through = launch("all", in_specs=in_specs, out_specs=out_specs + [through_spec],
                             out_shape=out_shape + [through_shape])(*inputs)
  else:  # vector gate: factored chunks in two launches, then the chunks left unfactored
    dq, d_b = launch("queries", in_specs=in_specs, out_specs=[dqk_spec, db_spec],
                     out_shape=[per_head, db_shape])(*inputs)
    dk, dv, d_b, d_keys, through = launch(
        "keys", in_specs=in_specs + [db_spec], out_specs=out_specs[1:] + [through_spec],
        out_shape=out_shape[1:] + [through_shape],
        input_output_aliases={len(inputs): 2})(*inputs, d_b)
    grads = launch("exact", in_specs=in_specs + out_specs, out_specs=out_specs,
                   out_shape=out_shape,
                   input_output_aliases={len(inputs) + i: i for i in range(5)},
                   )(*inputs, dq, dk, dv, d_b, d_keys)
  dq, dk, dv, d_b, d_keys = grads
  return (*(x.sum(0) for x in (dq, dk)), dv,
          *(x.sum(0) for x in (d_b, d_keys, through)))


def _prepare(q, k, v, g, resets, plan, chunk_cumsum):
  """Pads to whole pieces (zero q, k, v, no decay, no reset: the state is unchanged) and
  derives b (cumulative log decay inside each chunk; chunk_cumsum(g, plan) computes it for
  a vector gate), rel (resets so far inside each chunk) and each piece's decay M
  `[B, H, P, K|1, 1]` (zero if the piece holds a reset)."""
  batch, seq = k.shape[:2]
  t_pad = plan.chunks * plan.chunk
  pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - seq)] + [(0, 0)] * (x.ndim - 2))
  q, k, v, g, resets = map(pad, (q, k, v, g, resets))
  split = lambda x, n: x.reshape(batch, n, -1, *x.shape[2:])
  if g.ndim == 4:  # XLA's scan of a vector gate made a transposed copy of it (H100)
    b = chunk_cumsum(g, plan)
  else:  # where the kernel was 1 % slower
    b = jnp.cumsum(split(g, plan.chunks), axis=2).reshape(g.shape)
  rel = jnp.cumsum(split(resets.astype(jnp.int32), plan.chunks), axis=2).reshape(resets.shape)
  total = split(g, plan.pieces).sum(axis=2)  # [B, P, H(, K)]
  clean = ~split(resets, plan.pieces).any(axis=2)
  decay = jnp.where(clean.reshape(clean.shape + (1,) * (total.ndim - 2)), jnp.exp(total), 0.0)
  decay = jnp.moveaxis(decay, 1, 2)
  decay = decay[..., None] if g.ndim == 4 else decay[..., None, None]
  return q, k, v, b, rel, resets, decay


def _chunk_rows_spec(x, chunk):
  """BlockSpec of one chunk's rows of `[B, T, H(, K)]` or `[B, T]` over a (batch, chunk,
  head) grid."""
  if x.ndim == 2:
    return pl.BlockSpec((None, chunk), lambda n, t, h: (n, t))
  if x.ndim == 3:
    return pl.BlockSpec((None, chunk, None), lambda n, t, h: (n, t, h))
  return pl.BlockSpec((None, chunk, None, x.shape[3]), lambda n, t, h: (n, t, h, 0))


def _chunk_cumsum(g, plan):
  """b: the cumulative sum of g `[B, T, H, K]` (T whole chunks) inside each chunk."""
  spec = _chunk_rows_spec(g, plan.chunk)
  return plan.call(_chunk_cumsum_kernel, "linear_attention_chunk_cumsum",
                   grid=(g.shape[0], plan.chunks, g.shape[2]), in_specs=[spec],
                   out_specs=spec, out_shape=jax.ShapeDtypeStruct(g.shape, jnp.float32))(g)


def _log_decay_gradient(b, rel, resets, d_b, d_keys, through, plan):
  """dL/dg_t = Σ of P_ij over the pairs i ≥ t > j in t's run (see `_gradient_kernel`),
  gathered per chunk so that nothing large cancels: the pairs within the chunk or with
  the state entering it (a reverse sum of d_b from t), those of later queries with the
  chunk's keys before t (an exclusive sum of d_keys), and those of later queries with
  keys before the chunk (e^{b_C} through_n, if the chunk holds no reset; through
  `[B, H, N, K]` is Σ_v dh ⊙ h_n from `_gradient_kernel`). `_decay_gradient_kernel`,
  one program per (batch, chunk, head)."""
  spec = _chunk_rows_spec(b, plan.chunk)
  rows = _chunk_rows_spec(rel, plan.chunk)
  through_spec = pl.BlockSpec((None, None, None, through.shape[-1]),
                              lambda n, t, h: (n, h, t, 0))
  return plan.call(
      _decay_gradient_kernel, "linear_attention_decay_gradient",
      grid=(b.shape[0], plan.chunks, b.shape[2]),
      in_specs=[spec, spec, through_spec, spec, rows, rows], out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(b.shape, jnp.float32),
  )(d_b, d_keys, through, b, rel, resets.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _linear_attention(q, k, v, g, h0, resets, plan):
  return _forward(q, k, v, g, h0, resets, plan)[0]


class Launches(NamedTuple):
  """The kernel launches that `_forward` and `_backward` run: this module's, or others
  with the same arguments and results (`pallas_mosaic_gpu` passes its own)."""
  output: Callable[..., Any]  # `_fused_output_call`
  state: Callable[..., Any]  # `_state_call`
  gradients: Callable[..., Any]  # `_gradient_call`
  decay_gradient: Callable[..., Any]  # `_log_decay_gradient`
  chunk_cumsum: Callable[..., Any] | None = None  # `_chunk_cumsum`; None: no vector gate


TRITON_LAUNCHES = Launches(_fused_output_call, _state_call, _gradient_call,
                           _log_decay_gradient, _chunk_cumsum)


def _forward(q, k, v, g, h0, resets, plan, launches=TRITON_LAUNCHES):
  """The forward and its residuals."""
  qp, kp, vp, b, rel, _, decay = _prepare(q, k, v, g, resets, plan, launches.chunk_cumsum)
  # One pass: the chunk states never leave the chip.
  starts = _piece_starts(kp, vp, b, rel, h0, decay, plan, reverse=False,
                         state_call=launches.state)
  out, ends = launches.output(qp, kp, vp, b, rel, starts, plan)
  final = ends[:, :, -1]
  return (out[:, :k.shape[1]], final), (q, k, v, g, h0, resets, final)


def _backward(plan, residuals, cotangents, launches=TRITON_LAUNCHES):
  q, k, v, g, h0, resets, final = residuals
  d_out, d_final = cotangents
  batch, seq, key_heads, key_dim = k.shape
  ratio = v.shape[2] // key_heads
  qp, kp, vp, b, rel, resets_p, decay = _prepare(q, k, v, g, resets, plan,
                                                  launches.chunk_cumsum)
  d_out = jnp.pad(d_out.astype(q.dtype), [(0, 0), (0, qp.shape[1] - seq), (0, 0), (0, 0)])
  states, _ = _state_pass(kp, vp, b, rel, h0, decay, plan, reverse=False,
                          state_call=launches.state)
  d_states, d_h0 = _state_pass(qp, d_out, b, rel, d_final, decay, plan, reverse=True,
                               state_call=launches.state)
  dq, dk, dv, d_b, d_keys, through = launches.gradients(qp, kp, vp, d_out, b, rel, states,
                                                        d_states, plan)
  d_g = launches.decay_gradient(b, rel, resets_p, d_b, d_keys, through, plan)[:, :seq]
  group = lambda x: x[:, :seq].reshape(batch, seq, key_heads, ratio, key_dim).sum(3)
  return (group(dq).astype(q.dtype), group(dk).astype(k.dtype), dv[:, :seq], d_g, d_h0,
          None)


_linear_attention.defvjp(_forward, _backward)


def _make_plan(batch, seq, heads, key_dim, value_dim, dtype, vector, scale, chunk_size,
               block_sizes, interpret):
  blocks = block_sizes or BlockSizes.get_default(key_dim, value_dim, dtype, vector)
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
  return _Plan(scale=float(scale), chunk=chunk_size,
               sub=min(SUBCHUNK, chunk_size) if vector else chunk_size,
               pieces=-(-chunks // per_piece), chunks_per_piece=per_piece, block_k=block_k,
               block_v=block_v, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
               gradient_block_v=gradient_block_v,
               gradient_num_warps=blocks.gradient_num_warps or blocks.num_warps,
               interpret=bool(interpret))


def linear_attention(query, key, value, log_decay, initial_state, resets, *, scale: float,
                     chunk_size: int, interpret: bool = False,
                     block_sizes: BlockSizes | None = None):
  """Causal linear attention by the chunked Pallas/Triton kernels, with its VJP.

  Args:
    query, key: `[batch, seq, heads, key_dim]`.
    value: `[batch, seq, value_heads, value_dim]`, value_heads a multiple r of heads;
      query/key head h serves value heads h·r … h·r + r − 1.
    log_decay: None (no decay), `[value_heads]` (fixed per head), `[batch, seq,
      value_heads]` (scalar gate per token) or `[batch, seq, value_heads, key_dim]`
      (vector gate over keys); float, ≤ 0.
    initial_state: `[batch, value_heads, key_dim, value_dim]` float32.
    resets: `[batch, seq]` bool: the state is zeroed before these tokens.
    scale: multiplies every output.
    chunk_size: tokens per chunk, a power of two (≥ 16 when compiled).
    interpret: run the kernels in the Pallas interpreter (CPU).
    block_sizes: None for `BlockSizes.get_default`.

  Returns:
    out `[batch, seq, value_heads, value_dim]` in the query's dtype and the final state
    `[batch, value_heads, key_dim, value_dim]` float32.

  Key and value dims of any size run: they are zero-padded to `padded_dim`.

  Raises:
    NotImplementedError: naming the argument the kernels do not serve (a chunk size or
      block that is not a power of two, or below 16 when compiled; an empty sequence).
  """
  return call_with_plan(_linear_attention, query, key, value, log_decay, initial_state,
                        resets, scale, chunk_size, interpret, block_sizes)


def call_with_plan(kernel, query, key, value, log_decay, initial_state, resets, scale,
                   chunk_size, interpret, block_sizes):
  """kernel(q, k, v, g, h0, resets, plan): the public entry's work for a VJP function of
  this module's form (also the Triton-language one's): per-token gate, head dims padded
  to what Triton tiles take (`padded_dim`), plan, dtypes."""
  batch, seq, key_heads, key_dim = key.shape
  heads, value_dim = value.shape[2:]
  g = per_token_log_decay(log_decay, batch, seq, key_heads, heads, key_dim)
  vector = g.ndim == 4
  key_to, value_to = (padded_dim(key_dim, interpret, vector=vector),
                      padded_dim(value_dim, interpret))
  pad = lambda x, axis, to: jnp.pad(x, [(0, to - x.shape[axis]) if a == axis % x.ndim
                                        else (0, 0) for a in range(x.ndim)])
  query, key = pad(query, -1, key_to), pad(key, -1, key_to)
  value = pad(value, -1, value_to)
  g = pad(g, -1, key_to) if vector else g
  h0 = pad(pad(initial_state.astype(jnp.float32), -2, key_to), -1, value_to)
  plan = _make_plan(batch, seq, heads, key_to, value_to, query.dtype, vector, scale,
                    chunk_size, block_sizes, interpret)
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


def per_token_log_decay(log_decay, batch, seq, key_heads, heads, key_dim):
  """g: log_decay as a float32 gate per token, `[batch, seq, heads]` (None and fixed
  decays broadcast) or `[batch, seq, heads, key_dim]`; checks the head counts."""
  if heads % key_heads:
    raise ValueError(f"value heads ({heads}) must be a multiple of key heads ({key_heads}).")
  if log_decay is None:
    return jnp.zeros((batch, seq, heads), jnp.float32)
  if log_decay.shape == (heads,):
    return jnp.broadcast_to(log_decay.astype(jnp.float32), (batch, seq, heads))
  if log_decay.shape in ((batch, seq, heads), (batch, seq, heads, key_dim)):
    return log_decay.astype(jnp.float32)
  raise ValueError(f"log_decay has shape {log_decay.shape}; expected None, ({heads},), "
                   f"{(batch, seq, heads)} or {(batch, seq, heads, key_dim)}.")
