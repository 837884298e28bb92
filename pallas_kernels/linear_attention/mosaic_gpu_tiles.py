"""Tile arithmetic shared by the Mosaic GPU linear-attention kernels (forward, state passes
and gradients): wgmma products of shared-memory tiles, zero accumulators, broadcasts of
row and column vectors, the CTA's value block.

Interpret mode (CPU): JAX's Mosaic GPU interpreter runs no wgmma; there the products are
plain dots of the same tiles.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_CONTRACT = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}


def matmuls(terms, interpret: bool):
  """[acc + a · b for (acc, a, b, dims) in terms] in f32, issued together. dims: "nn"
  a · b, "nt" a · bᵀ, "tn" aᵀ · b; a is in registers ("nn" only) or a shared-memory ref,
  b a shared-memory ref.

  The results pass an optimization barrier: reading a wgmma accumulator lowers to a
  `wgmma.wait_group` with no data dependence on the registers, and LLVM may otherwise
  move arithmetic on them before the wait (jax-linear-attention saw stale, zeroed
  products in a backward kernel).
  """
  if interpret:
    return [acc + lax.dot_general(a[...], b[...], (_CONTRACT[dims], ((), ())),
                                  preferred_element_type=jnp.float32)
            for acc, a, b, dims in terms]

  def compute(acc_refs):
    for acc_ref, (_, a, b, dims) in zip(acc_refs, terms):
      plgpu.wgmma(acc_ref, a.transpose((1, 0)) if dims == "tn" else a,
                  b.transpose((1, 0)) if dims == "nt" else b)
  out = pl.run_state(compute)([plgpu.ACC.init(acc) for acc, *_ in terms])
  return list(lax.optimization_barrier(list(out)))


def zeros(shape):
  """A zero f32 accumulator `shape` in the wgmma layout."""
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def along(vector, shape, axis):
  """vector broadcast along `axis` of a tile of `shape` (axis 0: one value per row)."""
  return lax.broadcast_in_dim(vector, shape, [axis])


def value_block(value_blocks: int, warpgroups: int):
  """(value head, first 64-column tile of this CTA) from the grid axis "heads", which runs
  over value heads × value_blocks."""
  index = lax.axis_index("heads")
  blocks = jnp.int32(value_blocks)
  return lax.div(index, blocks), lax.rem(index, blocks) * warpgroups


def column_tiles(ref, smem, batch, rows, head, first, slot, count, width=64):
  """TMA (source, destination) pairs: the `count` tiles of `width` columns of ref[batch,
  rows, head], from tile `first` on, into smem[slot, 0 … count − 1]."""
  return [(ref.at[batch, rows, head, pl.ds((first + i) * width, width)], smem.at[slot, i])
          for i in range(count)]
