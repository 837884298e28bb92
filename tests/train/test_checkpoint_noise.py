"""A checkpoint with a truncated params file fails with one short error, not pages of noise.

Before: `attn_jax.load` printed ~22 "Event loop is closed" tracebacks (reads that orbax
abandoned when the first failed) and TensorStore's JSON specs with the message; resuming
training logged the same; a truncated chunk file was described as "Encountered error while
reading array index ... <bound method ... spec of TensorStore({", and
`experiments.evaluate` printed the whole traceback with the spec. Each runs in a
subprocess, as a user sees it: its stderr.
"""

import asyncio
import contextlib
import gc
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from orbax.checkpoint._src import asyncio_utils

from attn_jax import train
from attn_jax.train import checkpoint, config_check
from tests.train.tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
DAMAGED = 8  # the newest checkpoint; 4 is the previous one


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """An 8-step run with checkpoints 4 and 8, and its config. d_model 64: arrays this size
  get data files of their own, as a real model's do (at d_model 32 TensorStore keeps the
  chunks with the metadata)."""
  base = tmp_path_factory.mktemp("noise")
  config = tiny_config(base / "data", num_steps=8)
  config.model.update(d_model=64, mlp_dim=128)
  train.train_and_evaluate(config, base / "run")
  return base, base / "run", config


def _params_files(workdir):
  """The damaged checkpoint's params data files (…/params/**/d/*)."""
  return [os.path.join(root, name)
          for root, _, names in os.walk(workdir / "checkpoints" / str(DAMAGED) / "params")
          if os.path.basename(root) == "d" for name in names]


def _damaged_copy(tiny_run, name, choose):
  """A copy of the run in which the files `choose` picks of `_params_files` are cut in
  half."""
  base, run, _ = tiny_run
  workdir = base / name
  shutil.copytree(run, workdir)
  files = choose(_params_files(workdir))
  assert files, "no params data files (…/params/**/d/*) to truncate"
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)
  return workdir


@pytest.fixture(scope="module")
def truncated_run(tiny_run):
  """Every params data file of checkpoint 8 cut in half: the arrays' metadata is gone."""
  return _damaged_copy(tiny_run, "truncated", lambda files: files)


@pytest.fixture(scope="module")
def chunk_truncated_run(tiny_run):
  """Checkpoint 8's largest params data file (array chunks) cut in half: the metadata
  reads, the chunks' reads fail."""
  return _damaged_copy(tiny_run, "chunk_truncated",
                       lambda files: [max(files, key=os.path.getsize)])


def _run(args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                        text=True, timeout=timeout)


def _python(code, timeout=300):
  return _run(["-c", textwrap.dedent(code)], timeout)


def _params_dir(workdir):
  return re.escape(f'"{workdir}/checkpoints/{DAMAGED}/params/')


def _assert_quiet(stderr):
  for noise in ("Event loop is closed", "Exception ignored", "Task was destroyed",
                "tensorstore_spec", '"driver"', "'driver'", "See full TensorStore details"):
    assert noise not in stderr, stderr[-3000:]


def _load_error(workdir):
  """The last stderr line of `attn_jax.load` of the damaged step, checked to be alone."""
  result = _python(f"import attn_jax; attn_jax.load({str(workdir)!r}, step={DAMAGED})")
  assert result.returncode == 1
  _assert_quiet(result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) < 20, result.stderr
  return lines[-1]


def test_load_says_which_step_and_file_in_one_line(truncated_run):
  workdir = truncated_run
  error = _load_error(workdir)
  assert error.startswith("attn_jax.train.checkpoint.CorruptCheckpoint: checkpoint "
                          f"{DAMAGED} in {workdir}/checkpoints does not restore: "), error
  assert len(error) < 1000, error
  assert re.search(_params_dir(workdir) + r'(\S+/)?d/[0-9a-f]+": ', error), error


def test_a_truncated_chunk_is_described_by_what_is_wrong(chunk_truncated_run):
  """orbax wraps a failed chunk read in an error that gives only the array index and the
  spec; the message gives the error it wraps: the array, the item's folder, the damage."""
  workdir = chunk_truncated_run
  error = _load_error(workdir)
  assert error.startswith("attn_jax.train.checkpoint.CorruptCheckpoint: checkpoint "
                          f"{DAMAGED} in {workdir}/checkpoints does not restore: "
                          'ValueError: OUT_OF_RANGE: Error reading "'), error
  assert re.search(r'Error reading "[\w.]+/[0-9.]+" in OCDBT database at local file '
                   + _params_dir(workdir) + '": '
                   r"Requested byte range \[\d+, \d+\) is not valid for value of size \d+$",
                   error), error


def test_evaluate_says_which_step_and_what_is_wrong_in_one_line(chunk_truncated_run):
  workdir = chunk_truncated_run
  result = _run(["-m", "experiments.evaluate", f"--workdir={workdir}"])
  assert result.returncode == 1, result.stderr[-3000:]
  _assert_quiet(result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) < 10, result.stderr
  assert lines[-1].startswith(f"error: checkpoint {DAMAGED} in {workdir}/checkpoints does "
                              "not restore: ValueError: OUT_OF_RANGE: "), lines[-1]
  assert "is not valid for value of size" in lines[-1], lines[-1]
  assert lines[-1].endswith("(other checkpoints: [4])"), lines[-1]


def test_resume_names_the_damaged_checkpoint_and_falls_back(tiny_run, chunk_truncated_run):
  """The warning names the step and the damage, the checkpoint moves aside, training
  resumes from the previous one and says so, and no abandoned read reports anything."""
  base, _, config = tiny_run
  resumed = base / "resumed"
  shutil.copytree(chunk_truncated_run, resumed)
  result = _python(f"""
      from attn_jax import train
      from attn_jax.train import config_check
      train.train_and_evaluate(config_check.from_json({config_check.to_json(config)!r}),
                               {str(resumed)!r})
      """)
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_quiet(result.stderr)
  (warning,) = [l for l in result.stderr.splitlines() if "does not restore" in l]
  assert (f"checkpoint {DAMAGED} in {resumed}/checkpoints does not restore (ValueError: "
          in warning), warning
  assert "is not valid for value of size" in warning, warning
  assert "moving it to corrupt_checkpoints/ and trying the previous one" in warning
  assert os.listdir(resumed / "corrupt_checkpoints")
  assert "resuming from the checkpoint of step 4" in result.stdout, result.stdout


def test_reads_a_failed_restore_abandons_finish_before_their_loop_closes(monkeypatch):
  """The mechanism, without timing luck: orbax's `run_sync` closes its event loop as
  soon as one read fails. Without `_settle_abandoned_reads` the reads still running
  complete on the closed loop ("Event loop is closed") and their coroutines, closed by the
  garbage collector, raise again; with it they finish first and nothing is reported."""

  async def read(delay, fail):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    # Completed from another thread, as TensorStore completes its reads.
    threading.Timer(delay, loop.call_soon_threadsafe, (done.set_result, None)).start()
    try:
      await done
    except BaseException as e:  # as orbax's _read_array_index_and_device_put does
      raise Exception("read failed") from e  # pylint: disable=broad-exception-raised
    if fail:
      raise ValueError("truncated")

  async def restore():
    await asyncio.gather(read(0.0, True), *(read(0.3, False) for _ in range(4)))

  def reports(settle):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    monkeypatch.setattr(threading, "excepthook", lambda a: seen.append(str(a.exc_value)))
    with checkpoint._settle_abandoned_reads() if settle else contextlib.nullcontext():
      with pytest.raises(ValueError, match="truncated"):
        asyncio_utils.run_sync(restore())
    time.sleep(0.6)
    gc.collect()
    return seen

  assert "Event loop is closed" in reports(settle=False)  # what this test would catch
  assert reports(settle=True) == []
  assert isinstance(asyncio.get_event_loop_policy(), asyncio.DefaultEventLoopPolicy)


def test_describe_error_cuts_tensorstore_specs():
  spec = "{\"driver\":\"zarr\",\"kvstore\":{\"path\":\"/w/checkpoints/4/params/\"}}" * 40
  e = ValueError(
      'OUT_OF_RANGE: Error opening "cast" driver: Error opening "zarr" driver: Error '
      'reading "w/.zarray" in OCDBT database at local file "/w/checkpoints/4/params/": '
      'Error reading Byte range [0, 9) of local file "/w/checkpoints/4/params/d/ab": '
      f"Requested byte range [0, 9) is not valid for value of size 4 [tensorstore_spec[1]="
      f"'{spec}'] [tensorstore_spec='{spec}']")
  assert checkpoint.describe_error(e) == (
      'ValueError: OUT_OF_RANGE: Error reading "w/.zarray" in OCDBT database at local file '
      '"/w/checkpoints/4/params/": Error reading Byte range [0, 9) of local file '
      '"/w/checkpoints/4/params/d/ab": Requested byte range [0, 9) is not valid for value '
      "of size 4")
  assert checkpoint.describe_error(KeyError()) == "KeyError: "
  assert checkpoint.describe_error(OSError("x" * 5000)).endswith("x ...")


def test_describe_error_gives_the_read_error_orbax_wraps():
  cause = ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database at local file '
                     '"/w/checkpoints/4/params/": Requested byte range [0, 9) is not valid '
                     "for value of size 4")
  try:
    try:
      raise cause
    except ValueError as e:
      raise Exception(  # pylint: disable=broad-exception-raised
          "Encountered error while reading array index: (slice(0, 2, 1),). See full "
          "TensorStore details: <bound method spec of TensorStore({\n  'driver': 'cast',\n"
          "})>.") from e
  except Exception as wrapped:  # pylint: disable=broad-except
    assert checkpoint.describe_error(wrapped) == f"ValueError: {cause}"
  assert checkpoint.describe_error(RuntimeError("x")) == "RuntimeError: x"
