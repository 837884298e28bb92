"""The attention and linear-attention benchmark binaries on tiny shapes (CPU: the XLA
implementations), and the per-row result files."""

import json

from experiments import benchmarking
from tests.experiments import run_python


def _run(module, args, out):
  run_python("-m", module, f"--output_dir={out}", *args)
  with open(out / f"{module.split('.')[-1]}.json") as f:
    return json.load(f)["rows"]


def test_bench_attention_rows(tmp_path):
  rows = _run("experiments.bench_attention",
              ["--implementations=xla", "--seq_lens=32", "--tokens_per_batch=64",
               "--heads=2", "--head_dim=16", "--masks=full,causal",
               "--window_rows=causal_window:8@32", "--trials=1"], tmp_path)
  assert [(r["mask"], r["pass_"]) for r in rows] == [
      (m, p) for m in ("full", "causal", "causal_window:8") for p in ("fwd", "fwd_bwd")]
  assert all(r["ms"] > 0 and r["max_rel_err"] < 2e-2 and "error" not in r for r in rows)
  assert (tmp_path / "bench_attention.md").read_text().count("| xla |") == 6


def test_bench_linear_attention_rows(tmp_path):
  rows = _run("experiments.bench_linear_attention",
              ["--implementations=xla", "--softmax_implementation=xla", "--seq_lens=32",
               "--tokens_per_batch=64", "--heads=2", "--key_dim=16", "--value_dim=16",
               "--chunk_size=16", "--forms=fixed,vector", "--trials=1"], tmp_path)
  linear = [(r["form"], r["pass_"]) for r in rows if r["impl"] == "xla"]
  assert linear == [(f, p) for p in ("fwd", "fwd_bwd") for f in ("fixed", "vector")]
  assert [r["pass_"] for r in rows if r["impl"] == "softmax:xla"] == ["fwd", "fwd_bwd"]
  assert all(r["ms"] > 0 and r["mtok_s"] > 0 and "error" not in r for r in rows)
  assert all(r["max_rel_err"] < 2e-2 for r in rows if r["impl"] == "xla")


def test_record_rewrites_the_results_after_every_row(tmp_path):
  rows = []
  for i in range(2):
    benchmarking.record(rows, {"name": f"row{i}", "ms": 1.0 + i}, str(tmp_path), "bench",
                        ["name", "ms"], "header")
    with open(tmp_path / "bench.json") as f:
      assert [r["name"] for r in json.load(f)["rows"]] == [f"row{j}" for j in range(i + 1)]
  assert (tmp_path / "bench.md").read_text().count("| row") == 2
