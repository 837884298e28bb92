"""Packing documents into rows: every in-document transition is a target exactly once."""

import collections

import numpy as np
import pytest

from attn_jax.data import packing


def _transitions(docs):
  return collections.Counter((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))


def _row_transitions(rows):
  out = collections.Counter()
  for r in rows:
    for i in np.nonzero(r["loss_mask"])[0]:
      out[(int(r["inputs"][i]), int(r["targets"][i]))] += 1
  return out


def _check_row(row, seq_len):
  assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
      "inputs": ((seq_len,), np.int32), "targets": ((seq_len,), np.int32),
      "loss_mask": ((seq_len,), np.float32), "segment_ids": ((seq_len,), np.int32)}
  seg = row["segment_ids"]
  used = seg > 0
  # Segments are 1, 2, 3, … left to right, padding only at the end.
  assert used[:used.sum()].all() and not used[used.sum():].any()
  assert (np.diff(seg[used]) >= 0).all() and seg[0] == 1
  assert set(np.unique(seg[used])) == set(range(1, seg.max() + 1))
  for s in range(1, seg.max() + 1):
    pos = np.nonzero(seg == s)[0]
    assert len(pos) >= 2
    # Targets: the next token inside the segment; none after its last token.
    np.testing.assert_array_equal(row["targets"][pos[:-1]], row["inputs"][pos[1:]])
    np.testing.assert_array_equal(row["loss_mask"][pos], [1.0] * (len(pos) - 1) + [0.0])
    assert row["targets"][pos[-1]] == 0
  assert not row["loss_mask"][~used].any() and not row["inputs"][~used].any()


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("seq_len", [2, 3, 16, 64])
def test_every_transition_once(pack, seq_len):
  rng = np.random.default_rng(seq_len + pack)
  docs = [rng.integers(0, 1000, size=n) for n in rng.integers(0, 90, size=40)]
  rows = list(packing.pack_documents(docs, seq_len, pack=pack))
  for row in rows:
    _check_row(row, seq_len)
    if not pack:
      assert row["segment_ids"].max() == 1
  assert _row_transitions(rows) == _transitions(docs)
  if pack:  # Only the last row may end with more than one free slot.
    assert all((r["segment_ids"] == 0).sum() <= 1 for r in rows[:-1])


def test_short_documents_and_errors():
  assert list(packing.pack_documents([[5], [], [7]], 8)) == []
  rows = list(packing.pack_documents([[1, 2, 3], [4, 5]], 8))
  assert len(rows) == 1
  np.testing.assert_array_equal(rows[0]["inputs"], [1, 2, 3, 4, 5, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]["targets"], [2, 3, 0, 5, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 0, 1, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="seq_len"):
    list(packing.pack_documents([[1, 2]], 1))


def test_split_document_overlaps_one_token():
  rows = list(packing.pack_documents([np.arange(1, 8)], 4))
  np.testing.assert_array_equal([r["inputs"] for r in rows],
                                [[1, 2, 3, 4], [4, 5, 6, 7]])
