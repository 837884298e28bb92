"""Token sequences → fixed-length language-model rows, packed with segment ids.

A row of length `seq_len` holds

  inputs       int32 [seq_len]  the tokens
  targets      int32 [seq_len]  the next token *of the same document* (0 where there is none)
  loss_mask    float32 [seq_len] 1 where `targets` is a real next token
  segment_ids  int32 [seq_len]  1, 2, 3, … per document piece in the row; 0 = padding

A document of n tokens placed in a row occupies n positions and gives n - 1 targets: its last
token has loss mask 0, so no position is trained to predict across a document boundary, and
attention with segment ids (`attn_jax.ops.AttentionMask`) keeps documents apart.

A document longer than the room left in a row is split; the next piece starts at the last
token of the previous one (an overlap of one token), so every transition `t_i → t_(i+1)` of
every document is a target exactly once. With `pack=True` documents fill rows one after the
other and only the final row (and a row whose last free slot is 1 position) has padding; with
`pack=False` each row holds one piece of one document (segment id 1) and the rest is padding.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

ROW_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids")


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """All-padding rows: every field zero, shapes `[num_rows, seq_len]`."""
  return {"inputs": np.zeros((num_rows, seq_len), np.int32),
          "targets": np.zeros((num_rows, seq_len), np.int32),
          "loss_mask": np.zeros((num_rows, seq_len), np.float32),
          "segment_ids": np.zeros((num_rows, seq_len), np.int32)}


def pack_documents(documents: Iterable[np.ndarray], seq_len: int, *,
                   pack: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Rows (dicts of `[seq_len]` arrays, fields as in the module docstring) from documents.

  Args:
    documents: 1-D integer token arrays, in order. Documents with fewer than 2 tokens have
      no target and are skipped.
    seq_len: row length, >= 2.
    pack: several documents per row (True) or one document piece per row (False).

  Yields rows lazily, so `next(pack_documents(...))` packs only as much as one row needs.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} is too short: a row needs at least 2 positions")
  row, fill, segment = None, 0, 0
  for doc in documents:
    doc = np.asarray(doc, np.int32).reshape(-1)
    while len(doc) >= 2:
      if row is None:
        row, fill, segment = {k: v[0] for k, v in empty_rows(1, seq_len).items()}, 0, 0
      room = seq_len - fill
      if room < 2 or (not pack and fill > 0):
        yield row
        row = None
        continue
      n = min(len(doc), room)
      segment += 1
      row["inputs"][fill:fill + n] = doc[:n]
      row["targets"][fill:fill + n - 1] = doc[1:n]
      row["loss_mask"][fill:fill + n - 1] = 1.0
      row["segment_ids"][fill:fill + n] = segment
      fill += n
      # The rest of a split document starts at its last placed token (see module docstring).
      doc = doc[n - 1:] if n < len(doc) else doc[:0]
  if row is not None and fill > 0:
    yield row
