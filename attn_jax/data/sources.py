"""From `config.data` to random access over one split's rows: build once, then read.

`open_source(data_config, split)` returns a `Source`: the number of rows, their length, the
vocabulary size, an identity string (kept in checkpoints) and `read(indices)`, which returns
the rows as a dict of `[len(indices), seq_len]` arrays (fields: `packing.ROW_FIELDS`).

Three kinds of dataset:

  "mqar"        `attn_jax.data.mqar.Mqar`, built from the config's fields.
  "text_files"  `attn_jax.data.text_files.TextFiles`, built from a folder of text.
  any other     a TFDS dataset with a text feature (lm1b, c4/en, …), prepared as array_record
                where the machine can download it; documents are tokenized when read and
                `docs_per_row` consecutive stored documents form one row (TFDS stores
                examples in a hashed, i.e. shuffled, order, so these are random documents).

Building is TFDS's own `download_and_prepare(file_format="array_record")` and reading its
`as_data_source()`; neither needs TensorFlow (checked with tensorflow-datasets 4.9.10). A
build runs once per machine and data directory: under an exclusive `fcntl.flock` on a file
beside the dataset, so concurrent processes (several hosts on one shared file system, or a
test run twice) wait for the first builder and then read what it wrote. Where the lock is
not shared (separate disks), each host builds its own copy; generation is deterministic, so
the copies are equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from attn_jax.data import configs
from attn_jax.data import mqar
from attn_jax.data import packing
from attn_jax.data import text_files
from attn_jax.data import tokenizers

# Split names tried, in order, for the alias "eval".
_EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class Source:
  """Random access to the rows of one split."""
  name: str
  num_rows: int
  seq_len: int
  vocab_size: int
  read: Callable[[np.ndarray], dict[str, np.ndarray]] = dataclasses.field(repr=False)


def open_source(data_config: Any, split: str) -> Source:
  """Builds the dataset `data_config` names if needed and opens `split` for reading.

  Args:
    data_config: `config.data` (ml_collections.ConfigDict or mapping): `name` picks the
      dataset, the other fields are checked against that dataset's defaults
      (`attn_jax.data.configs`) and missing ones take the default.
    split: a split of the dataset ("train", "test", …) or "eval" for its validation split,
      else its test split.

  Raises:
    ValueError: an unknown dataset name, field or split, or a field with a bad value; the
      message names the field.
  """
  cfg = configs.resolve(data_config)
  data_dir = os.path.expanduser(cfg["data_dir"]) if cfg["data_dir"] else None
  if cfg["name"] == "mqar":
    builder_config = _mqar_builder_config(cfg)
    builder = _prepared(lambda: mqar.Mqar(config=builder_config, data_dir=data_dir,
                                          file_format="array_record"))
    return _row_source(builder, split, cfg["vocab_size"])
  if cfg["name"] == "text_files":
    builder_config = text_files.TextFilesConfig.make(
        path=cfg["path"], tokenizer=cfg["tokenizer"], seq_len=cfg["seq_len"], pack=cfg["pack"],
        eval_fraction=cfg["eval_fraction"], prefix="config.data.")
    builder = _prepared(lambda: text_files.TextFiles(config=builder_config, data_dir=data_dir,
                                                     file_format="array_record"))
    return _row_source(builder, split, tokenizers.get_tokenizer(cfg["tokenizer"]).vocab_size)
  return _tfds_text_source(cfg, split, data_dir)


def _mqar_builder_config(cfg: Mapping[str, Any]) -> mqar.MqarConfig:
  fields = {k: cfg[k] for k in ("vocab_size", "seq_len", "num_kv_pairs", "power_a",
                                "num_train_examples", "num_eval_examples",
                                "random_non_queries")}
  slices = mqar.parse_slices(cfg["train_slices"], "config.data.train_slices")
  if slices:
    fields["num_train_examples"] = sum(n for *_, n in slices)
  made = mqar.MqarConfig.make(**fields, train_slices=slices, prefix="config.data.")
  # TFDS accepts a custom config only if its name is not a predefined one.
  return mqar.Mqar.builder_configs.get(made.name, made)


@contextlib.contextmanager
def _build_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  lock_dir = os.fspath(builder.data_path.parent)
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, f".{builder.version}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepared(make_builder: Callable[[], tfds.core.DatasetBuilder],
              download: bool = True) -> tfds.core.DatasetBuilder:
  """A builder whose data are on disk: built now, under the lock, if nobody has yet."""
  builder = make_builder()
  if builder.is_prepared():
    return builder
  if not download:
    raise ValueError(f"dataset {builder.info.full_name} is not prepared in "
                     f"{builder.data_dir} and config.data.download is False")
  with _build_lock(builder):
    builder = make_builder()
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  # A fresh builder reads the split sizes of what is now on disk.
  return make_builder()


def _resolve_split(builder: tfds.core.DatasetBuilder, split: str) -> str:
  available = sorted(builder.info.splits.keys())
  if split in available:
    return split
  if split == "eval":
    for name in _EVAL_SPLITS:
      if name in available:
        return name
  raise ValueError(f"split={split!r} is not a split of {builder.info.full_name}: expected one "
                   f"of {available} or 'eval' (first of {list(_EVAL_SPLITS)} present)")


def _data_source(builder: tfds.core.DatasetBuilder, split: str):
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"{builder.info.full_name} in {builder.data_dir} is stored as "
        f"{builder.info.file_format}, and random access needs array_record: convert it "
        "(`tfds convert_format`) or point config.data.data_dir at a fresh directory")
  return builder.as_data_source(split=split)


def _row_source(builder: tfds.core.DatasetBuilder, split: str, vocab_size: int) -> Source:
  """A split whose stored examples are already rows (MQAR, text files)."""
  split = _resolve_split(builder, split)
  data = _data_source(builder, split)
  seq_len = builder.info.features["inputs"].shape[0]

  stored = [k for k in packing.ROW_FIELDS if k in builder.info.features]

  def read(indices: np.ndarray) -> dict[str, np.ndarray]:
    examples = data.__getitems__([int(i) for i in indices])
    rows = packing.empty_rows(len(examples), seq_len)
    for k in stored:
      if examples:
        rows[k] = np.stack([e[k] for e in examples]).astype(rows[k].dtype, copy=False)
    if "segment_ids" not in stored:  # Fixed-length examples (MQAR): one segment, no padding.
      rows["segment_ids"][:] = 1
    return rows

  return Source(name=f"{builder.info.full_name}/{split}", num_rows=len(data), seq_len=seq_len,
                vocab_size=vocab_size, read=read)


def _tfds_text_source(cfg: Mapping[str, Any], split: str, data_dir: str | None) -> Source:
  """A TFDS dataset of documents, tokenized and packed when read."""
  name = cfg["name"]
  text_key, seq_len, pack = cfg["text_key"], cfg["seq_len"], cfg["pack"]
  if seq_len < 2:
    raise ValueError(f"config.data.seq_len={seq_len} is invalid: expected an int >= 2")
  if cfg["docs_per_row"] < 0:
    raise ValueError(f"config.data.docs_per_row={cfg['docs_per_row']} is invalid: expected "
                     "an int >= 0 (0 = as many as fill a row on average)")
  tok = tokenizers.get_tokenizer(cfg["tokenizer"])
  make_builder = lambda: tfds.builder(name, data_dir=data_dir, file_format="array_record")
  try:
    make_builder()
  except ValueError as e:  # tfds's DatasetNotFoundError is a ValueError.
    raise ValueError(f"config.data.name={name!r} is not a dataset: expected 'mqar', "
                     "'text_files' or the name of a TFDS dataset (tfds.builder(name)); "
                     f"TFDS says: {str(e).splitlines()[0]}") from e
  builder = _prepared(make_builder, download=cfg["download"])
  split = _resolve_split(builder, split)
  data = _data_source(builder, split)
  if text_key not in builder.info.features:
    raise ValueError(f"config.data.text_key={text_key!r} is not a feature of "
                     f"{builder.info.full_name}: expected one of "
                     f"{sorted(builder.info.features.keys())}")

  def tokens(examples) -> list[np.ndarray]:
    return [tok.encode(e[text_key]) for e in examples]

  docs_per_row = cfg["docs_per_row"] if pack else 1
  if pack and docs_per_row == 0:
    # As many documents as fill a row on average, measured on the first stored ones.
    sample = tokens(data.__getitems__(list(range(min(256, len(data))))))
    mean_len = max(1.0, float(np.mean([len(t) for t in sample]))) if sample else 1.0
    docs_per_row = max(1, round(seq_len / mean_len))

  def read(indices: np.ndarray) -> dict[str, np.ndarray]:
    doc_ids = [int(i) * docs_per_row + j for i in indices for j in range(docs_per_row)]
    docs = tokens(data.__getitems__(doc_ids))
    rows = packing.empty_rows(len(indices), seq_len)
    for r in range(len(indices)):
      row_docs = docs[r * docs_per_row:(r + 1) * docs_per_row]
      # Only the first row of what these documents would fill: the rest is cut off.
      row = next(packing.pack_documents(row_docs, seq_len, pack=pack), None)
      if row is not None:
        for k in packing.ROW_FIELDS:
          rows[k][r] = row[k]
    return rows

  return Source(
      name=(f"{builder.info.full_name}/{split}/{text_key}/{tok.spec}/t{seq_len}/"
            f"{'packed' if pack else 'unpacked'}/d{docs_per_row}"),
      num_rows=len(data) // docs_per_row, seq_len=seq_len, vocab_size=tok.vocab_size,
      read=read)
