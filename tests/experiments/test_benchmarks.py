"""The attention and linear-attention benchmark binaries on tiny shapes (CPU: the XLA
implementations), the per-row result files, and the peers' rows (`--peers`): skipped with a
note when not installed or off a GPU, and, with fake peers, the `vs_best_peer` column."""

import json

import pytest

from experiments import benchmarking
from tests.experiments import run_python

_ATTENTION = ["--implementations=xla", "--seq_lens=32", "--tokens_per_batch=64", "--heads=2",
              "--head_dim=16", "--trials=1"]
_LINEAR = ["--implementations=xla", "--seq_lens=32", "--tokens_per_batch=64", "--heads=2",
           "--key_dim=16", "--value_dim=16", "--chunk_size=16", "--trials=1"]
# Fake peers (run in the binary's process, before its flags are defined): every peer is
# "installed", cudnn and tokamax are XLA's softmax attention, flash_attn3_jax refuses every
# call when traced, jax_linear_attention is our XLA linear attention.
_FAKE_PEERS = """
import functools, sys
import jax
from attn_jax import ops
from experiments import peers

def softmax_attention(name, **kwargs):
  if name == "flash_attn3_jax":
    def refuse(q, k, v):
      raise NotImplementedError("fake refusal")
    return refuse
  return functools.partial(jax.nn.dot_product_attention, implementation="xla", **kwargs)

peers.unavailable = lambda name, op: None
peers.softmax_attention = softmax_attention
peers.linear_attention = lambda name: lambda q, k, v, g: ops.linear_attention(
    q, k, v, log_decay=g, implementation="xla")
"""


def _run(module, args, out, prelude=""):
  name = module.split(".")[-1]
  code = (f"{prelude}\nimport sys\nfrom experiments import {name}\n"
          f"sys.argv = [{name!r}, '--output_dir={out}'] + {list(args)!r}\n{name}.run()")
  stdout = run_python("-c", code)
  with open(out / f"{name}.json") as f:
    return json.load(f)["rows"], stdout


def test_bench_attention_rows(tmp_path):
  # Not installed (cudnn: no GPU here; jax_linear_attention: the other op): a note each.
  rows, stdout = _run("experiments.bench_attention", _ATTENTION + [
      "--masks=full,causal", "--extra_rows=causal_window:8@32,causal@32/kv_heads=1/head_dim=8",
      "--peers=cudnn,jax_linear_attention"], tmp_path)
  assert "note: peer cudnn skipped: needs an NVIDIA GPU" in stdout
  assert "note: peer jax_linear_attention skipped: computes linear attention" in stdout
  assert "small sweep" not in stdout  # every size flag given
  assert [(r["mask"], r["kv_heads"], r["head_dim"], r["pass_"]) for r in rows] == [
      (m, kv, d, p) for m, kv, d in [("full", 2, 16), ("causal", 2, 16),
                                     ("causal_window:8", 2, 16), ("causal", 1, 8)]
      for p in ("fwd", "fwd_bwd")]
  assert all(r["ms"] > 0 and r["max_rel_err"] < 2e-2 and "error" not in r for r in rows)
  assert all("vs_best_peer" not in r for r in rows)
  assert (tmp_path / "bench_attention.md").read_text().count("| xla |") == 8


def test_bench_linear_attention_rows(tmp_path):
  rows, stdout = _run("experiments.bench_linear_attention", _LINEAR + [
      "--softmax_implementation=xla", "--forms=fixed,vector",
      "--peers=cudnn,jax_linear_attention"], tmp_path)
  assert "note: peer cudnn skipped: computes softmax attention" in stdout
  assert ("note: peer jax_linear_attention skipped: not installed "
          "(pip install jax-linear-attention==0.1.0)") in stdout
  linear = [(r["form"], r["pass_"]) for r in rows if r["impl"] == "xla"]
  assert linear == [(f, p) for p in ("fwd", "fwd_bwd") for f in ("fixed", "vector")]
  assert [r["pass_"] for r in rows if r["impl"] == "softmax:xla"] == ["fwd", "fwd_bwd"]
  assert all(r["ms"] > 0 and r["mtok_s"] > 0 and "error" not in r for r in rows)
  assert all(r["max_rel_err"] < 2e-2 for r in rows if r["impl"] == "xla")


def test_cpu_sweep_is_small_where_the_size_flags_are_unset(tmp_path):
  """On a CPU the GPU-sized defaults give way to a small sweep, flag by flag: the flags
  given keep their values, and one line says what changed and how to get the full sweep."""
  rows, stdout = _run("experiments.bench_attention", [
      "--implementations=xla", "--masks=causal", "--passes=fwd", "--trials=1",
      "--seq_lens=64"], tmp_path / "attention")
  line = next(line for line in stdout.splitlines() if "small sweep" in line)
  assert line == (
      "CPU backend: a small sweep (--tokens_per_batch=1024 --heads=4 --head_dim=64 "
      "--extra_rows=causal_window:128@512); for the GPU-sized one pass "
      "--tokens_per_batch=16384 --heads=16 --head_dim=128 "
      "--extra_rows=causal_window:1024@16384")
  assert [(r["mask"], r["seq"], r["batch"], r["heads"], r["head_dim"]) for r in rows] == [
      ("causal", 64, 16, 4, 64), ("causal_window:128", 512, 2, 4, 64)]

  rows, stdout = _run("experiments.bench_linear_attention", [
      "--implementations=xla", "--softmax_implementation=", "--forms=fixed",
      "--passes=fwd", "--trials=1", "--key_dim=16"], tmp_path / "linear")
  assert ("CPU backend: a small sweep (--seq_lens=256,512 --tokens_per_batch=1024 --heads=4 "
          "--value_dim=64); for the GPU-sized one pass --seq_lens=1024,4096,16384,65536 "
          "--tokens_per_batch=65536 --heads=16 --value_dim=128") in stdout
  assert [(r["seq"], r["batch"]) for r in rows] == [(256, 4), (512, 2)]


def _check_vs_best_peer(rows, group_key, ours, peer_impls):
  groups = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in group_key), []).append(r)
  for group in groups.values():
    best = min(r["ms"] for r in group if r["impl"] in peer_impls)
    for r in group:
      if r["impl"] in ours:
        assert r["vs_best_peer"] == pytest.approx(best / r["ms"])
      else:
        assert "vs_best_peer" not in r
      if r["impl"] in peer_impls:  # the same function as ours
        assert r["max_rel_err"] < 2e-2


def test_vs_best_peer_with_fake_peers(tmp_path):
  rows, stdout = _run("experiments.bench_attention", _ATTENTION + [
      "--masks=causal", "--extra_rows=", "--passes=fwd_bwd",
      "--peers=cudnn,tokamax,flash_attn3_jax"], tmp_path / "attention", _FAKE_PEERS)
  assert "note: peer:flash_attn3_jax skipped for causal seq 32" in stdout
  assert [r["impl"] for r in rows] == ["xla", "peer:cudnn", "peer:tokamax"]
  _check_vs_best_peer(rows, ("seq", "mask", "pass_"), {"xla"}, {"peer:cudnn", "peer:tokamax"})
  assert "vs_best_peer" in (tmp_path / "attention" / "bench_attention.md").read_text()

  rows, _ = _run("experiments.bench_linear_attention", _LINEAR + [
      "--softmax_implementation=xla", "--forms=scalar", "--passes=fwd_bwd",
      "--peers=jax_linear_attention"], tmp_path / "linear", _FAKE_PEERS)
  assert [r["impl"] for r in rows] == ["xla", "peer:jax_linear_attention", "softmax:xla"]
  _check_vs_best_peer(rows[:2], ("seq", "form", "pass_"), {"xla"},
                      {"peer:jax_linear_attention"})
  assert "vs_best_peer" not in rows[2]


def test_record_rewrites_the_results_after_every_row(tmp_path):
  rows = []
  for i in range(2):
    benchmarking.record(rows, {"name": f"row{i}", "ms": 1.0 + i}, str(tmp_path), "bench",
                        ["name", "ms"], "header")
    with open(tmp_path / "bench.json") as f:
      assert [r["name"] for r in json.load(f)["rows"]] == [f"row{j}" for j in range(i + 1)]
  assert (tmp_path / "bench.md").read_text().count("| row") == 2
