"""Any folder of text as a language-modelling dataset: a TFDS builder over local files.

Every file is one document. The regular files (of a folder, searched recursively with
hidden files skipped, of a glob pattern, or one file; FIFOs, sockets and devices are
skipped with a warning) are read in sorted path order, tokenized (bytes, SentencePiece or
tiktoken: `attn_jax.data.tokenizers`) and cut into rows of `seq_len` by
`attn_jax.data.packing.pack_documents` at build time, so a stored example is a ready
training row (`inputs`, `targets`, `loss_mask`, `segment_ids`). The last `eval_fraction` of
the rows (the end of the last files) form the "test" split, the rest "train".

The builder config's name carries the tokenizer, seq_len, packing and a hash of the resolved
path and of every file's name, size and modification time: editing, adding or removing a file
gives a new config, built on next use, and an unchanged folder is never rebuilt.

Building holds all rows in memory (4 × 4 bytes per token): meant for folders up to a few GB.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from attn_jax.data import packing
from attn_jax.data import tfds_compat
from attn_jax.data import tokenizers


_warned = set()  # (path, skipped entries) already warned about


def list_text_files(path: str) -> list[str]:
  """Sorted absolute paths of the regular files named by `path` (folder, glob pattern or
  file). Anything else found (a FIFO, socket or device, whose read could block forever, or
  a broken link) is left out, with one warning naming them."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    found = []
    for root, dirs, names in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, n) for n in names if not n.startswith(".")]
  elif os.path.lexists(path):
    found = [path]
  else:
    found = [f for f in glob.glob(path, recursive=True) if not os.path.isdir(f)]
  files = sorted(os.path.abspath(f) for f in found if os.path.isfile(f))
  skipped = tuple(sorted(os.path.abspath(f) for f in found if not os.path.isfile(f)))
  if skipped and (path, skipped) not in _warned:  # a config and its build both list them
    _warned.add((path, skipped))
    logging.warning("path=%r: skipping %d entries that are not regular files (a read could "
                    "block or fail): %s", path, len(skipped), ", ".join(skipped[:10]) +
                    (", ..." if len(skipped) > 10 else ""))
  return files


def _fingerprint(path: str, files: list[str]) -> str:
  h = hashlib.sha256(os.path.abspath(os.path.expanduser(path)).encode())
  for f in files:
    st = os.stat(f)
    h.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return h.hexdigest()[:12]


@dataclasses.dataclass(eq=False, kw_only=True)
class TextFilesConfig(tfds.core.BuilderConfig):
  """One (files, tokenizer, seq_len, pack) choice; make it with `TextFilesConfig.make`."""
  path: str = ""
  tokenizer: str = "byte"
  seq_len: int = 256
  pack: bool = True
  eval_fraction: float = 0.05

  @classmethod
  def make(cls, *, path: str, tokenizer: str = "byte", seq_len: int = 256, pack: bool = True,
           eval_fraction: float = 0.05, prefix: str = "") -> TextFilesConfig:
    """Checks the fields (errors name them, with `prefix`) and names the config."""
    if not isinstance(path, str) or not path:
      raise ValueError(f"{prefix}path={path!r} is invalid: expected a folder, glob pattern "
                       "or file of text")
    files = list_text_files(path)
    if not files:
      raise ValueError(f"{prefix}path={path!r} names no files")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
      raise ValueError(f"{prefix}seq_len={seq_len!r} is invalid: expected an int >= 2")
    if not isinstance(pack, bool):
      raise ValueError(f"{prefix}pack={pack!r} is invalid: expected a bool")
    if not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
      raise ValueError(f"{prefix}eval_fraction={eval_fraction!r} is invalid: expected a "
                       "float in [0, 1)")
    tok = tokenizers.get_tokenizer(tokenizer)
    name = (f"{tok.slug}-t{seq_len}-{'packed' if pack else 'unpacked'}"
            f"-e{float(eval_fraction)!r}-{_fingerprint(path, files)}")
    return cls(name=name, description=f"Text files {path!r}.", path=path, tokenizer=tokenizer,
               seq_len=seq_len, pack=pack, eval_fraction=float(eval_fraction))


class TextFiles(tfds_compat.LocalCodePath, tfds.core.GeneratorBasedBuilder):
  """Local text files as LM rows; splits "train" and, when eval_fraction > 0, "test"."""
  name = "text_files"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Byte / SentencePiece / tiktoken rows, packed or not."}
  BUILDER_CONFIGS = []  # Every config is made from a path: `TextFilesConfig.make`.

  def _info(self) -> tfds.core.DatasetInfo:
    t = self.builder_config.seq_len
    int_row = lambda: tfds.features.Tensor(shape=(t,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "inputs": int_row(), "targets": int_row(), "segment_ids": int_row(),
            "loss_mask": tfds.features.Tensor(shape=(t,), dtype=np.float32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    tok = tokenizers.get_tokenizer(c.tokenizer)
    documents = (tok.encode(_read(f)) for f in list_text_files(c.path))
    rows = list(packing.pack_documents(documents, c.seq_len, pack=c.pack))
    num_eval = math.ceil(c.eval_fraction * len(rows)) if c.eval_fraction > 0 else 0
    if len(rows) - num_eval < 1:
      raise ValueError(f"path={c.path!r} gives {len(rows)} rows of seq_len={c.seq_len}: too "
                       f"few for a train split and eval_fraction={c.eval_fraction}")
    splits = {"train": self._generate_examples(rows[:len(rows) - num_eval])}
    if num_eval:
      splits["test"] = self._generate_examples(rows[len(rows) - num_eval:])
    return splits

  def _generate_examples(self, rows) -> Iterator[tuple[int, dict]]:
    yield from enumerate(rows)


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()
