"""Local text files → packed byte-level rows through the TFDS builder and the pipeline."""

import collections
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attn_jax import data
from attn_jax.data import text_files

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 3,
    "sub/b.txt": "Pack my box with five dozen liquor jugs.",
    "sub/c.md": "Sphinx of black quartz, judge my vow! " * 5,
    "d.txt": "hi",
    ".hidden.txt": "never read",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  for name, text in DOCS.items():
    os.makedirs(root / os.path.dirname(name), exist_ok=True)
    (root / name).write_text(text)
  return root


def _config(folder, data_dir, **fields):
  config = data.default_text_config(str(folder))
  config.data_dir = str(data_dir)
  config.update(seq_len=32, **fields)
  return config


def _all_rows(config, split):
  p = data.make_pipeline(config, split, global_batch_size=1, shuffle=False, prefetch=False)
  rows = [p.batch(step) for step in range(p.num_examples)]
  return p, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _bigrams(texts):
  return collections.Counter(
      (a, b) for t in texts for a, b in zip(t.encode()[:-1], t.encode()[1:]))


def _row_bigrams(rows):
  m = rows["loss_mask"] > 0
  return collections.Counter(zip(rows["inputs"][m].tolist(), rows["targets"][m].tolist()))


@pytest.mark.parametrize("pack", [True, False])
def test_rows_cover_every_byte_transition(folder, tmp_path, pack):
  config = _config(folder, tmp_path, pack=pack, eval_fraction=0.2)
  train, train_rows = _all_rows(config, "train")
  test, test_rows = _all_rows(config, "test")
  assert train.vocab_size == 256 and train.seq_len == 32
  total = train.num_examples + test.num_examples
  assert test.num_examples == int(np.ceil(0.2 * total)) >= 1
  got = _row_bigrams(train_rows) + _row_bigrams(test_rows)
  texts = [t for name, t in DOCS.items() if not name.startswith(".")]
  assert got == _bigrams(texts)
  for rows in (train_rows, test_rows):
    seg = rows["segment_ids"]
    assert seg.max() >= 1 if pack else seg.max() == 1
    # Targets are shifted within segments; a segment's last token has no target.
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(rows["targets"][:, :-1][same], rows["inputs"][:, 1:][same])
    np.testing.assert_array_equal(rows["loss_mask"][:, :-1], same.astype(np.float32))
    assert not rows["loss_mask"][:, -1].any()
  segments = np.concatenate([train_rows["segment_ids"], test_rows["segment_ids"]])
  if pack:  # Several documents share a row, and only the last row has much padding.
    assert segments.max() >= 2
    assert (segments == 0).sum() < 32 + total


def test_edited_folder_gets_a_new_dataset(folder, tmp_path):
  config = _config(folder, tmp_path)
  before = data.make_pipeline(config, "train", global_batch_size=2, prefetch=False)
  assert data.make_pipeline(config, "train", global_batch_size=2).dataset == before.dataset
  (folder / "e.txt").write_text("a new document " * 4)
  try:
    after = data.make_pipeline(config, "train", global_batch_size=2, prefetch=False)
  finally:
    os.remove(folder / "e.txt")
  assert after.dataset != before.dataset
  assert after.num_examples > before.num_examples


def test_glob_and_listing(folder):
  assert [os.path.basename(f) for f in text_files.list_text_files(str(folder))] == [
      "a.txt", "d.txt", "b.txt", "c.md"]
  assert [os.path.basename(f) for f in
          text_files.list_text_files(str(folder / "**" / "*.txt"))] == ["a.txt", "d.txt",
                                                                        "b.txt"]


def test_fifo_is_skipped_with_a_warning(tmp_path, caplog):
  (tmp_path / "a.txt").write_text("a document")
  os.mkfifo(tmp_path / "pipe")
  caplog.set_level("WARNING")
  assert text_files.list_text_files(str(tmp_path)) == [str(tmp_path / "a.txt")]
  assert text_files.list_text_files(str(tmp_path / "*")) == [str(tmp_path / "a.txt")]
  warnings = [r.getMessage() for r in caplog.records if "not regular files" in r.getMessage()]
  assert len(warnings) == 2 and all(str(tmp_path / "pipe") in w for w in warnings)
  with pytest.raises(ValueError, match="names no files"):
    data.make_pipeline(_config(tmp_path / "pipe", tmp_path), "train", global_batch_size=1)


def test_folder_with_a_fifo_builds(tmp_path):
  """Reading a FIFO blocks until a writer comes: the build runs in a subprocess with a
  timeout, so a regression fails instead of hanging the suite."""
  folder = tmp_path / "text"
  folder.mkdir()
  (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 4)
  os.mkfifo(folder / "pipe")
  code = f"""
      from attn_jax import data
      config = data.default_text_config({str(folder)!r})
      config.update(data_dir={str(tmp_path / "data")!r}, seq_len=32, eval_fraction=0.0)
      print(data.make_pipeline(config, "train", global_batch_size=1, prefetch=False)
            .num_examples)
      """
  root = pathlib.Path(__file__).resolve().parents[2]
  try:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            capture_output=True, text=True, timeout=120)
  except subprocess.TimeoutExpired:
    pytest.fail("building a folder that holds a FIFO did not finish in 120 s")
  assert result.returncode == 0, result.stderr[-3000:]
  assert int(result.stdout.split()[-1]) == 6  # 180 bytes in rows of 32
  assert result.stderr.count("not regular files") == 1, result.stderr[-3000:]
  assert str(folder / "pipe") in result.stderr


def test_errors_name_the_field(folder, tmp_path):
  with pytest.raises(ValueError, match="config.data.path"):
    data.make_pipeline(_config(tmp_path / "nothing", tmp_path), "train", global_batch_size=2)
  with pytest.raises(ValueError, match="eval_fraction"):
    data.make_pipeline(_config(folder, tmp_path, eval_fraction=1.0), "train",
                       global_batch_size=2)
  with pytest.raises(ValueError, match="tokenizer='bpe'"):
    data.get_tokenizer("bpe")


@pytest.mark.parametrize("spec", ["sentencepiece:/no/such.model", "tiktoken:cl100k_base"])
def test_optional_tokenizers_say_what_to_install(spec):
  module = spec.split(":")[0]
  try:
    __import__(module)
  except ImportError:
    with pytest.raises(ImportError, match=f"pip install {module}"):
      data.get_tokenizer(spec)
  else:
    pytest.skip(f"{module} is installed")
