"""`pallas_kernels.flash_attention.block_mask`: the block ranges the kernels visit."""

import numpy as np

from pallas_kernels.flash_attention.block_mask import BlockMask


def test_block_ranges_skip_only_invisible_blocks_and_unmask_only_visible_ones():
  """Every (q block, kv block) pair: outside [lo, hi) nothing is visible; inside
  [full_lo, full_hi) everything is (so the unmasked loop is exact)."""
  for q_len, kv_len, left, right, bq, bk in [(37, 37, None, 0, 16, 16), (45, 70, 7, 12, 16, 32),
                                             (70, 37, 20, None, 32, 16), (40, 20, None, 0, 16, 16),
                                             (50, 50, 10, None, 16, 16), (33, 50, 3, -2, 16, 16)]:
    mask = BlockMask(q_len, kv_len, left, right, has_segments=False)
    rows, cols = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    d = cols - (rows + kv_len - q_len)
    vis = np.ones((q_len, kv_len), bool)
    if right is not None:
      vis &= d <= right
    if left is not None:
      vis &= d >= -left
    n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
    blocks = lambda a, b: vis[a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
    for i in range(n_q):
      lo, full_lo, full_hi, hi = map(int, mask.kv_blocks(i * bq, bq, bk))
      for j in range(n_k):
        assert blocks(i, j).any() <= (lo <= j < hi), (q_len, kv_len, left, right, i, j)
        if full_lo <= j < full_hi:
          assert blocks(i, j).all() and blocks(i, j).shape[1] == bk
    for j in range(n_k):
      lo, full_lo, full_hi, hi = map(int, mask.q_blocks(j * bk, bk, bq))
      for i in range(n_q):
        assert blocks(i, j).any() <= (lo <= i < hi), (q_len, kv_len, left, right, i, j)
        if full_lo <= i < full_hi:
          assert blocks(i, j).all() and blocks(i, j).shape[1] == bk


def test_causal_window_visits_a_fraction_of_the_blocks():
  # A causal window of 1k on 16k tokens should cost about 1/8 of full causal attention.
  t, b = 16384, 128
  visited = lambda mask: sum(int(hi) - int(lo) for lo, *_, hi in
                             (mask.kv_blocks(i * b, b, b) for i in range(t // b)))
  causal = visited(BlockMask(t, t, None, 0, False))
  window = visited(BlockMask(t, t, 1024, 0, False))
  assert window / causal < 0.14


def test_rows_past_the_end_see_nothing_and_the_key_bound_is_left_out_only_where_redundant():
  """A block of query rows at or past q_len (the Mosaic GPU kernels' second warpgroup in the
  last tile) gets an empty range, as a block of keys at or past kv_len does; and where
  `needs_key_bound` is False, dropping the test j < kv_len changes no pair of a real query
  with a key of the tiles (which run to kv_len rounded up to the block)."""
  for q_len, kv_len, left, right, b in [(100, 100, None, 0, 64), (131, 200, None, 0, 64),
                                        (200, 200, 40, 8, 64), (200, 136, None, None, 64),
                                        (3000, 3000, None, 0, 128), (3000, 3000, None, None, 128),
                                        (192, 192, 30, 10, 64)]:
    mask = BlockMask(q_len, kv_len, left, right, has_segments=False)
    q0 = -(-q_len // b) * b
    lo, _, _, hi = map(int, mask.kv_blocks(q0, b, b))
    assert lo == hi, (q_len, kv_len, left, right)
    lo, _, _, hi = map(int, mask.q_blocks(-(-kv_len // b) * b, b, b))
    assert lo == hi, (q_len, kv_len, left, right)
    rows = np.arange(q_len)[:, None]
    cols = np.arange(-(-kv_len // b) * b)[None, :]
    with_bound = np.asarray(mask.visible(rows, cols, None, None))
    if not mask.needs_key_bound(b):
      without = mask.visible(rows, cols, None, None, key_bound=False)
      without = np.ones_like(with_bound) if without is None else np.asarray(without)
      np.testing.assert_array_equal(without, with_bound)
    else:
      assert kv_len % b and (right is None or right > 0)
