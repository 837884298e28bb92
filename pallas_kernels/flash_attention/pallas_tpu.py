"""Flash attention on TPU in Pallas (Mosaic TPU): forward and backward kernels.

Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691). The forward pass keeps, per query
row, the running max `m_i`, the running softmax denominator `l_i` and the unnormalised output
`acc_i` in VMEM scratch while the grid walks the key/value blocks ("online softmax"); the
loop over query blocks, heads and batch is carried by the parallel grid axes. The backward
pass recomputes the probabilities from the saved log-sum-exp and runs two kernels: one with
the key blocks on the grid that accumulates dK and dV over the query blocks (and over the
query heads of a GQA group), one with the query blocks on the grid that accumulates dQ.

Design choices:
- Masks (`mask.AttentionMask`) are positional (causal, window `(left, right)`, padding) plus
  segment ids. Positions are aligned at the end: query i sits at key position
  `i + kv_len - q_len`. From the positional part every kernel derives, for its block, the
  contiguous range of blocks on the other axis it can see. The grid only walks that range
  (its length is the longest range, so a sliding window costs O(window) steps per block, not
  O(seq)), and index maps clamp to the last needed block, so steps past the range issue no
  DMA and `pl.when` skips their compute. Tiles that are entirely visible skip the mask
  arithmetic. Segment ids never prune blocks.
- A fully masked entry has logit -inf and the running max is replaced by 0 where it is
  still -inf, so rows that see no key give zeros and lse -inf (or the sink logit) without
  NaN, forward and backward.
- GQA/MQA: query head h reads key/value head `h // groups` through the index maps; dK/dV of
  one key/value head are summed over its query heads in VMEM (grid axis `group`).
- Sequences are padded to the block sizes inside (padded keys are masked, padded queries get
  zero cotangents). Head dims above 128 that are not multiples of 128 are zero-padded to one
  (lane width); head dims up to 128 use a block equal to the full dimension.
- Per-row statistics (`m_i`, `l_i`, lse, Delta) and segment ids are replicated over the 128
  lanes (or 8 sublanes when the query axis is on lanes), as in JAX's own TPU kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention.common import check_mask, round_up
from pallas_kernels.flash_attention.mask import AttentionMask

NUM_LANES = 128
NUM_SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # dot_general dims for a @ b.T
_SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (sequence positions per block); each a positive multiple of 128.

  Attributes:
    block_q, block_kv: query and key/value tiles of the forward kernel.
    block_q_dkv, block_kv_dkv: tiles of the dK/dV kernel.
    block_q_dq, block_kv_dq: tiles of the dQ kernel.
  A block longer than the (128-rounded) sequence is shortened to it.
  """
  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int = 128
  block_kv_dkv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      size = getattr(self, field.name)
      if not isinstance(size, int) or size <= 0 or size % NUM_LANES:
        raise ValueError(f"BlockSizes.{field.name} must be a positive multiple of "
                         f"{NUM_LANES}; got {size!r}.")

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> BlockSizes:
    """Block sizes from `_TUNING_TABLE` for the larger of the q/k and v head dims."""
    itemsize = jnp.dtype(dtype).itemsize
    for max_head_dim, max_itemsize, sizes in _TUNING_TABLE:
      if head_dim <= max_head_dim and itemsize <= max_itemsize:
        return sizes
    return cls()


# (largest head_dim, largest bytes per element, block sizes), first match wins. Starting
# points sized for the 16 MiB default scoped VMEM of v5e; not yet measured on TPU, so the
# fallback is JAX's own default of 128 everywhere. Measured winners go to docs/perf/.
_TUNING_TABLE = (
    (128, 2, BlockSizes(512, 512, 256, 512, 512, 256)),
    (128, 4, BlockSizes(256, 256, 256, 256, 256, 256)),
    (256, 2, BlockSizes(512, 256, 256, 256, 256, 256)),
    (256, 4, BlockSizes(256, 128, 128, 256, 256, 128)),
)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static configuration shared by the kernels (hashable; the mask's lengths are those
  before padding, kv_padded the padded key length)."""
  mask: AttentionMask
  kv_padded: int
  scale: float
  soft_cap: float | None
  groups: int
  blocks: BlockSizes
  interpret: object


def _lanes(x, n):
  """Widens a lane-replicated `[rows, 128]` statistic to `[rows, n]`."""
  if n == NUM_LANES:
    return x
  if n < NUM_LANES:
    return x[:, :n]
  return jnp.tile(x, (1, n // NUM_LANES))


def _visible_range(blk, own_block, other_block, own_len, other_len, shift, below, above,
                   xp):
  """Which blocks of the other axis block `blk` of this axis can see.

  Position x (< own_len) of this axis sees position y (< other_len) of the other axis iff
  `below <= y - x - shift <= above` (None: unbounded). Works on numpy arrays (static
  planning) and on traced scalars (index maps and kernels).

  Returns:
    (first block, number of blocks); the count is 0 when nothing is visible.
  """
  x0 = blk * own_block
  x1 = xp.minimum(x0 + own_block - 1, own_len - 1)
  lo = 0 if below is None else xp.maximum(x0 + shift + below, 0)
  hi = other_len - 1 if above is None else xp.minimum(x1 + shift + above, other_len - 1)
  empty = (x1 < x0) | (hi < lo)
  first = _div(xp.minimum(lo, other_len - 1), other_block, xp)
  count = xp.where(empty, 0, _div(xp.maximum(hi, 0), other_block, xp) - first + 1)
  return first, count


def _div(x, n, xp):
  """`x // n` for x >= 0; lax.div keeps sign fix-ups out of the TPU scalar code."""
  return x // n if xp is np else lax.div(jnp.asarray(x, jnp.int32), jnp.int32(n))


def _kv_range(qi, bq, bk, st, xp=jnp):
  m = st.mask
  return _visible_range(qi, bq, bk, m.q_len, m.kv_len, m.offset,
                        None if m.left is None else -m.left, m.right, xp)


def _q_range(kb, bk, bq, st, xp=jnp):
  m = st.mask
  return _visible_range(kb, bk, bq, m.kv_len, m.q_len, -m.offset,
                        None if m.right is None else -m.right, m.left, xp)


def _num_steps(range_fn, num_blocks, own_block, other_block, st):
  _, count = range_fn(np.arange(num_blocks), own_block, other_block, st, np)
  return max(1, int(np.max(count)))


def _clamped(first, count, step):
  """Block index of grid step `step`: steps past the range repeat the last block."""
  return first + jnp.minimum(step, jnp.maximum(count - 1, 0))


def _tile_needs_mask(q_start, k_start, bq, bk, st, has_segments):
  """False (static or traced) when every (query, key) pair of the tile is visible."""
  if has_segments:
    return True
  m, full = st.mask, []
  if st.kv_padded > m.kv_len:
    full.append(k_start + bk <= m.kv_len)
  if m.right is not None:
    full.append(k_start + bk - 1 - q_start - m.offset <= m.right)
  if m.left is not None:
    full.append(k_start - (q_start + bq - 1) - m.offset >= -m.left)
  if not full:
    return False
  return jnp.logical_not(functools.reduce(jnp.logical_and, full))


def _tile_visible(q_start, k_start, shape, q_axis, q_ids_ref, kv_ids_ref, st):
  """Boolean visibility of a tile whose query positions run along axis `q_axis`.

  Segment-id refs hold ids replicated across the other axis: `[n, 128]` along sublanes,
  `[8, n]` along lanes.
  """
  rows = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  vis = st.mask.visible(rows, cols, key_bound=st.kv_padded > st.mask.kv_len)
  if vis is None:
    vis = jnp.ones(shape, jnp.bool_)
  if q_ids_ref is not None:
    if q_axis == 0:
      vis &= _lanes(q_ids_ref[...], shape[1]) == kv_ids_ref[:1, :]
    else:
      vis &= q_ids_ref[:1, :] == _lanes(kv_ids_ref[...], shape[1])
  return vis


def _run_tiles(run, q_start, k_start, bq, bk, st, has_segments, step):
  """Runs `step(masked)` under `run`, without the mask where the whole tile is visible."""
  needs_mask = _tile_needs_mask(q_start, k_start, bq, bk, st, has_segments)
  if needs_mask is True or needs_mask is False:
    pl.when(run)(lambda: step(needs_mask))
    return
  pl.when(jnp.logical_and(run, needs_mask))(lambda: step(True))
  pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))(lambda: step(False))


def _capped(s, st):
  return s if st.soft_cap is None else st.soft_cap * jnp.tanh(s / st.soft_cap)


def _flash_fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, sinks_ref,
                      o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *,
                      st: _Static, num_steps: int):
  """One (batch, head, query block, key step) of the forward pass.

  q_ref `[bq, D]`, k_ref `[bk, D]`, v_ref `[bk, Dv]`; q_ids_ref `[bq, 128]`, kv_ids_ref
  `[8, bk]` int32; sinks_ref `[8, Hq]` f32 in SMEM. Writes o_ref `[bq, Dv]` and the
  lane-replicated lse_ref `[bq, 128]` after the last key step.
  """
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  h, qi, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  first, count = _kv_range(qi, bq, bk, st)
  kb = _clamped(first, count, j)

  @pl.when(j == 0)
  def _init():
    if sinks_ref is None:
      m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
      l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    else:  # The sink is a column with logit sinks[h] and no value: exp(sink - m) = 1.
      m_scratch[...] = jnp.full(m_scratch.shape, sinks_ref[0, h], jnp.float32)
      l_scratch[...] = jnp.ones(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def step(masked):
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
    s = _capped(s * st.scale, st)  # [bq, bk]
    if masked:
      vis = _tile_visible(qi * bq, kb * bk, (bq, bk), 0, q_ids_ref, kv_ids_ref, st)
      s = jnp.where(vis, s, -jnp.inf)
    m_prev, l_prev = m_scratch[...], l_scratch[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # Rows that have seen no key yet keep m_i = -inf; subtracting 0 keeps exp() at 0.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - _lanes(m_safe, bk))
    alpha = jnp.exp(m_prev - m_safe)  # rescales what was accumulated with m_prev
    l_scratch[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    v = v_ref[...]
    pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scratch[...] = _lanes(alpha, acc_scratch.shape[1]) * acc_scratch[...] + pv

  _run_tiles(j < count, qi * bq, kb * bk, bq, bk, st, q_ids_ref is not None, step)

  @pl.when(j == num_steps - 1)
  def _finish():
    l, m = l_scratch[...], m_scratch[...]
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    inv_l = jnp.where(seen, 1.0 / safe_l, 0.0)
    o_ref[...] = (acc_scratch[...] * _lanes(inv_l, o_ref.shape[1])).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def _flash_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref, kv_ids_ref,
                     dq_ref, dq_scratch, *, st: _Static, num_steps: int):
  """One (batch, head, query block, key step) of dQ = scale · Σ_j dS_ij k_j.

  q_ref `[bq, D]`, do_ref `[bq, Dv]`, k_ref `[bk, D]`, v_ref `[bk, Dv]`; lse_ref and
  delta_ref lane-replicated `[bq, 128]`; ids as in the forward kernel.
  """
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  qi, j = pl.program_id(2), pl.program_id(3)
  first, count = _kv_range(qi, bq, bk, st)
  kb = _clamped(first, count, j)

  @pl.when(j == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def step(masked):
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
    s = _capped(s * st.scale, st)
    p = jnp.exp(s - _lanes(lse_ref[...], bk))  # P_ij recomputed from the saved lse
    if masked:
      vis = _tile_visible(qi * bq, kb * bk, (bq, bk), 0, q_ids_ref, kv_ids_ref, st)
      p = jnp.where(vis, p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], bk))  # dS = P ∘ (dP - Delta)
    if st.soft_cap is not None:
      ds = ds * (1.0 - jnp.square(s / st.soft_cap))
    dq_scratch[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _run_tiles(j < count, qi * bq, kb * bk, bq, bk, st, q_ids_ref is not None, step)

  @pl.when(j == num_steps - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * st.scale).astype(dq_ref.dtype)


def _flash_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_ids_ref,
                      kv_ids_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *,
                      st: _Static, num_steps: int):
  """One (batch, kv head, key block, group member, query step) of dK and dV.

  Works on transposed tiles (keys on sublanes, queries on lanes) so that no tile is
  transposed: Sᵀ = K Qᵀ `[bk, bq]`, dV += Pᵀ dO, dK += scale · dSᵀ Q. lse_ref and
  delta_ref are sublane-replicated `[8, bq]`; q_ids_ref `[8, bq]`, kv_ids_ref `[bk, 128]`.
  """
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  kb, g, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  first, count = _q_range(kb, bk, bq, st)
  qi = _clamped(first, count, j)

  @pl.when(jnp.logical_and(g == 0, j == 0))
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def step(masked):
    q, do = q_ref[...], do_ref[...]
    s_t = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)
    s_t = _capped(s_t * st.scale, st)  # [bk, bq]
    p_t = jnp.exp(s_t - lse_ref[:1, :])
    if masked:
      vis = _tile_visible(qi * bq, kb * bk, (bk, bq), 1, q_ids_ref, kv_ids_ref, st)
      p_t = jnp.where(vis, p_t, 0.0)
    dv_scratch[...] += lax.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp_t = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - delta_ref[:1, :])
    if st.soft_cap is not None:
      ds_t = ds_t * (1.0 - jnp.square(s_t / st.soft_cap))
    dk_scratch[...] += lax.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

  _run_tiles(j < count, qi * bq, kb * bk, bq, bk, st, q_ids_ref is not None, step)

  @pl.when(jnp.logical_and(g == st.groups - 1, j == num_steps - 1))
  def _finish():
    dk_ref[...] = (dk_scratch[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _lane_ids(ids):
  """`[B, T]` -> `[B, T, 128]`: ids of positions on sublanes."""
  return None if ids is None else jnp.broadcast_to(ids[:, :, None], (*ids.shape, NUM_LANES))


def _sublane_ids(ids):
  """`[B, T]` -> `[B, 8, T]`: ids of positions on lanes."""
  return None if ids is None else jnp.broadcast_to(ids[:, None, :],
                                                   (ids.shape[0], NUM_SUBLANES, ids.shape[1]))


def _query_major_specs(bq, bk, head_dim, head_dim_v, st: _Static):
  """BlockSpecs on the grid (batch, q head, query block, key step) of the fwd/dQ kernels.

  Returns:
    (q_map, [q, k, v, do] specs, [q ids, kv ids] specs); q and do share `q_map`.
  """
  def q_map(b, h, i, j):
    return b, h, i, 0

  def kv_block(i, j):
    first, count = _kv_range(i, bq, bk, st)
    return _clamped(first, count, j)

  def kv_map(b, h, i, j):
    return b, _div(h, st.groups, jnp), kv_block(i, j), 0

  data = [pl.BlockSpec((_SQ, _SQ, bq, head_dim), q_map),
          pl.BlockSpec((_SQ, _SQ, bk, head_dim), kv_map),
          pl.BlockSpec((_SQ, _SQ, bk, head_dim_v), kv_map),
          pl.BlockSpec((_SQ, _SQ, bq, head_dim_v), q_map)]
  ids = [pl.BlockSpec((_SQ, bq, NUM_LANES), lambda b, h, i, j: (b, i, 0)),
         pl.BlockSpec((_SQ, NUM_SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))]
  return q_map, data, ids


def _forward(q, k, v, q_ids, kv_ids, sinks, st: _Static):
  """Forward pallas_call on padded `[B, H, T, D]` inputs.

  Returns:
    o `[B, Hq, Tq_pad, Dv]` in q's dtype and lse `[B, Hq, Tq_pad]` float32.
  """
  batch, q_heads, q_pad, head_dim = q.shape
  head_dim_v = v.shape[-1]
  bq, bk = st.blocks.block_q, st.blocks.block_kv
  num_steps = _num_steps(_kv_range, q_pad // bq, bq, bk, st)
  q_map, data_specs, id_specs = _query_major_specs(bq, bk, head_dim, head_dim_v, st)
  sinks_spec = None
  if sinks is not None:
    sinks_spec = pl.BlockSpec((NUM_SUBLANES, q_heads), lambda *_: (0, 0),
                              memory_space=pltpu.SMEM)
    sinks = jnp.broadcast_to(sinks[None, :], (NUM_SUBLANES, q_heads))
  o, lse = pl.pallas_call(
      functools.partial(_flash_fwd_kernel, st=st, num_steps=num_steps),
      out_shape=(jax.ShapeDtypeStruct((batch, q_heads, q_pad, head_dim_v), q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, q_pad, NUM_LANES), jnp.float32)),
      grid=(batch, q_heads, q_pad // bq, num_steps),
      in_specs=[*data_specs[:3], *(id_specs if q_ids is not None else [None, None]),
                sinks_spec],
      out_specs=(data_specs[3], pl.BlockSpec((_SQ, _SQ, bq, NUM_LANES), q_map)),
      scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                      pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                      pltpu.VMEM((bq, head_dim_v), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
      name="flash_attention_fwd",
  )(q, k, v, _lane_ids(q_ids), _sublane_ids(kv_ids), sinks)
  return o, lse[..., 0]


def _backward_dq(q, k, v, do, lse, delta, q_ids, kv_ids, st: _Static):
  """dQ `[B, Hq, Tq_pad, D]` from padded inputs; lse, delta `[B, Hq, Tq_pad]` f32."""
  batch, q_heads, q_pad, head_dim = q.shape
  bq, bk = st.blocks.block_q_dq, st.blocks.block_kv_dq
  num_steps = _num_steps(_kv_range, q_pad // bq, bq, bk, st)
  q_map, data_specs, id_specs = _query_major_specs(bq, bk, head_dim, v.shape[-1], st)
  row_spec = pl.BlockSpec((_SQ, _SQ, bq, NUM_LANES), q_map)
  lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES))
  return pl.pallas_call(
      functools.partial(_flash_dq_kernel, st=st, num_steps=num_steps),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(batch, q_heads, q_pad // bq, num_steps),
      in_specs=[*data_specs, row_spec, row_spec,
                *(id_specs if q_ids is not None else [None, None])],
      out_specs=data_specs[0],
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, do, lanes(lse), lanes(delta), _lane_ids(q_ids), _sublane_ids(kv_ids))


def _backward_dkv(q, k, v, do, lse, delta, q_ids, kv_ids, st: _Static):
  """dK `[B, Hkv, Tk_pad, D]` and dV `[B, Hkv, Tk_pad, Dv]` from padded inputs."""
  batch, kv_heads, kv_pad, head_dim = k.shape
  head_dim_v = v.shape[-1]
  bq, bk = st.blocks.block_q_dkv, st.blocks.block_kv_dkv
  num_steps = _num_steps(_q_range, kv_pad // bk, bk, bq, st)

  def kv_map(b, hk, kb, g, j):
    return b, hk, kb, 0

  def q_block(kb, j):
    first, count = _q_range(kb, bk, bq, st)
    return _clamped(first, count, j)

  def q_map(b, hk, kb, g, j):
    return b, hk * st.groups + g, q_block(kb, j), 0

  def row_map(b, hk, kb, g, j):
    return b, hk * st.groups + g, 0, q_block(kb, j)

  row_spec = pl.BlockSpec((_SQ, _SQ, NUM_SUBLANES, bq), row_map)
  in_specs = [pl.BlockSpec((_SQ, _SQ, bq, head_dim), q_map),
              pl.BlockSpec((_SQ, _SQ, bk, head_dim), kv_map),
              pl.BlockSpec((_SQ, _SQ, bk, head_dim_v), kv_map),
              pl.BlockSpec((_SQ, _SQ, bq, head_dim_v), q_map), row_spec, row_spec,
              None, None]
  if q_ids is not None:
    in_specs[6] = pl.BlockSpec((_SQ, NUM_SUBLANES, bq),
                               lambda b, hk, kb, g, j: (b, 0, q_block(kb, j)))
    in_specs[7] = pl.BlockSpec((_SQ, bk, NUM_LANES), lambda b, hk, kb, g, j: (b, kb, 0))
  sublanes = lambda x: jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], NUM_SUBLANES,
                                                            x.shape[2]))
  return pl.pallas_call(
      functools.partial(_flash_dkv_kernel, st=st, num_steps=num_steps),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(batch, kv_heads, kv_pad // bk, st.groups, num_steps),
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((_SQ, _SQ, bk, head_dim), kv_map),
                 pl.BlockSpec((_SQ, _SQ, bk, head_dim_v), kv_map)),
      scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                      pltpu.VMEM((bk, head_dim_v), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=(
          "parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=st.interpret,
      name="flash_attention_bwd_dkv",
  )(q, k, v, do, sublanes(lse), sublanes(delta), _sublane_ids(q_ids), _lane_ids(kv_ids))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_ids, kv_ids, sinks, st: _Static):
  return _forward(q, k, v, q_ids, kv_ids, sinks, st)


def _flash_fwd(q, k, v, q_ids, kv_ids, sinks, st: _Static):
  o, lse = _forward(q, k, v, q_ids, kv_ids, sinks, st)
  return (o, lse), (q, k, v, q_ids, kv_ids, sinks, o, lse)


def _flash_bwd(st: _Static, residuals, cotangents):
  """dS = P ∘ (dP - Delta), Delta_i = rowsum(dO ∘ O)_i - dlse_i (lse cotangent folded in)."""
  q, k, v, q_ids, kv_ids, sinks, o, lse = residuals
  do, dlse = cotangents
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse
  # Padded query rows get lse = +inf, hence P = 0: the forward may have skipped blocks
  # they see (its blocks need not match the backward's), and their dO is 0 anyway.
  lse = jnp.where(jnp.arange(lse.shape[-1]) < st.mask.q_len, lse, jnp.inf)
  dq = _backward_dq(q, k, v, do, lse, delta, q_ids, kv_ids, st)
  dk, dv = _backward_dkv(q, k, v, do, lse, delta, q_ids, kv_ids, st)
  dsinks = None
  if sinks is not None:  # the sink column has dP = 0: d sink_h = -Σ_i P_sink,i Delta_i
    p_sink = jnp.exp(sinks[None, :, None] - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 2))
  return dq, dk, dv, None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


def _lane_dim(d):
  """Head dims up to 128 are used whole; larger ones are padded to a multiple of 128."""
  return d if d <= NUM_LANES else round_up(d, NUM_LANES)


def flash_attention(query, key, value, *, q_segment_ids=None, kv_segment_ids=None,
                    sinks=None, mask: AttentionMask, scale: float,
                    logits_soft_cap: float | None, return_residuals: bool,
                    block_sizes: BlockSizes | None = None,
                    interpret: bool | pltpu.InterpretParams = False):
  """Softmax attention `softmax(q kᵀ · scale) v` with a TPU flash-attention kernel.

  Args:
    query: `[B, Tq, Hq, D]` float32 or bfloat16.
    key: `[B, Tk, Hkv, D]`, Hq a multiple of Hkv; query head h reads kv head
      `h // (Hq // Hkv)`.
    value: `[B, Tk, Hkv, Dv]`; query, key and value share one dtype.
    q_segment_ids, kv_segment_ids: `[B, Tq]`, `[B, Tk]` integers, given together; a query
      sees only keys with the same id.
    sinks: `[Hq]` sink logits: an extra softmax column with no value.
    mask: which keys each query sees (`mask.AttentionMask` of lengths Tq, Tk, with
      `has_segments` when segment ids are given).
    scale: logit scale.
    logits_soft_cap: c > 0 replaces logits by `c · tanh(logits / c)`, or None.
    return_residuals: also return the log-sum-exp.
    block_sizes: tiles; None takes `BlockSizes.get_default(max(D, Dv), dtype)`.
    interpret: False, True (TPU interpret mode) or a `pltpu.InterpretParams`.

  Returns:
    out `[B, Tq, Hq, Dv]` in the query dtype, and with `return_residuals` the log-sum-exp
    `[B, Hq, Tq]` float32 (sink included). A query that sees no key gets zeros and lse
    -inf (the sink logit with sinks). Differentiable in query, key, value and sinks, also
    through the log-sum-exp.

  Raises:
    NotImplementedError: on a dtype other than float32/bfloat16.
    ValueError: on malformed shapes or arguments, or a mask of other lengths.
  """
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      raise NotImplementedError(f"pallas_tpu supports {name} dtype float32 or bfloat16; "
                                f"got {x.dtype}.")
  if not query.dtype == key.dtype == value.dtype:
    raise NotImplementedError(f"pallas_tpu needs one dtype for query, key and value; got "
                              f"{query.dtype}, {key.dtype}, {value.dtype}.")
  if (query.ndim, key.ndim, value.ndim) != (4, 4, 4) or (
      key.shape[::3] != (query.shape[0], query.shape[3])
      or value.shape[:3] != key.shape[:3] or query.shape[2] % key.shape[2]):
    raise ValueError(f"incompatible shapes: query {query.shape}, key {key.shape}, value "
                     f"{value.shape} (need [B,Tq,Hq,D], [B,Tk,Hkv,D], [B,Tk,Hkv,Dv], "
                     f"Hq a multiple of Hkv).")
  batch, q_len, q_heads, head_dim = query.shape
  _, kv_len, kv_heads, _ = key.shape
  head_dim_v = value.shape[-1]
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
  check_mask(mask, query, key, q_segment_ids)
  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if sinks.shape != (q_heads,):
      raise ValueError(f"sinks must have shape ({q_heads},); got {sinks.shape}.")
    sinks = sinks.astype(jnp.float32)

  if q_len == 0 or kv_len == 0:  # nothing to tile: zeros, lse = sink or -inf
    out = jnp.zeros((batch, q_len, q_heads, head_dim_v), query.dtype)
    lse = jnp.full((batch, q_heads, q_len), -jnp.inf, jnp.float32)
    if sinks is not None:
      lse = jnp.broadcast_to(sinks[None, :, None], lse.shape)
    return (out, lse) if return_residuals else out

  blocks = block_sizes or BlockSizes.get_default(max(head_dim, head_dim_v), query.dtype)
  q_cap, kv_cap = round_up(q_len, NUM_LANES), round_up(kv_len, NUM_LANES)
  blocks = BlockSizes(*(min(b, q_cap if f.name.startswith("block_q") else kv_cap)
                        for f, b in zip(dataclasses.fields(blocks),
                                        dataclasses.astuple(blocks))))
  q_pad = round_up(q_len, math.lcm(*dataclasses.astuple(blocks)[::2]))
  kv_pad = round_up(kv_len, math.lcm(*dataclasses.astuple(blocks)[1::2]))
  if interpret is True:
    interpret = pltpu.InterpretParams()
  st = _Static(mask=mask, kv_padded=kv_pad, scale=float(scale),
               groups=q_heads // kv_heads, blocks=blocks,
               soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
               interpret=interpret or False)

  def to_kernel_layout(x, seq_pad, dim):  # [B, T, H, D] -> padded [B, H, T_pad, D_pad]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad - x.shape[2]), (0, dim - x.shape[3])))

  q = to_kernel_layout(query, q_pad, _lane_dim(head_dim))
  k = to_kernel_layout(key, kv_pad, _lane_dim(head_dim))
  v = to_kernel_layout(value, kv_pad, _lane_dim(head_dim_v))
  q_ids = kv_ids = None
  if q_segment_ids is not None:
    q_ids = jnp.pad(jnp.asarray(q_segment_ids, jnp.int32), ((0, 0), (0, q_pad - q_len)))
    kv_ids = jnp.pad(jnp.asarray(kv_segment_ids, jnp.int32), ((0, 0), (0, kv_pad - kv_len)))
  o, lse = _flash(q, k, v, q_ids, kv_ids, sinks, st)
  out = jnp.swapaxes(o[:, :, :q_len, :head_dim_v], 1, 2)
  return (out, lse[:, :, :q_len]) if return_residuals else out
