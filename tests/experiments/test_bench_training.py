"""The training benchmark binary on a tiny model (CPU)."""

import json

import jax
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import bench_training


@pytest.mark.parametrize("cost_analysis", [True, False], ids=["xla_count", "no_xla_count"])
def test_prints_one_json_line_with_mfu(capsys, monkeypatch, cost_analysis):
  if not cost_analysis:  # as on the CUDA backend of JAX 0.11.2: no analysis of the lowering
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(size="tiny", seq_len=32, global_batch_size=8, vocab_size=64,
                           steps=1, warmup=0, peak_tflops=1.0):
    bench_training.main(["bench_training"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step_s"] > 0 and result["tokens_per_s"] > 0 and result["params"] > 0
  assert 0 < result["mfu"] < result["mfu_palm"]
  assert (result["xla_tflops_per_step"] is None) != cost_analysis
  if cost_analysis:
    assert result["xla_tflops_per_step"] > 0
