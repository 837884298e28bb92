"""Tokenizers for text datasets: bytes (no files needed), SentencePiece, tiktoken.

A tokenizer is named by a string in the data config:

  "byte"                      UTF-8 bytes, vocab 256 (nothing to install or download)
  "sentencepiece:/path.model" a SentencePiece model file (needs `pip install sentencepiece`)
  "tiktoken:<encoding>"       a tiktoken encoding such as `cl100k_base` (needs
                              `pip install tiktoken`, and its BPE file in tiktoken's cache:
                              tiktoken downloads it on first use, which fails offline)

Padding uses token 0 with segment id 0 and loss mask 0, so no id is reserved for it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text → token ids. `encode(str | bytes) -> int32 [n]`; `vocab_size` bounds every id."""
  spec: str
  vocab_size: int
  _encode: Callable[[bytes], np.ndarray] = dataclasses.field(repr=False, compare=False)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, str):
      text = text.encode("utf-8")
    return self._encode(bytes(text)).astype(np.int32, copy=False)

  @property
  def slug(self) -> str:
    """A short file-name-safe name, used in builder config names."""
    return re.sub(r"[^\w\-.]+", "_", self.spec.split("/")[-1])[:40]


def _byte_encode(data: bytes) -> np.ndarray:
  return np.frombuffer(data, dtype=np.uint8)


def get_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by `spec` ("byte", "sentencepiece:PATH", "tiktoken:NAME").

  Raises:
    ValueError: `spec` is not one of those forms.
    ImportError: the library the tokenizer needs is not installed.
  """
  kind, _, arg = spec.partition(":")
  if kind == "byte" and not arg:
    return Tokenizer(spec, 256, _byte_encode)
  if kind == "sentencepiece" and arg:
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"tokenizer={spec!r} needs the sentencepiece package: "
                        "pip install sentencepiece") from e
    processor = sentencepiece.SentencePieceProcessor(model_file=arg)
    return Tokenizer(spec, int(processor.get_piece_size()),
                     lambda b: np.asarray(processor.encode(b.decode("utf-8", "replace")),
                                          np.int32))
  if kind == "tiktoken" and arg:
    try:
      import tiktoken  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"tokenizer={spec!r} needs the tiktoken package: "
                        "pip install tiktoken") from e
    encoding = tiktoken.get_encoding(arg)
    return Tokenizer(spec, int(encoding.n_vocab),
                     lambda b: np.asarray(
                         encoding.encode_ordinary(b.decode("utf-8", "replace")), np.int32))
  raise ValueError(f"tokenizer={spec!r} is not a tokenizer: expected 'byte', "
                   "'sentencepiece:/path/to/model' or 'tiktoken:<encoding name>'")
