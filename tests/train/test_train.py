"""The training loop and binary: metrics, checkpoints, resume, load, failure handling.

Tiny MQAR runs (d_model 32, 2 layers, 32 tokens, batch 8) on the 8 virtual CPU devices.
An uninterrupted in-process run is the reference: a run killed by SIGTERM and restarted
must log exactly the same metrics. (Two processes joined by `jax.distributed` training
like one: `tests/launch/test_local.py`, through `launch/local.sh`.)
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import attn_jax
from attn_jax import models, train
from attn_jax.train import metrics as metrics_lib
from tests.train.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 10
REPRODUCED = ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss",
              "eval/accuracy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


def _config_file(tmp_path, data_dir, **train_fields):
  path = tmp_path / "config.py"
  path.write_text("from tests.train.tiny import tiny_config\n\n\ndef get_config():\n"
                  f"  return tiny_config({str(data_dir)!r}, **{train_fields!r})\n")
  return str(path)


def _by_step(records):
  """{(step, kind): record} with kind "train" or "eval"; the last record of a step wins."""
  out = {}
  for r in records:
    kind = "eval" if "eval/loss" in r else "train"
    out[(r["step"], kind)] = r
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run of STEPS steps: its workdir and metrics by step."""
  workdir = tmp_path_factory.mktemp("reference")
  result = train.train_and_evaluate(
      tiny_config(data_dir, num_steps=STEPS), workdir)
  return workdir, result, _by_step(train.read_metrics(workdir))


def _binary(config_file, workdir, *extra, env=None, cwd=ROOT):
  command = [sys.executable, "-m", "experiments.train", f"--config={config_file}",
             f"--workdir={workdir}", *extra]
  env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
  return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _module(module, *args):
  """`python -m module *args` from the repository root, finished."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, timeout=300,
                        env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                        text=True, check=False)


def _assert_one_final_line(text):
  """One closing line, naming the step of the run's last evaluation; returns that step."""
  finals = [line for line in text.splitlines() if "final" in line]
  evaluated = int(re.findall(r"eval at step (\d+)", text)[-1])
  assert len(finals) == 1 and finals[0].startswith("final eval accuracy"), text
  assert f"at step {evaluated};" in finals[0], text
  return evaluated


def _assert_same_metrics(got, want, steps):
  for key, record in got.items():
    if key[0] not in steps:
      continue
    for name in REPRODUCED:
      if name in record:
        np.testing.assert_array_equal(record[name], want[key][name],
                                      err_msg=f"{name} at step {key[0]}")


def test_run_writes_metrics_checkpoints_and_loads(reference):
  workdir, result, records = reference
  assert result["step"] == result["eval_step"] == STEPS and not result["preempted"]
  assert {s for s, kind in records if kind == "train"} == set(range(1, STEPS + 1))
  assert {s for s, kind in records if kind == "eval"} == {4, 8, 10}
  assert np.isfinite(records[(STEPS, "train")]["train/loss"])
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(workdir / "tensorboard"))
  assert train.Checkpoints(workdir, read_only=True).steps() == [4, 8, 10]
  assert json.loads((workdir / "config.json").read_text())["vocab_size"] == 64

  model = attn_jax.load(workdir)
  assert isinstance(model, models.DecoderLM) and model.mixers == ("softmax", "softmax")
  assert models.generate(model, np.ones((1, 3), np.int32), max_new_tokens=2).shape == (1, 5)
  evaluated = train.evaluate(workdir)
  assert evaluated["step"] == STEPS
  np.testing.assert_allclose(evaluated["eval/accuracy"], result["eval/accuracy"])
  # Any device count: the same weights restored sharded over 8 devices.
  sharded = attn_jax.load(workdir, mesh=attn_jax.sharding.make_mesh({"fsdp": 8}))
  a, b = (model.embed.embedding[...], sharded.embed.embedding[...])
  assert len(b.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_then_rerun_resumes_with_identical_metrics(tmp_path, data_dir, reference):
  _, _, want = reference
  config_file = _config_file(tmp_path, data_dir, num_steps=STEPS)
  workdir = tmp_path / "run"
  first = _binary(config_file, "run", cwd=tmp_path)  # a relative workdir
  output = []
  for line in first.stdout:
    output.append(line)
    if line.startswith("step 4/"):
      first.send_signal(signal.SIGTERM)
  assert first.wait(timeout=300) == 0, "".join(output)
  text = "".join(output)
  assert "SIGTERM: saved the checkpoint of step" in text, text
  saved = int(text.split("SIGTERM: saved the checkpoint of step ")[1].split()[0])
  assert 4 <= saved < STEPS
  assert _assert_one_final_line(text) < saved  # the evaluation's step, not the step saved

  second = _binary(config_file, "run", cwd=tmp_path)
  out, _ = second.communicate(timeout=300)
  assert second.returncode == 0, out
  assert f"resuming from the checkpoint of step {saved}" in out, out
  assert _assert_one_final_line(out) == STEPS
  got = _by_step(train.read_metrics(workdir))
  assert set(got) == set(want)
  _assert_same_metrics(got, want, range(1, STEPS + 1))


def test_resume_rules_corrupt_checkpoint_and_config_changes(tmp_path, data_dir, reference,
                                                            caplog):
  ref_dir, _, want = reference
  workdir = tmp_path / "copy"
  # A copy of the reference run; its newest checkpoint (10) gets corrupted.
  subprocess.run(["cp", "-r", str(ref_dir), str(workdir)], check=True)
  for item in ("params", "meta"):
    for root, _, files in os.walk(workdir / "checkpoints" / "10" / item):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"not a checkpoint")
  (workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()

  # The newest readable checkpoint (8) decides; the config differs in one field.
  mismatch = r"(?s)\(step 8\).*model.d_model: checkpoint 32, now 48"
  with pytest.raises(train.ConfigMismatchError, match=mismatch):
    changed = tiny_config(data_dir, num_steps=STEPS)
    changed.model.d_model = 48
    train.train_and_evaluate(changed, workdir)
  assert (workdir / "checkpoints" / "10").exists()  # refusing touched nothing

  caplog.set_level("WARNING")
  result = train.train_and_evaluate(tiny_config(data_dir, num_steps=12), workdir)
  assert "checkpoint 10" in caplog.text and "does not restore" in caplog.text
  assert "partial" in caplog.text
  assert result["step"] == 12
  assert len(os.listdir(workdir / "corrupt_checkpoints")) == 1
  got = _by_step(train.read_metrics(workdir))
  # Steps 1-8 are the reference's (kept); 9-12 were trained again from checkpoint 8
  # under the longer schedule, so only their presence is checked.
  _assert_same_metrics(got, want, range(1, 9))
  assert {s for s, kind in got if kind == "train"} == set(range(1, 13))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                         data_dir):
  config = tiny_config(data_dir, num_steps=6)
  config.optimizer.learning_rate = 1e30
  config.optimizer.warmup_steps = 0
  config.checkpoint.every = 1
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d)") as error:
    train.train_and_evaluate(config, tmp_path)
  bad = int(str(error.value).split("at step ")[1].split(";")[0])
  steps = train.Checkpoints(tmp_path, read_only=True).steps()
  assert steps and max(steps) < bad
  assert metrics_lib.read_metrics(tmp_path)[-1]["step"] < bad


def test_restart_without_a_checkpoint_says_so_and_keeps_metrics_unique(
    tmp_path, data_dir, capsys):
  """Killed before the first save (a cut-short last line too): the rerun starts at step 0,
  says why, records every step once, and keeps the abandoned records aside."""
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 8.0}\n{"step": 3, "tra')
  train.train_and_evaluate(tiny_config(data_dir, num_steps=4), tmp_path)
  out = capsys.readouterr()
  assert "starting at step 0: no checkpoint in the workdir yet (3 metric records" in (
      out.out + out.err)
  steps = [r["step"] for r in train.read_metrics(tmp_path) if "train/loss" in r]
  assert steps == [1, 2, 3, 4]
  abandoned = [json.loads(line) for line in
               (tmp_path / metrics_lib.ABANDONED_FILE).read_text().splitlines()]
  assert [r.get("step") for r in abandoned] == [1, 2, None]
  assert all(r["resumed_from"] == 0 for r in abandoned)


def test_stop_accuracy_stops_at_the_first_evaluation_above_it_and_stays_stopped(
    tmp_path, data_dir, reference, capsys):
  """Zoology's early stop: the run saves and stops at the first evaluation whose accuracy
  exceeds train.stop_accuracy; a rerun only evaluates; without the bar it trains on."""
  _, _, want = reference
  accuracy = want[(4, "eval")]["eval/accuracy"]
  assert accuracy > 0  # the bar below needs a reached accuracy above 0
  config = tiny_config(data_dir, num_steps=STEPS, stop_accuracy=accuracy / 2)
  result = train.train_and_evaluate(config, tmp_path)
  assert result["stopped_early"] and result["step"] == result["eval_step"] == 4
  assert result["eval/accuracy"] == accuracy
  assert train.Checkpoints(tmp_path, read_only=True).steps() == [4]
  assert "stopped early." in capsys.readouterr().out
  again = train.train_and_evaluate(config, tmp_path)
  assert again["stopped_early"] and again["step"] == 4
  assert "stopped early at step 4" in capsys.readouterr().out
  steps = [r["step"] for r in train.read_metrics(tmp_path) if "train/loss" in r]
  assert steps == [1, 2, 3, 4]
  # Without the bar the run resumes and trains to num_steps, as the uninterrupted one.
  resumed = train.train_and_evaluate(tiny_config(data_dir, num_steps=STEPS), tmp_path)
  assert not resumed["stopped_early"] and resumed["step"] == STEPS
  _assert_same_metrics(_by_step(train.read_metrics(tmp_path)), want, range(5, STEPS + 1))
  with pytest.raises(ValueError, match="config.train.stop_accuracy must be"):
    train.train_and_evaluate(tiny_config(data_dir, stop_accuracy=1.0), tmp_path / "bad")


def test_changed_checkpoint_bytes_are_caught_and_load_falls_back(tmp_path, reference,
                                                                caplog):
  """Arrays that restore but differ from what was saved (here: one weight changed in
  the saved fingerprint's stead) are refused, naming the step; `attn_jax.load` falls
  back to the previous checkpoint and says so."""
  ref_dir, _, _ = reference
  workdir = tmp_path / "copy"
  subprocess.run(["cp", "-r", str(ref_dir), str(workdir)], check=True)
  meta_files = [os.path.join(root, name)
                for root, _, files in os.walk(workdir / "checkpoints" / "10" / "meta")
                for name in files]
  for path in meta_files:
    try:
      meta = json.loads(open(path).read())
    except (json.JSONDecodeError, UnicodeDecodeError):
      continue
    if "fingerprint" in meta:
      first = min(k for k in meta["fingerprint"] if k.startswith("['params']"))
      meta["fingerprint"][first][1] *= 1.01  # as if a weight had changed since the save
      open(path, "w").write(json.dumps(meta))
      break
  else:
    raise AssertionError(f"no meta with a fingerprint among {meta_files}")
  with pytest.raises(train.CorruptCheckpoint, match="checkpoint 10: 1 arrays differ"):
    attn_jax.load(workdir, step=10)
  caplog.set_level("WARNING")
  model = attn_jax.load(workdir)
  assert "checkpoint 10 does not restore" in caplog.text and "previous one, 8" in caplog.text
  want = attn_jax.load(workdir, step=8)
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]),
                                np.asarray(want.embed.embedding[...]))


def test_evaluate_and_generate_name_a_missing_workdir_or_step(tmp_path, reference):
  """The message alone on stderr (no traceback) and exit status 2."""
  ref_dir, _, _ = reference
  cases = [(tmp_path / "none", [], f"no checkpoint in {tmp_path / 'none' / 'checkpoints'};"),
           (ref_dir, ["--step=100"], "no checkpoint of step 100 in ")]
  for module, extra in (("experiments.evaluate", []),
                        ("experiments.generate", ["--prompt_tokens=1,2"])):
    for workdir, step, message in cases:
      done = _module(module, f"--workdir={workdir}", *step, *extra)
      assert done.returncode == 2, done.stderr
      assert done.stderr.startswith(f"error: {message}"), done.stderr
      assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_generate_prints_the_prompt_and_each_continuation_apart(reference):
  ref_dir, _, _ = reference
  done = _module("experiments.generate", f"--workdir={ref_dir}", "--prompt_tokens=5,9,3",
                 "--max_new_tokens=4", "--num_samples=2", "--temperature=1")
  assert done.returncode == 0, done.stderr
  prompt, *generated = done.stdout.splitlines()
  assert prompt == "prompt:    5 9 3"
  assert len(generated) == 2, done.stdout
  for line in generated:
    label, *tokens = line.split()
    assert label == "generated:" and len(tokens) == 4 and all(t.isdigit() for t in tokens)


def test_evaluate_and_generate_under_a_cache_policy(reference):
  """A KV-cache policy that evicts nothing decodes to `train.evaluate`'s numbers; one that
  evicts reports its memory: 2 softmax layers of 4 KV heads of 8 over 32 tokens, keeping
  sinks + window = 10 of the 32 slots."""
  ref_dir, result, _ = reference
  runs = {}
  for policy in ("sinks_window:sinks=0,window=32", "sinks_window:sinks=2,window=8"):
    done = _module("experiments.evaluate", f"--workdir={ref_dir}", f"--cache_policy={policy}")
    assert done.returncode == 0, done.stderr
    runs[policy] = json.loads(done.stdout)
    assert runs[policy]["step"] == STEPS and runs[policy]["cache_policy"] == policy
  whole, evicting = runs.values()
  np.testing.assert_allclose(whole["eval/accuracy"], result["eval/accuracy"])
  np.testing.assert_allclose(whole["eval/loss"], result["eval/loss"], rtol=1e-5)
  assert whole["cache/fraction_of_full"] == 1.0
  full_bytes = 2 * 2 * 32 * 4 * 8 * 4  # layers, key and value, slots, heads, head_dim, f32
  assert evicting["cache/full_bytes"] == full_bytes
  assert evicting["cache/bytes"] == full_bytes * 10 // 32
  assert evicting["cache/fraction_of_full"] == 10 / 32
  assert 0.0 <= evicting["eval/accuracy"] <= 1.0
  done = _module("experiments.generate", f"--workdir={ref_dir}", "--prompt_tokens=5,9,3",
                 "--max_new_tokens=4", "--cache_policy=sinks_window:sinks=1,window=2")
  assert done.returncode == 0, done.stderr
  assert len(done.stdout.splitlines()) == 2, done.stdout
  assert "cache: sinks_window:sinks=1,window=2: " in done.stderr, done.stderr


def test_verify_refuses_non_finite_arrays():
  tree = {"w": np.ones((3, 2), np.float32)}
  meta = {"fingerprint": train.checkpoint.fingerprint(tree)}
  train.checkpoint.verify(7, tree, meta)
  with pytest.raises(train.CorruptCheckpoint, match="checkpoint 7: non-finite"):
    train.checkpoint.verify(7, {"w": np.full((3, 2), np.nan, np.float32)}, {})


def test_train_mix_and_per_slice_evaluation(tmp_path, data_dir, capfd):
  """Based's Figure 2 setup in small: a mix of two tasks to train, each eval slice
  reported on its own and over all of them (count-weighted), by training and by
  `train.evaluate`."""
  config = tiny_config(data_dir, num_steps=2, eval_every=2)
  config.data.update(dict(train_slices="16x2:64,32x4:64", eval_slices="16x2:32,32x4:64",
                          num_train_examples=128))
  result = train.train_and_evaluate(config, tmp_path)
  per_slice = {k: result[k] for k in ("eval/accuracy/16x2", "eval/accuracy/32x4")}
  # eval.num_steps=2 batches of 32: 32 of the 16x2 queries (2 each), 64 of 32x4 (4 each).
  weighted = (per_slice["eval/accuracy/16x2"] * 64 + per_slice["eval/accuracy/32x4"] * 256)
  assert result["eval/accuracy"] == pytest.approx(weighted / 320)
  again = train.evaluate(tmp_path)
  assert {k: again[k] for k in per_slice} == pytest.approx(per_slice)
  assert "(per slice:  16x2 " in "".join(capfd.readouterr())


def test_analyze_heads_writes_every_score_and_plot(reference, tmp_path):
  """The binary end to end on the reference run (2 layers of 4 heads), at a tiny size."""
  ref_dir, _, _ = reference
  done = _module("experiments.analyze_heads", f"--workdir={ref_dir}",
                 f"--output_dir={tmp_path}", "--num_examples=32", "--map_examples=4",
                 "--batch_size=32", "--top_k=1", "--random_draws=1", "--sinks=1",
                 "--window=2")
  assert done.returncode == 0, done.stderr
  report = json.loads((tmp_path / "heads.json").read_text())
  assert set(report["scores"]) == {"sink", "retrieval", "induction", "entropy",
                                   "mean_distance"}
  assert np.asarray(report["scores"]["retrieval"]).shape == (2, 4)
  assert [row["k"] for row in report["ablation"]] == [1]
  assert report["cache"][0]["policy"] == "full" and report["cache"][0]["memory"] == 1.0
  assert abs(report["cache"][0]["accuracy"] - report["full"]["accuracy"]) < 0.05
  assert {p.name for p in tmp_path.glob("*.png")} == {"scores.png", "maps.png",
                                                     "pruning.png", "cache.png"}
  assert "| cache policy | memory (of full) | accuracy |" in done.stdout
