"""Pieces shared by the Mosaic GPU flash-attention kernels (forward and backward).

The kernels are warp-specialised: compute warpgroups own a tile of rows and consume a stream
of blocks that one memory warpgroup copies into shared-memory slots with TMA (`stream`).

Interpret mode (CPU): JAX's Mosaic GPU interpreter simulates warpgroups, shared memory, TMA
and mbarriers, but not wgmma with a register operand nor `run_state`; there `products_t` and
`accumulate` are plain dots of the same tiles. Everything else runs as compiled.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
COMPUTE_WARPGROUPS = 2
ROWS = plgpu.Layout.WGMMA.reduce(1)  # A vector along dimension 0 of a [M, N] wgmma tile.
COLUMNS = plgpu.Layout.WGMMA.reduce(0)  # A vector along dimension 1.
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # wgmma operands
TMA_ROWS = 8  # A TMA copy of TILED rows needs the array's row count a multiple of 8.


def iota(shape, dimension):
  """int32 positions along `dimension` of a wgmma-layout tile."""
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def hide(x, mask, q0, k0, q_axis: int, q_seg=None, k_seg=None):
  """x with -inf where `mask` (a `flash_attention.mask.AttentionMask`) hides the (query, key) pair. The tile's queries
  run along q_axis (0 or 1) from position q0, its keys along the other axis from k0; q_seg,
  k_seg: segment-id vectors along those axes, or None.

  The test j < kv_len is made only where a tile can reach past kv_len into keys a query
  would otherwise see (`AttentionMask.needs_key_bound`); the kernels' key tiles past kv_len are
  zero-filled by TMA, so what such a tile holds is finite either way."""
  k_axis = 1 - q_axis
  segments = (None, None)
  if q_seg is not None:
    segments = (lax.broadcast_in_dim(q_seg, x.shape, [q_axis]),
                lax.broadcast_in_dim(k_seg, x.shape, [k_axis]))
  visible = mask.visible(q0 + iota(x.shape, q_axis), k0 + iota(x.shape, k_axis), *segments,
                         key_bound=mask.needs_key_bound(x.shape[k_axis]))
  return x if visible is None else jnp.where(visible, x, -jnp.inf)


def logits(s, scale: float, softcap: float | None):
  """(x, c) with base-2 logits c * x = log2(e) * softcap(scale * s) for the f32 tile s.

  Without a soft-cap and with scale > 0, x = s and the scale is left to the caller, which
  can take a row max of s first and then needs one fused multiply-add per logit. With a
  soft-cap, x = softcap * log2(e) * tanh(scale * s / softcap) and c = 1."""
  if softcap is None:
    c = scale * LOG2E
    return (s, c) if c > 0 else (s * c, 1.0)
  return jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E), 1.0


def softcap_slope(x, softcap: float | None):
  """d logit / d (scale * s) = 1 - tanh² from the base-2 capped logits x of `logits` (before
  any masking)."""
  t = x * (1.0 / (softcap * LOG2E))
  return 1.0 - t * t


def products_t(pairs, interpret: bool, while_running=lambda: None):
  """[a · bᵀ for (a, b) in pairs] in f32, a [M, K] and b [N, K] shared-memory tiles, issued
  together; while_running() runs while the tensor cores compute."""
  if interpret:
    out = [lax.dot_general(a[...], b[...], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32) for a, b in pairs]
    while_running()
    return out

  def compute(acc_refs):
    for acc_ref, (a, b) in zip(acc_refs, pairs):
      plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
    while_running()
  shapes = [(a.shape[0], b.shape[0]) for a, b in pairs]
  zeros = [plgpu.ACC.init(plgpu.layout_cast(jnp.zeros(s, jnp.float32), plgpu.Layout.WGMMA))
           for s in shapes]
  return list(pl.run_state(compute)(zeros))


def accumulate(terms, interpret: bool, while_running=lambda: None):
  """[acc + a · b for (acc, a, b) in terms]: acc [M, N] f32, a [M, K] in registers, b [K, N]
  a shared-memory tile; issued together; while_running() runs while the tensor cores
  compute."""
  if interpret:
    out = [acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)
           for acc, a, b in terms]
    while_running()
    return out

  def compute(acc_refs):
    for acc_ref, (_, a, b) in zip(acc_refs, terms):
      plgpu.wgmma(acc_ref, a, b)
    while_running()
  return list(pl.run_state(compute)([plgpu.ACC.init(acc) for acc, _, _ in terms]))


def stream(num_steps, queues, slots: int, static_steps: int):
  """The memory warpgroup: runs `num_steps` steps through `slots` shared-memory slots.

  queues: (issue, ready, free) triples; issue(t, slot) starts the TMA copies of step t into
  `slot`, arriving on ready[slot]; the slot is refilled for step t + slots once free[slot]
  has completed (every compute warpgroup released it). static_steps: how many steps copy
  only from inside the arrays. The first slots are filled with t a Python int for those,
  and with a traced t for the steps after them, whose copies reach past the end of an
  array (Pallas rejects a static slice past the end; a dynamic one is clipped by TMA,
  which zero-fills the missing rows). At the end the last releases are awaited too,
  leaving no barrier phase unobserved.
  """
  plgpu.set_max_registers(40, action="decrease")
  for t in range(min(slots, static_steps)):
    @pl.when(t < num_steps)
    def _fill():
      for issue, _, _ in queues:
        issue(t, t)

  if static_steps < slots:
    @pl.loop(static_steps, jnp.minimum(num_steps, slots))
    def _fill_past_the_end(t):
      for issue, _, _ in queues:
        issue(t, t)

  def slot_of(t):
    return lax.rem(t, jnp.int32(slots))

  @pl.loop(slots, num_steps)
  def _refill(t):
    for issue, _, free in queues:
      plgpu.barrier_wait(free.at[slot_of(t)])
      issue(t, slot_of(t))

  @pl.loop(jnp.maximum(num_steps - slots, 0), num_steps)
  def _drain(t):
    for _, _, free in queues:
      plgpu.barrier_wait(free.at[slot_of(t)])


def pass_over(slot, queues):
  """A compute warpgroup's step over a block it does not need: wait, release (keeps every
  mbarrier phase in step with the other warpgroup's)."""
  for _, ready, free in queues:
    plgpu.barrier_wait(ready.at[slot])
    plgpu.barrier_arrive(free.at[slot])


def launch(body, inputs, out_type, smem, barriers, grid, grid_names, interpret: bool,
           compute_warpgroups: int = COMPUTE_WARPGROUPS):
  """Runs body(*input refs, *output refs, smem, barriers) over `grid` with
  compute_warpgroups + 1 warpgroups (axis "wg"); an input that is None gives a None ref.
  smem and barriers are pytrees of scratch shapes; returns the outputs."""
  present = [x is not None for x in inputs]

  def entry(*refs):
    it = iter(refs)
    in_refs = [next(it) if p else None for p in present]
    out_refs = list(it)
    pl.run_scoped(lambda smem, barriers: body(*in_refs, *out_refs, smem, barriers),
                  smem, barriers, collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=compute_warpgroups + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*(x for x in inputs if x is not None))
