"""The training benchmark binary on a tiny model (CPU), in a subprocess."""

import json

import pytest

from tests.experiments import run_python

_ARGS = ["--size=tiny", "--seq_len=32", "--global_batch_size=8", "--vocab_size=64",
         "--steps=1", "--warmup=0", "--peak_tflops=1"]
# As on the CUDA backend of JAX 0.11.2: no cost analysis of the lowered step.
_NO_COST_ANALYSIS = "import jax; jax.stages.Lowered.cost_analysis = lambda self: None; "


@pytest.mark.parametrize("cost_analysis", [True, False], ids=["xla_count", "no_xla_count"])
def test_prints_one_json_line_with_mfu(cost_analysis, tmp_path):
  # The second case also profiles: a trace is written and summarised (no device lines on
  # the CPU).
  # It also takes the flags that change the model and dumps the compiled step.
  hlo = tmp_path / "step.hlo"
  args = _ARGS + ([] if cost_analysis else [
      f"--profile_dir={tmp_path}", "--profile_steps=1", "--implementation=xla",
      "--num_heads=1", f"--dump_hlo={hlo}"])
  code = ("" if cost_analysis else _NO_COST_ANALYSIS) + (
      "import sys; from experiments import bench_training; "
      f"sys.argv = ['bench_training'] + {args!r}; bench_training.run()")
  lines = run_python("-c", code).strip().splitlines()
  result = json.loads(next(line for line in lines if line.startswith("{")))
  if not cost_analysis:
    assert list(tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert "no device lines" in lines[-1]
    assert result["num_heads"] == 1 and result["implementation"] == "xla"
    assert result["kernels"] == {"dot_product_attention": "xla", "linear_attention": "xla"}
    assert "HloModule" in hlo.read_text()
  assert result["step_s"] > 0 and result["tokens_per_s"] > 0 and result["params"] > 0
  assert 0 < result["mfu"] < result["mfu_palm"]
  assert (result["xla_tflops_per_step"] is None) != cost_analysis
  if cost_analysis:
    assert result["xla_tflops_per_step"] > 0
