"""The launch-settings sweep binary, in interpret mode on tiny shapes."""

import json

from absl import flags
from absl.testing import flagsaver
import pytest

from experiments import tune_linear_attention


def test_sweeps_every_combination_and_writes_results(tmp_path):
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(seq_lens=["48"], tokens_per_batch=96, heads=2, key_dim=16,
                           value_dim=16, form="scalar", passes=["fwd", "fwd_bwd"],
                           chunk_sizes=["16"], gradient_block_v=["0", "8"], trials=1,
                           output_dir=str(tmp_path)):
    tune_linear_attention.main(["tune_linear_attention"])
  with open(tmp_path / "tune_linear_attention.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["pass_"], r["gradient_block_v"]) for r in rows] == [
      ("fwd", None), ("fwd", 8), ("fwd_bwd", None), ("fwd_bwd", 8)]
  assert all(r["ms"] > 0 and "error" not in r for r in rows)
  assert (tmp_path / "tune_linear_attention.md").read_text().count("| 48 |") == 4


def test_sweeps_the_triton_language_kernels_from_their_own_defaults(tmp_path):
  pytest.importorskip("triton")
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(seq_lens=["32"], tokens_per_batch=32, heads=1, key_dim=16,
                           value_dim=16, form="scalar", passes=["fwd_bwd"],
                           chunk_sizes=["16"], kernels="triton", gradient_block_v=["8"],
                           gradient_num_stages=["0", "3"], trials=1,
                           output_dir=str(tmp_path)):
    tune_linear_attention.main(["tune_linear_attention"])
  with open(tmp_path / "tune_linear_attention.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["gradient_block_v"], r["gradient_num_stages"]) for r in rows] == [
      (8, None), (8, 3)]
  assert all(r["ms"] > 0 and "error" not in r for r in rows)
  assert "(triton kernels)" in (tmp_path / "tune_linear_attention.md").read_text()
