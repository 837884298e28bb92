"""Default `config.data` for each kind of dataset, and the check every config goes through.

`config.data.name` picks the kind: "mqar", "text_files", or any TFDS dataset name. Every
kind has the fields `name` and `data_dir` (where builders write; "" = TFDS's default,
`$TFDS_DATA_DIR` or ~/tensorflow_datasets; a training run usually sets `<workdir>/data`),
plus its own, listed in its default config below. A field that the kind does not have is an
error (it is usually a typo), and a missing field takes the default.
"""

from __future__ import annotations

from typing import Any

import ml_collections

_COMMON = {"name": "", "data_dir": ""}


def default_mqar_config() -> ml_collections.ConfigDict:
  """MQAR (Zoology) small enough to learn on a CPU; see `attn_jax.data.mqar`.

  vocab 128 (keys 1…63, values 64…127), sequences of 64 tokens with 4 key–value pairs and
  4 queries, Zoology's power law (power_a = 0.01), Zoology's 100,000 training examples (so a
  few thousand steps see each example only a few times) and 1,000 test examples. Built once
  per data_dir (about half a minute on a CPU). docs/data.md has the runs that chose it.
  `random_non_queries`: filler tokens between pairs and queries are random (True, as in
  Based's Figure 2) or 0 (False, as in Zoology's Figure 2).
  `train_slices`, `eval_slices`: "" (the single task above), or tasks as
  "SEQ_LENxPAIRS:EXAMPLES,…" (Based's Figure 2 mixes). Training then runs on the mix of
  the train slices, each padded to `seq_len` (which must hold the longest; the slices'
  total replaces `num_train_examples`); evaluation runs on each eval slice as its own
  task, reported per slice (`eval/accuracy/<seq_len>x<pairs>`) and over all of them.
  """
  return ml_collections.ConfigDict({
      **_COMMON, "name": "mqar", "vocab_size": 128, "seq_len": 64, "num_kv_pairs": 4,
      "power_a": 0.01, "num_train_examples": 100_000, "num_eval_examples": 1_000,
      "random_non_queries": True, "train_slices": "", "eval_slices": ""})


def default_text_config(path: str = "") -> ml_collections.ConfigDict:
  """A folder (or glob, or file) of text, byte tokens, packed rows of 256; see `text_files`.

  `tokenizer`: "byte", "sentencepiece:/path/to/model" or "tiktoken:<encoding>".
  `eval_fraction`: the share of rows (taken from the end) held out as the "test" split.
  """
  return ml_collections.ConfigDict({
      **_COMMON, "name": "text_files", "path": path, "tokenizer": "byte", "seq_len": 256,
      "pack": True, "eval_fraction": 0.05})


def default_tfds_text_config(name: str = "lm1b") -> ml_collections.ConfigDict:
  """A TFDS dataset of documents (lm1b, "c4/en", …), tokenized and packed when read.

  `text_key`: the feature holding the text. `docs_per_row`: how many consecutive stored
  documents make one packed row (0 = as many as fill `seq_len` on average); what does not fit
  is cut off. `download`: whether a missing dataset may be downloaded and prepared.
  """
  return ml_collections.ConfigDict({
      **_COMMON, "name": name, "text_key": "text", "tokenizer": "byte", "seq_len": 256,
      "pack": True, "docs_per_row": 0, "download": True})


def _defaults_for(name: str) -> ml_collections.ConfigDict:
  if name == "mqar":
    return default_mqar_config()
  if name == "text_files":
    return default_text_config()
  return default_tfds_text_config(name)


def resolve(data_config: Any) -> dict[str, Any]:
  """`config.data` as a plain dict with every field of its kind, defaults filled in.

  Raises:
    ValueError: no `name`, a field the kind does not have, or a field of the wrong type;
      the message names the field.
  """
  given = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  name = given.get("name")
  if not isinstance(name, str) or not name:
    raise ValueError(f"config.data.name={name!r} is invalid: expected 'mqar', 'text_files' "
                     "or a TFDS dataset name")
  defaults = _defaults_for(name).to_dict()
  for field, value in given.items():
    if field not in defaults:
      raise ValueError(f"config.data.{field} is not a field of dataset {name!r}: expected "
                       f"one of {sorted(defaults)}")
    expected = type(defaults[field])
    ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool))
          or expected is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
      raise ValueError(f"config.data.{field}={value!r} is invalid: expected "
                       f"{expected.__name__}")
  return {**defaults, **given}
