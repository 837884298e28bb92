"""FlashAttention-2 in the Triton language (`@triton.jit`, through jax-triton): forward and
backward, any NVIDIA GPU; CPU tests under Triton's interpreter (`triton_call`).

The algorithm, masks, GQA handling, sinks, soft cap, padding and results are those of
`pallas_triton` (its module docstring), which JAX 0.11 deprecates with the Pallas Triton
lowering; this module is its replacement in Triton's own language. One program per
(query block, batch, query head) walks the key blocks that can hold a visible key with
an online softmax in base 2; the backward recomputes P from the saved log-sum-exp, in a
dQ kernel per query block and a dK/dV kernel per key block that loops over the query
heads of its group. Blocks visible in full run without mask arithmetic (`_kv_blocks`,
`_q_blocks`: `mask.AttentionMask.kv_blocks` and `q_blocks` in Triton).

Arrays are addressed as `[B·T, H, D]` with global rows b·T + t; the kernels see the
lengths padded to the blocks (TQ, TK) and the head dims to powers of two (D, DV), and
mask by the real ones (Q_LEN, KV_LEN). A missing window bound, segment ids or sinks is a
constexpr flag, with a one-element placeholder array for an absent input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.flash_attention.common import (BlockSizes, TritonConfig, flash_vjp, pad,
                                                  pow2_head_dim, round_up, shrink_block,
                                                  triton_flash_attention)
from pallas_kernels.flash_attention.mask import AttentionMask
from pallas_kernels.triton_call import triton_call

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
LOG2E = tl.constexpr(_LOG2E)  # the same, inside the kernels


@triton.jit
def _rows(rows, head, cols, HEADS: tl.constexpr, WIDTH: tl.constexpr):
  """Offsets of the `[rows, cols]` tile of one head of an array `[B·T, HEADS, WIDTH]`."""
  return (rows[:, None] * HEADS + head) * WIDTH + cols[None, :]


@triton.jit
def _visible(q_pos, k_pos, q_seg, k_seg, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr,
             LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
             HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr):
  """`[bq, bk]` bool: key j < KV_LEN with -LEFT ≤ j − (i + KV_LEN − Q_LEN) ≤ RIGHT (a bound
  only where HAS_*) and, with SEGMENTS, equal segment ids (`AttentionMask.visible`)."""
  d = k_pos[None, :] - (q_pos[:, None] + (KV_LEN - Q_LEN))
  ok = k_pos[None, :] < KV_LEN
  if HAS_RIGHT:
    ok = ok & (d <= RIGHT)
  if HAS_LEFT:
    ok = ok & (d >= -LEFT)
  if SEGMENTS:
    ok = ok & (q_seg[:, None] == k_seg[None, :])
  return ok


@triton.jit
def _clip(lo, full_lo, full_hi, hi, SEGMENTS: tl.constexpr):
  """(lo, full_lo, full_hi, hi) with the full range inside [lo, hi); with segment ids
  every block is masked (`AttentionMask._clip`)."""
  if SEGMENTS:
    full_lo = hi
    full_hi = hi
  else:
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
  return lo, full_lo, full_hi, hi


@triton.jit
def _kv_blocks(q0, BQ: tl.constexpr, BK: tl.constexpr, Q_LEN: tl.constexpr,
               KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr):
  """`AttentionMask.kv_blocks`: the key blocks [lo, hi) query rows [q0, q0 + BQ) may see,
  [full_lo, full_hi) of them in full."""
  off: tl.constexpr = KV_LEN - Q_LEN
  q_end = tl.minimum(q0 + BQ, Q_LEN)
  lo = q0 * 0
  if HAS_LEFT:
    lo = tl.maximum(q0 + off - LEFT, 0) // BK
  hi = lo * 0 + tl.cdiv(KV_LEN, BK)
  full_lo = lo * 0
  full_hi = lo * 0 + KV_LEN // BK
  if HAS_RIGHT:
    last = tl.minimum(tl.maximum(q_end + off + RIGHT, 0), KV_LEN)
    hi = tl.maximum(tl.cdiv(last, BK), lo)
    full_hi = tl.minimum(tl.maximum(q0 + off + RIGHT + 1, 0), KV_LEN) // BK
  if HAS_LEFT:
    full_lo = tl.cdiv(tl.maximum(q_end - 1 + off - LEFT, 0), BK)
  hi = tl.where(q0 < Q_LEN, hi, lo)
  return _clip(lo, full_lo, full_hi, hi, SEGMENTS)


@triton.jit
def _q_blocks(k0, BK: tl.constexpr, BQ: tl.constexpr, Q_LEN: tl.constexpr,
              KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr):
  """`AttentionMask.q_blocks`: the query blocks keys [k0, k0 + BK) may be seen by."""
  off: tl.constexpr = KV_LEN - Q_LEN
  lo = k0 * 0
  if HAS_RIGHT:
    lo = tl.maximum(k0 - off - RIGHT, 0) // BQ
  hi = lo * 0 + tl.cdiv(Q_LEN, BQ)
  full_lo = lo * 0
  full_hi = lo * 0 + tl.cdiv(Q_LEN, BQ)
  if HAS_LEFT:
    last = tl.minimum(tl.maximum(k0 + BK - off + LEFT, 0), Q_LEN)
    hi = tl.maximum(tl.cdiv(last, BQ), lo)
    full_hi = tl.maximum(k0 - off + LEFT + 1, 0) // BQ
  if HAS_RIGHT:
    full_lo = tl.cdiv(tl.maximum(k0 + BK - 1 - off - RIGHT, 0), BQ)
  full_hi = tl.where(k0 + BK <= KV_LEN, full_hi, 0)  # a block into the padding: masked
  hi = tl.where(k0 < KV_LEN, hi, lo)
  return _clip(lo, full_lo, full_hi, hi, SEGMENTS)


@triton.jit
def _scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, softcap, Q_LEN: tl.constexpr,
            KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr,
            SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
  """Base-2 logits log2(e) · softcap(scale · q kᵀ) `[bq, bk]` f32, -inf where hidden (if
  MASKED), and the soft cap's tanh (0 without one). tanh(x) = 1 − 2 / (e^{2x} + 1):
  exact at ±inf, no libdevice."""
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
  if SOFTCAP:
    t = 1.0 - 2.0 / (tl.exp(2.0 * s * (scale / softcap)) + 1.0)
    s = t * (softcap * LOG2E)
  else:
    t = s * 0.0
    s = s * (scale * LOG2E)
  if MASKED:
    ok = _visible(q_pos, k_pos, q_seg, k_seg, Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT,
                  HAS_RIGHT, SEGMENTS)
    s = tl.where(ok, s, -float("inf"))
  return s, t


@triton.jit
def _score_gradients(s, t, lse, delta, do, v, SOFTCAP: tl.constexpr,
                     PRECISION: tl.constexpr):
  """(P, dS): P = 2^{s − lse} and dS = P (dO vᵀ − Delta), through the soft cap."""
  p = tl.exp2(s - lse[:, None])
  dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
  ds = p * (dp - delta[:, None])
  if SOFTCAP:
    ds = ds * (1.0 - t * t)
  return p, ds


@triton.jit
def _fwd_block(acc, m_i, l_i, q, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n, hk, scale,
               softcap, TK: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
               DV: tl.constexpr, BK: tl.constexpr, Q_LEN: tl.constexpr,
               KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr,
               SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
  """One key block j of the online softmax: (acc, m_i, l_i) updated."""
  k_pos = j * BK + tl.arange(0, BK)
  rows = n * TK + k_pos
  k = tl.load(k_ptr + _rows(rows, hk, tl.arange(0, D), KV_HEADS, D))
  k_seg = tl.load(kseg_ptr + rows) if SEGMENTS else k_pos  # SEGMENTS: every block masked
  s, _ = _scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, softcap, Q_LEN, KV_LEN, LEFT,
                 RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP, PRECISION, MASKED)
  m_new = tl.maximum(m_i, tl.max(s, axis=1))
  # A row that has seen no key yet has m_new = -inf: subtract 0 instead (no NaN).
  m_ref = tl.where(m_new == -float("inf"), 0.0, m_new) if MASKED else m_new
  alpha = tl.exp2(m_i - m_ref)
  p = tl.exp2(s - m_ref[:, None])
  l_i = alpha * l_i + tl.sum(p, axis=1)
  v = tl.load(v_ptr + _rows(rows, hk, tl.arange(0, DV), KV_HEADS, DV))
  acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
  return acc, m_new, l_i


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, qseg_ptr, kseg_ptr, sink_ptr, scale, softcap, o_ptr,
                lse_ptr, TQ: tl.constexpr, TK: tl.constexpr, HEADS: tl.constexpr,
                KV_HEADS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                BQ: tl.constexpr, BK: tl.constexpr, Q_LEN: tl.constexpr,
                KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr,
                SINKS: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
  """One (query block, batch, head) program: out `[BQ, DV]` and lse `[BQ]` (base 2)."""
  block, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  hk = h // (HEADS // KV_HEADS)
  q0 = block * BQ
  q_pos = q0 + tl.arange(0, BQ)
  rows = n * TQ + q_pos
  q = tl.load(q_ptr + _rows(rows, h, tl.arange(0, D), HEADS, D))  # on chip throughout
  q_seg = tl.load(qseg_ptr + rows) if SEGMENTS else q_pos
  if SINKS:  # start from the sink column: m_i = sink, l_i = 1
    m_i = tl.zeros((BQ,), tl.float32) + tl.load(sink_ptr + h).to(tl.float32) * LOG2E
    l_i = tl.zeros((BQ,), tl.float32) + 1.0
  else:
    m_i = tl.zeros((BQ,), tl.float32) - float("inf")
    l_i = tl.zeros((BQ,), tl.float32)
  acc = tl.zeros((BQ, DV), tl.float32)
  lo, full_lo, full_hi, hi = _kv_blocks(q0, BQ, BK, Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT,
                                        HAS_RIGHT, SEGMENTS)
  for j in range(lo, full_lo):
    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n,
                               hk, scale, softcap, TK, KV_HEADS, D, DV, BK, Q_LEN, KV_LEN,
                               LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP,
                               PRECISION, True)
  for j in range(full_lo, full_hi):
    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n,
                               hk, scale, softcap, TK, KV_HEADS, D, DV, BK, Q_LEN, KV_LEN,
                               LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP,
                               PRECISION, False)
  for j in range(full_hi, hi):
    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n,
                               hk, scale, softcap, TK, KV_HEADS, D, DV, BK, Q_LEN, KV_LEN,
                               LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP,
                               PRECISION, True)
  # out = acc / l_i; a row that saw nothing (l_i = 0) keeps acc = 0.
  l_safe = tl.where(l_i == 0.0, 1.0, l_i)
  out = acc / l_safe[:, None]
  tl.store(o_ptr + _rows(rows, h, tl.arange(0, DV), HEADS, DV), out.to(o_ptr.dtype.element_ty))
  tl.store(lse_ptr + (n * HEADS + h) * TQ + q_pos, m_i + tl.log2(l_safe))  # m_i = -inf there


@triton.jit
def _dq_block(dq, q, do, lse, delta, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n, hk, scale,
              softcap, TK: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
              DV: tl.constexpr, BK: tl.constexpr, Q_LEN: tl.constexpr,
              KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr,
              SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
  """dq += dS K over key block j, dS = P (dP − Delta) (through the soft cap)."""
  k_pos = j * BK + tl.arange(0, BK)
  rows = n * TK + k_pos
  k = tl.load(k_ptr + _rows(rows, hk, tl.arange(0, D), KV_HEADS, D))
  v = tl.load(v_ptr + _rows(rows, hk, tl.arange(0, DV), KV_HEADS, DV))
  k_seg = tl.load(kseg_ptr + rows) if SEGMENTS else k_pos
  s, t = _scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, softcap, Q_LEN, KV_LEN, LEFT,
                 RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP, PRECISION, MASKED)
  _, ds = _score_gradients(s, t, lse, delta, do, v, SOFTCAP, PRECISION)
  return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, qseg_ptr, kseg_ptr, do_ptr, lse_ptr, delta_ptr, scale,
               softcap, dq_ptr, TQ: tl.constexpr, TK: tl.constexpr, HEADS: tl.constexpr,
               KV_HEADS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               BQ: tl.constexpr, BK: tl.constexpr, Q_LEN: tl.constexpr,
               KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr,
               SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
  """One (query block, batch, head) program: dQ = scale Σ_j dS_ij K_j. lse (base 2) and
  Delta `[B, H, TQ]` f32."""
  block, n, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  hk = h // (HEADS // KV_HEADS)
  q0 = block * BQ
  q_pos = q0 + tl.arange(0, BQ)
  rows = n * TQ + q_pos
  q = tl.load(q_ptr + _rows(rows, h, tl.arange(0, D), HEADS, D))
  do = tl.load(do_ptr + _rows(rows, h, tl.arange(0, DV), HEADS, DV))
  lse = tl.load(lse_ptr + (n * HEADS + h) * TQ + q_pos)
  delta = tl.load(delta_ptr + (n * HEADS + h) * TQ + q_pos)
  q_seg = tl.load(qseg_ptr + rows) if SEGMENTS else q_pos
  dq = tl.zeros((BQ, D), tl.float32)
  lo, full_lo, full_hi, hi = _kv_blocks(q0, BQ, BK, Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT,
                                        HAS_RIGHT, SEGMENTS)
  for j in range(lo, full_lo):
    dq = _dq_block(dq, q, do, lse, delta, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n, hk,
                   scale, softcap, TK, KV_HEADS, D, DV, BK, Q_LEN, KV_LEN, LEFT, RIGHT,
                   HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP, PRECISION, True)
  for j in range(full_lo, full_hi):
    dq = _dq_block(dq, q, do, lse, delta, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n, hk,
                   scale, softcap, TK, KV_HEADS, D, DV, BK, Q_LEN, KV_LEN, LEFT, RIGHT,
                   HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP, PRECISION, False)
  for j in range(full_hi, hi):
    dq = _dq_block(dq, q, do, lse, delta, q_pos, q_seg, j, k_ptr, v_ptr, kseg_ptr, n, hk,
                   scale, softcap, TK, KV_HEADS, D, DV, BK, Q_LEN, KV_LEN, LEFT, RIGHT,
                   HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP, PRECISION, True)
  tl.store(dq_ptr + _rows(rows, h, tl.arange(0, D), HEADS, D),
           (dq * scale).to(dq_ptr.dtype.element_ty))


@triton.jit
def _dkdv_block(dk, dv, k, v, k_pos, k_seg, i, hq, q_ptr, qseg_ptr, do_ptr, lse_ptr,
                delta_ptr, n, scale, softcap, TQ: tl.constexpr, HEADS: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, BQ: tl.constexpr, Q_LEN: tl.constexpr,
                KV_LEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SEGMENTS: tl.constexpr,
                SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
  """dv += Pᵀ dO and dk += dSᵀ Q over query block i of query head hq."""
  q_pos = i * BQ + tl.arange(0, BQ)
  rows = n * TQ + q_pos
  q = tl.load(q_ptr + _rows(rows, hq, tl.arange(0, D), HEADS, D))
  do = tl.load(do_ptr + _rows(rows, hq, tl.arange(0, DV), HEADS, DV))
  lse = tl.load(lse_ptr + (n * HEADS + hq) * TQ + q_pos)
  delta = tl.load(delta_ptr + (n * HEADS + hq) * TQ + q_pos)
  q_seg = tl.load(qseg_ptr + rows) if SEGMENTS else q_pos
  s, t = _scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, softcap, Q_LEN, KV_LEN, LEFT,
                 RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS, SOFTCAP, PRECISION, MASKED)
  p, ds = _score_gradients(s, t, lse, delta, do, v, SOFTCAP, PRECISION)
  dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
  dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
  return dk, dv


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, qseg_ptr, kseg_ptr, do_ptr, lse_ptr, delta_ptr, scale,
                 softcap, dk_ptr, dv_ptr, TQ: tl.constexpr, TK: tl.constexpr,
                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                 DV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                 Q_LEN: tl.constexpr, KV_LEN: tl.constexpr, LEFT: tl.constexpr,
                 RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 SEGMENTS: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
  """One (key block, batch, kv head) program: dV_j = Σ_i P_ij dO_i and dK_j = scale
  Σ_i dS_ij Q_i over every query head of the group (no repeated K/V, no per-head sums)."""
  block, n, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
  k0 = block * BK
  k_pos = k0 + tl.arange(0, BK)
  rows = n * TK + k_pos
  k = tl.load(k_ptr + _rows(rows, hk, tl.arange(0, D), KV_HEADS, D))  # on chip throughout
  v = tl.load(v_ptr + _rows(rows, hk, tl.arange(0, DV), KV_HEADS, DV))
  k_seg = tl.load(kseg_ptr + rows) if SEGMENTS else k_pos
  dk = tl.zeros((BK, D), tl.float32)
  dv = tl.zeros((BK, DV), tl.float32)
  lo, full_lo, full_hi, hi = _q_blocks(k0, BK, BQ, Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT,
                                       HAS_RIGHT, SEGMENTS)
  groups: tl.constexpr = HEADS // KV_HEADS
  for g in range(0, groups):
    hq = hk * groups + g
    for i in range(lo, full_lo):
      dk, dv = _dkdv_block(dk, dv, k, v, k_pos, k_seg, i, hq, q_ptr, qseg_ptr, do_ptr,
                           lse_ptr, delta_ptr, n, scale, softcap, TQ, HEADS, D, DV, BQ,
                           Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS,
                           SOFTCAP, PRECISION, True)
    for i in range(full_lo, full_hi):
      dk, dv = _dkdv_block(dk, dv, k, v, k_pos, k_seg, i, hq, q_ptr, qseg_ptr, do_ptr,
                           lse_ptr, delta_ptr, n, scale, softcap, TQ, HEADS, D, DV, BQ,
                           Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS,
                           SOFTCAP, PRECISION, False)
    for i in range(full_hi, hi):
      dk, dv = _dkdv_block(dk, dv, k, v, k_pos, k_seg, i, hq, q_ptr, qseg_ptr, do_ptr,
                           lse_ptr, delta_ptr, n, scale, softcap, TQ, HEADS, D, DV, BQ,
                           Q_LEN, KV_LEN, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, SEGMENTS,
                           SOFTCAP, PRECISION, True)
  tl.store(dk_ptr + _rows(rows, hk, tl.arange(0, D), KV_HEADS, D),
           (dk * scale).to(dk_ptr.dtype.element_ty))
  tl.store(dv_ptr + _rows(rows, hk, tl.arange(0, DV), KV_HEADS, DV),
           dv.to(dv_ptr.dtype.element_ty))


def _mask_params(st: TritonConfig, has_segments: bool, dtype) -> dict:
  """The constexprs every kernel takes: the real lengths, the window, the flags."""
  mask = st.mask
  return dict(Q_LEN=mask.q_len, KV_LEN=mask.kv_len, LEFT=mask.left or 0,
              RIGHT=mask.right or 0, HAS_LEFT=mask.left is not None,
              HAS_RIGHT=mask.right is not None, SEGMENTS=has_segments,
              SOFTCAP=st.softcap is not None,
              PRECISION="ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32")


def _scalars(st: TritonConfig):
  return np.float32(st.scale), np.float32(st.softcap or 1.0)


def _placeholder(x, dtype):
  """x, or a one-element array where the input is absent."""
  return jnp.zeros((1,), dtype) if x is None else x


def _forward(q, k, v, q_seg, kv_seg, sinks, st: TritonConfig):
  """Returns out `[B, Tq, Hq, Dv]` (query dtype) and lse `[B, Hq, Tq]` f32."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  bq, bk = shrink_block(st.blocks.block_q, q_len), shrink_block(st.blocks.block_k, kv_len)
  tq, tk = round_up(q_len, bq), round_up(kv_len, bk)
  dp, dvp = pow2_head_dim(head_dim), pow2_head_dim(v_dim)
  out, lse = triton_call(
      _fwd_kernel, pad(pad(q, 1, tq), 3, dp), pad(pad(k, 1, tk), 3, dp),
      pad(pad(v, 1, tk), 3, dvp), _placeholder(pad(q_seg, 1, tq), jnp.int32),
      _placeholder(pad(kv_seg, 1, tk), jnp.int32), _placeholder(sinks, jnp.float32),
      *_scalars(st),
      out_shape=[jax.ShapeDtypeStruct((batch, tq, heads, dvp), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)],
      grid=(tq // bq, batch, heads), interpret=st.interpret,
      num_warps=st.blocks.num_warps, num_stages=st.blocks.num_stages,
      name="flash_attention_fwd", TQ=tq, TK=tk, HEADS=heads, KV_HEADS=kv_heads, D=dp,
      DV=dvp, BQ=bq, BK=bk, SINKS=sinks is not None,
      **_mask_params(st, q_seg is not None, q.dtype))
  return out[:, :q_len, :, :v_dim], lse[:, :, :q_len] * _LN2


def _backward(q, k, v, q_seg, kv_seg, lse, delta, do, st: TritonConfig):
  """dq, dk, dv from the log-sum-exp lse and Delta `[B, Hq, Tq]` (f32, natural base)."""
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
  b = st.blocks
  bq_dkv, bk_dkv = shrink_block(b.block_q_dkv, q_len), shrink_block(b.block_kv_dkv, kv_len)
  bq_dq, bk_dq = shrink_block(b.block_q_dq, q_len), shrink_block(b.block_kv_dq, kv_len)
  tq = round_up(q_len, max(bq_dkv, bq_dq))
  tk = round_up(kv_len, max(bk_dkv, bk_dq))
  dp, dvp = pow2_head_dim(head_dim), pow2_head_dim(v_dim)
  q, do = pad(pad(q, 1, tq), 3, dp), pad(pad(do, 1, tq), 3, dvp)
  k, v = pad(pad(k, 1, tk), 3, dp), pad(pad(v, 1, tk), 3, dvp)
  segments = q_seg is not None
  q_seg = _placeholder(pad(q_seg, 1, tq), jnp.int32)
  kv_seg = _placeholder(pad(kv_seg, 1, tk), jnp.int32)
  # Rows that saw nothing have lse = -inf and all logits -inf: 0 makes P = exp2(-inf) = 0.
  lse = pad(jnp.where(lse == -jnp.inf, 0.0, lse * _LOG2E), 2, tq)
  delta = pad(delta, 2, tq)
  inputs = (q, k, v, q_seg, kv_seg, do, lse, delta, *_scalars(st))
  params = dict(interpret=st.interpret, num_warps=b.num_warps_bwd,
                num_stages=b.num_stages_bwd, TQ=tq, TK=tk, HEADS=heads, KV_HEADS=kv_heads,
                D=dp, DV=dvp, **_mask_params(st, segments, q.dtype))
  dq = triton_call(_dq_kernel, *inputs, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                   grid=(tq // bq_dq, batch, heads), name="flash_attention_dq", BQ=bq_dq,
                   BK=bk_dq, **params)
  dk, dv = triton_call(
      _dkdv_kernel, *inputs, out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                                        jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(tk // bk_dkv, batch, kv_heads), name="flash_attention_dkdv", BQ=bq_dkv,
      BK=bk_dkv, **params)
  return (dq[:, :q_len, :, :head_dim], dk[:, :kv_len, :, :head_dim],
          dv[:, :kv_len, :, :v_dim])


_attention = flash_vjp(_forward, _backward)


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, mask: AttentionMask, scale: float,
                    logits_soft_cap: float | None, return_residuals: bool,
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Softmax attention by the Triton-language kernels, differentiable (q, k, v, sinks):
  the arguments, results and refusals of `pallas_triton.flash_attention` (its
  docstring), except that `interpret` runs Triton's interpreter (CPU)."""
  return triton_flash_attention(
      "triton", _attention, query, key, value,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks, mask=mask,
      scale=scale, logits_soft_cap=logits_soft_cap, return_residuals=return_residuals,
      block_sizes=block_sizes, interpret=interpret)
