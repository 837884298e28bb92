"""Chunked causal linear attention with decays and gates as Mosaic TPU Pallas kernels.

The recurrence (Katharopoulos et al. 2020; RetNet; Lightning Attention-2; GLA, Yang et al.
2024; Mamba-2 SSD):

  S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t,   a_t = exp(g_t),  g_t ≤ 0,

with the state zeroed before token t where `resets[b, t]`. The sequence is cut into chunks
of C tokens; one grid step handles one chunk of one (batch, value head), and the chunk
axis is the innermost, sequential ("arbitrary") grid axis, so the state S `[K, V]` lives in
a VMEM scratch buffer from one chunk to the next (Lightning Attention-2's split):

  b_i    = Σ_{j ≤ i in chunk} g_j                (cumulative log decay, ≤ 0, falling)
  o_i    = scale · [Σ_{j ≤ i} (q_i ⊙ e^{b_i − b_j})ᵀ k_j v_j + (q_i ⊙ e^{b_i})ᵀ S_prev]
  S_next = e^{b_C} ⊙ S_prev + Σ_j (k_j ⊙ e^{b_C − b_j}) v_jᵀ

Every exponent is ≤ 0, so nothing overflows however strong the decay. For a scalar gate
(none, fixed per head, per token) the pair factor e^{b_i − b_j} is one `[C, C]` matrix.
For a vector gate over keys (GLA) it differs per key; the chunk is cut into sub-chunks of
s tokens: between sub-chunks the factor goes through the reference point r_I = b at the
end of sub-chunk I − 1, `(q_i e^{b_i − r_I}) · (k_j e^{r_I − b_j})`, both factors ≤ 1 and
one MXU matmul per sub-chunk; inside a sub-chunk each column j is the exact
`Σ_k q_ik k_jk e^{b_ik − b_jk}` on the VPU (C·s·K exponentials per chunk).

Resets are masks, not decays (a decay of −inf would give −inf − (−inf) in b_i − b_j):
r_i counts the resets in the chunk up to token i; token i sees token j iff r_i = r_j,
S_prev reaches token i iff r_i = 0, token j enters S_next iff r_j = r_C, and S_prev
enters S_next iff r_C = 0.

Backward: one reverse sweep over the chunks carrying dS = ∂L/∂S_next in VMEM scratch,
reading the chunk states S_prev that the forward saved (`[B, H, N, K, V]` float32; the
recomputation-free choice of flash-linear-attention's `chunk_fwd_h`). With the gradients
dq, dk in hand, the gradient of the cumulative log decay is (GLA's identity)

  ∂L/∂b_i = q_i ⊙ dq_i − k_i ⊙ dk_i   (+ ⟨S_next, dS⟩ on b_C),

summed over keys for a scalar gate, and ∂L/∂g is its reverse cumulative sum in the chunk.

Layout and dtypes: the wrapper moves heads before time (`[B, H, T, D]`: the blocks'
last two dims are then (C, D), tiled by Mosaic) and pads T to a multiple of C with zero
q, k, v and zero log decay, which leave the state unchanged. A query/key head serves
value heads h·r … h·r + r − 1 through its index map; the backward writes dq, dk per value
head and the wrapper sums each group. Matmul operands are in the inputs' dtype (bf16 on
the MXU for bf16 inputs, f32 at HIGHEST precision for f32), accumulation and the state
are float32, the output is in the inputs' dtype.

Limits: one (batch, head) sweeps its chunks alone (no split of the sequence into pieces
combined through the affine state map, so B·Hv is the only parallelism); the heads-first
transposes and padding are XLA copies around the kernels; dq, dk cost Hv/Hk times their
size before the group sum; the block-size table is not yet measured on a TPU, and the
kernels are checked on CPU in TPU interpret mode and by Mosaic lowering, not compiled on
a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.linear_attention import common

F32 = jnp.float32
CHUNK_ALIGN = 16  # a bf16 (16, 128) tile's rows: every chunk is a multiple of it
MAX_HEAD_DIM = 256  # K·V float32 state and the [C, K] blocks stay small in VMEM


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the kernels (no effect on the math, only on speed and VMEM).

  Attributes:
    chunk: tokens per grid step (C), a multiple of 16 and of `subchunk`.
    subchunk: tokens per sub-chunk (s) of the vector gate's intra-chunk term.
  """
  chunk: int = 64
  subchunk: int = 16

  def __post_init__(self):
    if self.subchunk < 8 or self.subchunk % 8:
      raise ValueError(f"subchunk must be a positive multiple of 8; got {self.subchunk}.")
    if self.chunk < CHUNK_ALIGN or self.chunk % CHUNK_ALIGN or self.chunk % self.subchunk:
      raise ValueError(f"chunk must be a multiple of {CHUNK_ALIGN} and of subchunk "
                       f"({self.subchunk}); got {self.chunk}.")

  @classmethod
  def get_default(cls, *, chunk_size: int, seq_len: int, head_dim: int,
                  vector_gate: bool) -> BlockSizes:
    """The caller's chunk size, rounded up to the tiling and capped by `_DEFAULTS`."""
    max_chunk, subchunk = _DEFAULTS[(vector_gate, head_dim > 64)]
    chunk = min(_round_up(chunk_size, CHUNK_ALIGN), max_chunk,
                _round_up(seq_len, CHUNK_ALIGN))
    return cls(chunk=_round_up(chunk, subchunk), subchunk=subchunk)


# (vector gate, head dim > 64) -> (largest chunk, subchunk). Not yet measured on a TPU:
# the scalar-gate cap keeps the [C, C] scores ≤ 256 KiB; the vector-gate cap bounds the
# unrolled per-column loop (C iterations) and its C·s·K exponentials per chunk.
_DEFAULTS = {
    (False, False): (256, 16),
    (False, True): (256, 16),
    (True, False): (128, 16),
    (True, True): (64, 16),
}


def _round_up(x, m):
  return -(-x // m) * m


# ---------------------------------------------------------------------------------------
# Kernel bodies: one chunk of one (batch, value head); everything below is [rows, lanes].


def _mm(a, b, form, dtype):
  """`a @ b` ("nn"), `a @ bᵀ` ("nt") or `aᵀ @ b` ("tn") on the MXU in `dtype`, f32 sums."""
  if form == "tn":
    a, form = a.T, "nn"
  dims = ((1,), (0,)) if form == "nn" else ((1,), (1,))
  precision = lax.Precision.HIGHEST if dtype == F32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                         precision=precision, preferred_element_type=F32)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _row_to_col(x):
  """`[1, n]` → `[n, 1]` by a masked lane reduction (no relayout of a 1-wide vector)."""
  n = x.shape[1]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), x, 0.0), axis=1,
                 keepdims=True)


def _col_to_row(x):
  """`[n, 1]` → `[1, n]`."""
  n = x.shape[0]
  return jnp.sum(jnp.where(_iota((n, n), 0) == _iota((n, n), 1), x, 0.0), axis=0,
                 keepdims=True)


class _Gates(NamedTuple):
  """Decays and masks of one chunk; `[C, 1]` columns for a scalar gate, `[C, K]` for GLA."""
  mask: jax.Array  # [C, C] bool: j ≤ i and same run
  pair: jax.Array | None  # [C, C] e^{b_i − b_j} on the mask, 0 off it (scalar gates)
  b: jax.Array  # cumulative log decay b_i
  q_decay: jax.Array  # e^{b_i} where S_prev reaches token i, else 0
  k_decay: jax.Array  # e^{b_C − b_j} where token j enters S_next, else 0
  carry: jax.Array  # [1, 1] or [1, K]: e^{b_C}, or 0 if a reset cuts S_prev off


def _chunk_gates(g, runs, gate):
  """`g`: None, `[1, C]` (scalar gate) or `[C, K]` (vector); `runs`: `[1, C]` r_i."""
  c = runs.shape[1]
  runs_col = _row_to_col(runs)
  lower = _iota((c, c), 1) <= _iota((c, c), 0)
  mask = lower & (runs_col == runs)
  if gate == "vector":
    b = _mm(lower.astype(F32), g, "nn", F32)  # in-chunk cumulative sum over sublanes
    pair = None
  else:
    if gate == "scalar":
      b = jnp.sum(jnp.where(lower, g, 0.0), axis=1, keepdims=True)  # [C, 1]
    else:
      b = jnp.zeros((c, 1), F32)
    b_row = _col_to_row(b)
    pair = jnp.where(mask, jnp.exp(jnp.minimum(b - b_row, 0.0)), 0.0)
  b_last = b[c - 1:, :]
  last_run = runs[:, c - 1:]
  q_decay = jnp.where(runs_col == 0.0, jnp.exp(b), 0.0)
  k_decay = jnp.where(runs_col == last_run, jnp.exp(b_last - b), 0.0)
  carry = jnp.where(last_run == 0.0, jnp.exp(b_last), 0.0)
  return _Gates(mask, pair, b, q_decay, k_decay, carry)


def _carry_rows(gates):
  """The carry as a column scaling the state's K rows: `[1, 1]` or `[K, 1]`."""
  return gates.carry if gates.pair is not None else _row_to_col(gates.carry)


def _vector_intra(q, k, b, s, dtype, da=None):
  """The vector gate's intra-chunk terms, by sub-chunks of s tokens.

  Returns A_ij = Σ_k q_ik k_jk e^{b_ik − b_jk} for j ≤ i (`[C, C]`, garbage above the
  diagonal) and, given dA (zero off the mask), dq_i = Σ_j dA_ij k_j ⊙ e^{b_i − b_j} and
  dk_j = Σ_i dA_ij q_i ⊙ e^{b_i − b_j} (else None, None).
  """
  c = q.shape[0]
  lane, sublane = _iota((s, c), 1), _iota((s, 1), 0)
  a_rows, dq_rows, dk_rows = [], [], []
  dk = jnp.zeros(k.shape, F32)
  for start in range(0, c, s):  # sub-chunk I: rows start … start + s − 1
    q_i, b_i = q[start:start + s], b[start:start + s]
    a_i, dq_i, dk_i = jnp.zeros((s, c), F32), jnp.zeros(q_i.shape, F32), None
    if da is not None:
      da_i, dk_i = da[start:start + s], jnp.zeros(q_i.shape, F32)
    if start:  # earlier sub-chunks, through the reference point r_I = b_{start−1}
      ref = b[start - 1:start]
      q_decay, k_decay = jnp.exp(b_i - ref), jnp.exp(jnp.minimum(ref - b, 0.0))
      a_i = jnp.where(lane < start, _mm(q_i * q_decay, k * k_decay, "nt", dtype), 0.0)
      if da is not None:
        da_between = jnp.where(lane < start, da_i, 0.0)
        dq_i = q_decay * _mm(da_between, k * k_decay, "nn", dtype)
        dk = dk + k_decay * _mm(da_between, q_i * q_decay, "tn", dtype)
    for j in range(start, start + s):  # the diagonal block, one exact column at a time
      decay = jnp.exp(jnp.minimum(b_i - b[j:j + 1], 0.0))  # e^{b_i − b_j}, [s, K]
      decayed = q_i * decay
      a_i = jnp.where(lane == j, jnp.sum(decayed * k[j:j + 1], axis=1, keepdims=True), a_i)
      if da is not None:
        da_j = jnp.sum(jnp.where(lane == j, da_i, 0.0), axis=1, keepdims=True)  # [s, 1]
        dq_i = dq_i + da_j * k[j:j + 1] * decay
        dk_j = jnp.sum(da_j * decayed, axis=0, keepdims=True)
        dk_i = jnp.where(sublane == j - start, dk_j, dk_i)
    a_rows.append(a_i)
    dq_rows.append(dq_i)
    dk_rows.append(dk_i)
  if da is None:
    return jnp.concatenate(a_rows, axis=0), None, None
  return (jnp.concatenate(a_rows, axis=0), jnp.concatenate(dq_rows, axis=0),
          dk + jnp.concatenate(dk_rows, axis=0))


def _scores(q, k, gates, subchunk, dtype):
  """The masked, decayed intra-chunk scores A `[C, C]` (scale not applied)."""
  if gates.pair is not None:
    return _mm(q, k, "nt", dtype) * gates.pair
  return jnp.where(gates.mask, _vector_intra(q, k, gates.b, subchunk, dtype)[0], 0.0)


def _unpack(refs, gate, names):
  """Names the kernel's refs; the gate's refs (g, dg) are absent without a gate."""
  refs = list(refs)
  return {name: None if name in ("g", "dg") and gate == "none" else refs.pop(0)
          for name in names}


def _forward_kernel(*refs, gate, scale, subchunk, save_states):
  names = ["q", "k", "v", "g", "runs", "s0", "o", "final"]
  r = _unpack(refs, gate, names + ["states"] * save_states + ["state"])
  n = pl.program_id(2)
  state_ref = r["state"]  # S_prev of this chunk: the loop over chunks is the grid's

  @pl.when(n == 0)
  def _():
    state_ref[...] = r["s0"][...]

  dtype = r["q"].dtype
  q, k, v = (r[x][...].astype(F32) for x in "qkv")
  g = r["g"][...] if r["g"] is not None else None
  gates = _chunk_gates(g, r["runs"][...], gate)
  s_prev = state_ref[...]
  if save_states:
    r["states"][...] = s_prev
  a = _scores(q, k, gates, subchunk, dtype)
  o = _mm(a, v, "nn", dtype) + _mm(q * gates.q_decay, s_prev, "nn", dtype)
  r["o"][...] = (scale * o).astype(r["o"].dtype)
  s_next = _carry_rows(gates) * s_prev + _mm(k * gates.k_decay, v, "tn", dtype)
  state_ref[...] = s_next

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    r["final"][...] = s_next


def _backward_kernel(*refs, gate, scale, subchunk):
  names = ["q", "k", "v", "g", "runs", "states", "do", "dfinal",
           "dq", "dk", "dv", "dg", "ds0", "dstate"]
  r = _unpack(refs, gate, names)
  n = pl.program_id(2)  # chunks in reverse: the index maps read chunk N − 1 − n
  dstate_ref = r["dstate"]  # dS = ∂L/∂S_next of this chunk

  @pl.when(n == 0)
  def _():
    dstate_ref[...] = r["dfinal"][...]

  dtype = r["q"].dtype
  q, k, v = (r[x][...].astype(F32) for x in "qkv")
  do = scale * r["do"][...].astype(F32)
  g = r["g"][...] if r["g"] is not None else None
  gates = _chunk_gates(g, r["runs"][...], gate)
  s_prev, ds = r["states"][...], dstate_ref[...]

  # Intra-chunk: o = A v with A the decayed scores; dA = do vᵀ on the mask.
  da = _mm(do, v, "nt", dtype)
  if gates.pair is not None:
    da = da * gates.pair
    dq, dk = _mm(da, k, "nn", dtype), _mm(da, q, "tn", dtype)
    a = _mm(q, k, "nt", dtype) * gates.pair
  else:
    da = jnp.where(gates.mask, da, 0.0)
    a, dq, dk = _vector_intra(q, k, gates.b, subchunk, dtype, da)
    a = jnp.where(gates.mask, a, 0.0)
  dv = _mm(a, do, "tn", dtype)

  # Inter-chunk: o += (q ⊙ q_decay) S_prev;  S_next = carry ⊙ S_prev + (k ⊙ k_decay)ᵀ v.
  dq = dq + gates.q_decay * _mm(do, s_prev, "nt", dtype)
  dk_state = gates.k_decay * _mm(v, ds, "nt", dtype)
  dk = dk + dk_state
  dv = dv + _mm(k * gates.k_decay, ds, "nn", dtype)
  r["dq"][...], r["dk"][...], r["dv"][...] = dq, dk, dv

  if gate != "none":
    # ∂L/∂b_i = q_i dq_i − k_i dk_i, plus ⟨S_next, dS⟩ on b_C, which reaches every g_t.
    db = q * dq - k * dk
    through = jnp.sum(k * dk_state, axis=0, keepdims=True)
    s_ds = jnp.sum(s_prev * ds, axis=1, keepdims=True)  # [K, 1]
    if gate == "vector":
      through = through + gates.carry * _col_to_row(s_ds)
      c = q.shape[0]
      upper = (_iota((c, c), 1) >= _iota((c, c), 0)).astype(F32)
      r["dg"][...] = _mm(upper, db, "nn", F32) + through  # reverse cumulative sum
    else:
      through = jnp.sum(through, axis=1, keepdims=True) + gates.carry * jnp.sum(s_ds)
      db = jnp.sum(db, axis=1, keepdims=True)  # [C, 1]
      c = db.shape[0]
      suffix = jnp.where(_iota((c, c), 0) >= _iota((c, c), 1), db, 0.0)
      r["dg"][...] = jnp.sum(suffix, axis=0, keepdims=True) + through  # [1, C]

  ds_prev = _mm(q * gates.q_decay, do, "tn", dtype) + _carry_rows(gates) * ds
  dstate_ref[...] = ds_prev

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    r["ds0"][...] = ds_prev


# ---------------------------------------------------------------------------------------
# pallas_call wrappers. Kernel layout: q, k `[B, Hk, Tp, K]`; v, o `[B, Hv, Tp, V]`;
# scalar g `[B, Hv, N, 1, C]`; vector g `[B, Hv, Tp, K]`; runs `[B, N, 1, C]` float32;
# states `[B, Hv, N, K, V]`. Grid (B, Hv, N), the chunk axis sequential.


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static configuration shared by the kernels (hashable)."""
  scale: float
  blocks: BlockSizes
  gate: str  # "none", "scalar" or "vector"
  interpret: bool | pltpu.InterpretParams


class _Specs:
  """BlockSpecs of the kernel arrays, chunks visited forwards or in reverse."""

  def __init__(self, group, chunk, num_chunks, reverse):
    self.group, self.c = group, chunk
    self.chunk = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)

  def query_key(self, dim):
    return pl.BlockSpec((None, None, self.c, dim),
                        lambda b, h, n: (b, lax.div(h, self.group), self.chunk(n), 0))

  def per_head(self, dim):
    return pl.BlockSpec((None, None, self.c, dim), lambda b, h, n: (b, h, self.chunk(n), 0))

  def scalar_gate(self):
    return pl.BlockSpec((None, None, None, 1, self.c),
                        lambda b, h, n: (b, h, self.chunk(n), 0, 0))

  def gate(self, st, key_dim):
    return self.per_head(key_dim) if st.gate == "vector" else self.scalar_gate()

  def runs(self):
    return pl.BlockSpec((None, None, 1, self.c), lambda b, h, n: (b, self.chunk(n), 0, 0))

  def state(self, k, v):
    return pl.BlockSpec((None, None, k, v), lambda b, h, n: (b, h, 0, 0))

  def states(self, k, v):
    return pl.BlockSpec((None, None, None, k, v),
                        lambda b, h, n: (b, h, self.chunk(n), 0, 0))


def _pallas_call(kernel, st, grid, in_specs, out_specs, out_shape, state_shape):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM(state_shape, F32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
  )


def _forward(st, q, k, v, g, runs, s0, save_states):
  batch, heads, seq, vdim = v.shape
  kdim, c = q.shape[-1], st.blocks.chunk
  n = seq // c
  sp = _Specs(heads // q.shape[1], c, n, reverse=False)
  has_gate = st.gate != "none"
  in_specs = [sp.query_key(kdim), sp.query_key(kdim), sp.per_head(vdim)]
  in_specs += [sp.gate(st, kdim)] * has_gate + [sp.runs(), sp.state(kdim, vdim)]
  out_specs = [sp.per_head(vdim), sp.state(kdim, vdim)]
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct(s0.shape, F32)]
  if save_states:
    out_specs.append(sp.states(kdim, vdim))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, n, kdim, vdim), F32))
  kernel = functools.partial(_forward_kernel, gate=st.gate, scale=st.scale,
                             subchunk=st.blocks.subchunk, save_states=save_states)
  args = [q, k, v] + [g] * has_gate + [runs, s0]
  outs = _pallas_call(kernel, st, (batch, heads, n), in_specs, out_specs, out_shape,
                      (kdim, vdim))(*args)
  return outs[0], outs[1], (outs[2] if save_states else None)


def _backward(st, q, k, v, g, runs, states, do, dfinal):
  batch, heads, seq, vdim = v.shape
  kdim, c = q.shape[-1], st.blocks.chunk
  n = seq // c
  sp = _Specs(heads // q.shape[1], c, n, reverse=True)
  has_gate = st.gate != "none"
  gate_spec = [sp.gate(st, kdim)] * has_gate
  in_specs = [sp.query_key(kdim), sp.query_key(kdim), sp.per_head(vdim), *gate_spec,
              sp.runs(), sp.states(kdim, vdim), sp.per_head(vdim), sp.state(kdim, vdim)]
  out_specs = [sp.per_head(kdim), sp.per_head(kdim), sp.per_head(vdim), *gate_spec,
               sp.state(kdim, vdim)]
  out_shape = [jax.ShapeDtypeStruct((batch, heads, seq, kdim), F32)] * 2
  out_shape += [jax.ShapeDtypeStruct(v.shape, F32)]
  out_shape += [jax.ShapeDtypeStruct(g.shape, F32)] if has_gate else []
  out_shape += [jax.ShapeDtypeStruct(dfinal.shape, F32)]
  kernel = functools.partial(_backward_kernel, gate=st.gate, scale=st.scale,
                             subchunk=st.blocks.subchunk)
  args = [q, k, v] + [g] * has_gate + [runs, states, do, dfinal]
  outs = _pallas_call(kernel, st, (batch, heads, n), in_specs, out_specs, out_shape,
                      (kdim, vdim))(*args)
  dq, dk, dv = outs[:3]
  dg = outs[3] if has_gate else None
  return dq, dk, dv, dg, outs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(st, q, k, v, g, runs, s0):
  out, final, _ = _forward(st, q, k, v, g, runs, s0, save_states=False)
  return out, final


def _chunked_fwd(st, q, k, v, g, runs, s0):
  out, final, states = _forward(st, q, k, v, g, runs, s0, save_states=True)
  return (out, final), (q, k, v, g, runs, states)


def _chunked_bwd(st, residuals, cotangents):
  q, k, v, g, runs, states = residuals
  dout, dfinal = cotangents
  dq, dk, dv, dg, ds0 = _backward(st, q, k, v, g, runs, states, dout.astype(v.dtype),
                                  dfinal.astype(F32))
  group_sum = lambda x: x.reshape(q.shape[:2] + (-1,) + x.shape[2:]).sum(2).astype(q.dtype)
  return (group_sum(dq), group_sum(dk), dv.astype(v.dtype), dg, jnp.zeros_like(runs), ds0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------------
# Public entry point.


def linear_attention(query, key, value, log_decay, initial_state, resets, *, scale: float,
                     chunk_size: int, interpret: bool | pltpu.InterpretParams = False,
                     block_sizes: BlockSizes | None = None):
  """Causal chunked linear attention with decay, gates, resets and states (Mosaic TPU).

  Args:
    query, key: `[B, T, Hk, K]` float32 or bfloat16 (feature maps already applied).
    value: `[B, T, Hv, V]`, the same dtype; Hv a multiple of Hk: query/key head h serves
      value heads h·r … h·r + r − 1, r = Hv // Hk.
    log_decay: None; `[Hv]` fixed per head; `[B, T, Hv]` per-token scalar gate; or
      `[B, T, Hv, K]` per-token gate over keys (GLA). Floating point, ≤ 0.
    initial_state: `[B, Hv, K, V]` float32 (None: zeros), the state before token 0.
    resets: `[B, T]` bool (None: no resets): the state is zeroed before these tokens.
    scale: multiplies every output.
    chunk_size: tokens per chunk; rounded up to a multiple of 16 and capped (see
      `BlockSizes.get_default`) unless `block_sizes` is given.
    interpret: False (compile for TPU), True or `pltpu.InterpretParams` (TPU interpret
      mode, on any platform).
    block_sizes: overrides the chunk and sub-chunk sizes.

  Returns:
    out `[B, T, Hv, V]` in the inputs' dtype and the final state `[B, Hv, K, V]` float32.
    Differentiable in query, key, value, log_decay and initial_state.

  Raises:
    NotImplementedError: naming the argument this kernel does not support.
  """
  batch, seq, heads, kdim = query.shape
  vheads, vdim = value.shape[2:]
  dtype = query.dtype
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise NotImplementedError(f"query dtype {dtype} is not supported; expected float32 "
                              "or bfloat16.")
  if key.dtype != dtype or value.dtype != dtype:
    raise NotImplementedError(f"key and value must share the query's dtype {dtype}; got "
                              f"{key.dtype} and {value.dtype}.")
  if key.shape != query.shape or value.shape[:2] != (batch, seq) or vheads % heads:
    raise NotImplementedError(f"query {query.shape}, key {key.shape} and value "
                              f"{value.shape} must be [B, T, Hk, K], [B, T, Hk, K], "
                              "[B, T, Hv, V] with Hv a multiple of Hk.")
  if seq == 0:
    raise NotImplementedError("query has an empty sequence (T = 0).")
  if max(kdim, vdim) > MAX_HEAD_DIM:
    raise NotImplementedError(f"key_dim {kdim} / value_dim {vdim}: at most "
                              f"{MAX_HEAD_DIM} each.")
  forms = {(vheads,): "scalar", (batch, seq, vheads): "scalar",
           (batch, seq, vheads, kdim): "vector"}
  if log_decay is not None and log_decay.shape not in forms:
    raise NotImplementedError(f"log_decay shape {log_decay.shape} is not one of "
                              f"{list(forms)}.")
  gate = "none" if log_decay is None else forms[log_decay.shape]
  if initial_state is None:
    initial_state = jnp.zeros((batch, vheads, kdim, vdim), F32)
  if initial_state.shape != (batch, vheads, kdim, vdim):
    raise NotImplementedError(f"initial_state shape {initial_state.shape} is not "
                              f"{(batch, vheads, kdim, vdim)}.")
  if resets is None:
    resets = jnp.zeros((batch, seq), bool)
  if resets.shape != (batch, seq):
    raise NotImplementedError(f"resets shape {resets.shape} is not {(batch, seq)}.")
  blocks = block_sizes or BlockSizes.get_default(
      chunk_size=int(chunk_size), seq_len=seq, head_dim=max(kdim, vdim),
      vector_gate=gate == "vector")
  if interpret is True:
    interpret = pltpu.InterpretParams()
  st = _Static(scale=float(scale), blocks=blocks, gate=gate, interpret=interpret)

  c = blocks.chunk
  pad = -seq % c
  n = (seq + pad) // c

  def heads_first(x):  # [B, T, H, D] -> [B, H, Tp, D], zero padding
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

  q, k, v = heads_first(query), heads_first(key), heads_first(value)
  g = None  # "none": the kernels take no gate
  if gate != "none":
    g = common.per_token_log_decay(log_decay, batch, seq, vheads)
  if gate == "scalar":
    g = jnp.pad(jnp.swapaxes(g, 1, 2), ((0, 0), (0, 0), (0, pad)))
    g = g.reshape(batch, vheads, n, 1, c)
  elif gate == "vector":
    g = heads_first(g)
  # r_i: resets in the chunk up to token i (padding joins the last run).
  runs = common.cumsum_in_chunks(jnp.pad(resets.astype(jnp.int32), ((0, 0), (0, pad))), c)
  runs = runs.astype(F32).reshape(batch, n, 1, c)
  out, final = _chunked(st, q, k, v, g, runs, initial_state.astype(F32))
  return jnp.swapaxes(out[:, :, :seq], 1, 2), final
