"""`pallas_kernels.flash_attention.mask`: the mask value (construction from the op's
arguments, combination, the dense form, the layers' window convention) and the block ranges
the kernels visit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention.mask import AttentionMask, sliding_window


def _numpy_visible(q_len, kv_len, causal, left, right):
  rows, cols = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  d = cols - (rows + kv_len - q_len)
  vis = np.ones((q_len, kv_len), bool)
  if causal:
    vis &= d <= 0
  if right is not None:
    vis &= d <= right
  if left is not None:
    vis &= d >= -left
  return vis


@pytest.mark.parametrize("q_len, kv_len, causal, window", [
    (9, 9, False, None), (9, 9, True, None), (5, 13, True, None), (13, 5, True, None),
    (17, 17, False, (3, 2)), (10, 12, False, 2), (20, 20, True, (4, None)),
    (20, 20, True, (4, 6)), (11, 11, False, (None, 3)), (11, 11, False, (5, 0)),
])
def test_create_folds_causality_into_the_window_and_dense_is_the_definition(
    q_len, kv_len, causal, window):
  mask = AttentionMask.create(q_len, kv_len, is_causal=causal, local_window_size=window)
  left, right = (window, window) if isinstance(window, int) else window or (None, None)
  np.testing.assert_array_equal(np.asarray(mask.dense())[0],
                                _numpy_visible(q_len, kv_len, causal, left, right))
  assert mask.is_causal == (causal or right == 0)
  hash(mask)  # a static argument of the kernels


def test_dense_with_segment_ids():
  mask = AttentionMask.create(4, 6, has_segments=True)
  q_ids, kv_ids = jnp.array([[0, 1, 7, 7]]), jnp.array([[0, 0, 1, 1, 1, 2]])
  want = np.asarray(q_ids)[0, :, None] == np.asarray(kv_ids)[0, None, :]
  np.testing.assert_array_equal(np.asarray(mask.dense(q_ids, kv_ids))[0], want)


def test_masks_combine_with_and():
  causal, window = AttentionMask(20, 20, right=0), AttentionMask(20, 20, left=4, right=6)
  both = causal & window & AttentionMask(20, 20, has_segments=True)
  assert both == AttentionMask(20, 20, 4, 0, True)
  assert both == AttentionMask.create(20, 20, is_causal=True, local_window_size=(4, 6),
                                      has_segments=True)
  np.testing.assert_array_equal(both.dense(), causal.dense() & window.dense())
  with pytest.raises(ValueError, match="different lengths"):
    causal & AttentionMask(20, 21)


def test_sliding_window_counts_keys_including_the_query():
  assert sliding_window(None, causal=True) is None
  assert sliding_window(1, causal=True) == (0, 0)
  assert sliding_window(3, causal=True) == (2, 0)
  assert sliding_window(3, causal=False) == (2, 2)
  # Size w sees w keys (the query and the w - 1 before it).
  mask = AttentionMask.create(10, 10, is_causal=True,
                              local_window_size=sliding_window(3, causal=True))
  assert np.asarray(mask.dense())[0].sum(axis=1).tolist() == [1, 2] + [3] * 8


@pytest.mark.parametrize("window, match", [
    (-1, "non-negative"), ((1, 2, 3), "left, right"), ((1.5, None), "left bound"),
    ((None, -2), "right bound"), ("ab", "left bound"),
])
def test_create_rejects_malformed_windows(window, match):
  with pytest.raises(ValueError, match=match):
    AttentionMask.create(8, 8, local_window_size=window)


def test_fields_are_checked_and_numpy_ints_are_plain_ints():
  with pytest.raises(ValueError, match="q_len"):
    AttentionMask(-1, 8)
  with pytest.raises(ValueError, match="left"):
    AttentionMask(8, 8, left=True)  # the old field order (q_len, kv_len, is_causal, ...)
  mask = AttentionMask(np.int64(8), np.int32(8), np.int64(3))
  assert mask == AttentionMask(8, 8, 3) and hash(mask) == hash(AttentionMask(8, 8, 3))
  assert type(mask.q_len) is int
  jax.jit(lambda x, mask: x, static_argnums=1)(1.0, mask)


def test_block_ranges_skip_only_invisible_blocks_and_unmask_only_visible_ones():
  """Every (q block, kv block) pair: outside [lo, hi) nothing is visible; inside
  [full_lo, full_hi) everything is (so the unmasked loop is exact)."""
  for q_len, kv_len, left, right, bq, bk in [(37, 37, None, 0, 16, 16), (45, 70, 7, 12, 16, 32),
                                             (70, 37, 20, None, 32, 16), (40, 20, None, 0, 16, 16),
                                             (50, 50, 10, None, 16, 16), (33, 50, 3, -2, 16, 16)]:
    mask = AttentionMask(q_len, kv_len, left, right)
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
  causal = visited(AttentionMask(t, t, right=0))
  window = visited(AttentionMask(t, t, left=1024, right=0))
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
    mask = AttentionMask(q_len, kv_len, left, right)
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
