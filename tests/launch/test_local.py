"""launch/local.sh: two CPU processes joined by jax.distributed train like one process."""

import signal
import subprocess
import time

import numpy as np
import pytest

from tests.launch.conftest import NUM_STEPS, REPO, TINY_RUN_FLAGS, read_metrics, subprocess_env


def test_two_processes_train_like_one(trained_run, tmp_path):
  workdir, logs = tmp_path / "workdir", tmp_path / "logs"
  # The data the tiny run built (same config, so the same examples).
  data_dir = trained_run.workdir / "data"
  result = subprocess.run(
      ["bash", str(REPO / "launch" / "local.sh"), "--num_processes=2", f"--log_dir={logs}",
       "--", f"--workdir={workdir}", *TINY_RUN_FLAGS, f"--config.data.data_dir={data_dir}"],
      env=subprocess_env(GRACE_SECONDS="5"), cwd=tmp_path, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "mesh {'data': 2, " in result.stdout and "2 process(es)" in result.stdout
  assert "all 2 process(es) finished" in result.stderr
  assert (logs / "process_0.log").read_text() == result.stdout
  assert "final eval accuracy" in (logs / "process_1.log").read_text()
  assert (workdir / "checkpoints" / str(NUM_STEPS)).is_dir()

  # Data parallelism over two processes changes only the order of float sums.
  def losses(records):
    return {(r["step"], k): r[k] for r in records for k in ("train/loss", "eval/loss") if k in r}
  ours, single = losses(read_metrics(workdir)), losses(trained_run.metrics)
  assert ours.keys() == single.keys() and len(ours) == NUM_STEPS + 1
  np.testing.assert_allclose([ours[k] for k in sorted(ours)],
                             [single[k] for k in sorted(ours)], rtol=1e-4)


FAKE_PYTHON = """#!/bin/bash
# Stands in for python: process --process_id=I waits, or fails if I is $FAIL. The failing
# one waits until all $NUM can take SIGTERM (trap set): a process the launcher stops
# before that dies without a mark, which says nothing about the launcher.
for arg; do case $arg in --process_id=*) id=${arg#*=} ;; esac; done
trap 'kill $!; echo "$id stopped" >> "$MARKS"; exit 0' TERM
echo "$id" >> "$MARKS.ready"
echo "process $id started"
if [ "$id" = "${FAIL:-}" ]; then
  until [ "$(wc -l < "$MARKS.ready")" -ge "$NUM" ]; do sleep 0.05; done
  exit 3
fi
sleep 60 & wait $!
"""


def start_fake_processes(tmp_path, **env):
  python = tmp_path / "python"
  python.write_text(FAKE_PYTHON)
  python.chmod(0o755)
  return subprocess.Popen(
      ["bash", str(REPO / "launch" / "local.sh"), "--num_processes=3", f"--python={python}",
       f"--log_dir={tmp_path / 'logs'}", "--", "--workdir=unused"],
      env=subprocess_env(MARKS=str(tmp_path / "marks"), NUM="3", GRACE_SECONDS="10", **env),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_failing_process_stops_the_others(tmp_path):
  launcher = start_fake_processes(tmp_path, FAIL="1")
  stdout, stderr = launcher.communicate(timeout=30)
  assert launcher.returncode == 3, stderr
  assert "process 1 exited with status 3" in stderr
  assert sorted((tmp_path / "marks").read_text().split("\n")[:-1]) == ["0 stopped",
                                                                        "2 stopped"]
  assert stdout == "process 0 started\n"
  assert (tmp_path / "logs" / "process_2.log").read_text() == "process 2 started\n"


def test_sigterm_reaches_every_process(tmp_path):
  launcher = start_fake_processes(tmp_path)
  logs = [tmp_path / "logs" / f"process_{i}.log" for i in range(3)]
  for _ in range(200):  # until all three have started
    if all(log.exists() and log.read_text() for log in logs):
      break
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=30)
  assert launcher.returncode == 143, stderr
  assert sorted((tmp_path / "marks").read_text().split("\n")[:-1]) == [
      "0 stopped", "1 stopped", "2 stopped"]


def test_processes_join_with_several_devices_each(tmp_path):
  try:
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), "--num_processes=2",
         "--devices_per_process=2", "--binary=tests.launch.allreduce_probe",
         f"--log_dir={tmp_path}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120)
  except subprocess.TimeoutExpired:
    logs = {log.name: log.read_text() for log in sorted(tmp_path.glob("process_*.log"))}
    pytest.fail(f"the probe processes did not finish in 120 s; their logs: {logs}")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "process 0/2: 2 local of 4 cpu devices, sum 6 (expected 6)" in result.stdout
  assert "process 1/2: 2 local of 4 cpu devices, sum 6 (expected 6)" in (
      tmp_path / "process_1.log").read_text()
