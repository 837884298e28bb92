"""A checkpoint with a truncated params file fails with one short error, not pages of noise.

Before: `attn_jax.load` printed ~22 "Event loop is closed" tracebacks (reads that orbax
abandoned when the first failed) and TensorStore's JSON specs with the message; resuming
training logged the same. Both run in a subprocess, as a user sees them: its stderr.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from attn_jax import train
from attn_jax.train import checkpoint
from tests.train.tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory):
  """A 4-step run whose only checkpoint (4) has its params data files cut in half."""
  base = tmp_path_factory.mktemp("noise")
  workdir = base / "run"
  train.train_and_evaluate(tiny_config(base / "data", num_steps=4), workdir)
  truncated = []
  for root, _, names in os.walk(workdir / "checkpoints" / "4" / "params"):
    if os.path.basename(root) == "d":
      for name in names:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)
        truncated.append(path)
  assert truncated, "no params data files (…/params/**/d/*) to truncate"
  return base, workdir


def _python(code, timeout=300):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                        text=True, timeout=timeout)


def _data_file(workdir):
  """A pattern for the quoted path of one of checkpoint 4's params data files."""
  return rf'"{re.escape(str(workdir))}/checkpoints/4/params/(\S+/)?d/[0-9a-f]+": '


def _assert_quiet(stderr):
  assert "Event loop is closed" not in stderr, stderr[-3000:]
  assert "tensorstore_spec" not in stderr and '"driver"' not in stderr, stderr[-3000:]


def test_load_says_which_step_and_file_in_one_line(truncated_run):
  _, workdir = truncated_run
  result = _python(f"import attn_jax; attn_jax.load({str(workdir)!r}, step=4)")
  assert result.returncode == 1
  _assert_quiet(result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) < 20, result.stderr
  error = lines[-1]
  assert error.startswith("attn_jax.train.checkpoint.CorruptCheckpoint: checkpoint 4 in ")
  assert "does not restore" in error and len(error) < 1000, error
  assert re.search(_data_file(workdir), error), error


def test_resume_names_the_damaged_checkpoint(truncated_run):
  """The resume's warning names the step and the file, and the checkpoint moves aside.
  (Not asserted here: silence. A read that the failed restore abandoned can still print
  its own traceback, depending on timing; seen once in a CI run, issue 17.)"""
  base, workdir = truncated_run
  resumed = base / "resumed"
  shutil.copytree(workdir, resumed)
  result = _python(f"""
      from attn_jax import train
      from tests.train.tiny import tiny_config
      train.train_and_evaluate(tiny_config({str(base / 'data')!r}, num_steps=4),
                               {str(resumed)!r})
      """)
  assert result.returncode == 0, result.stderr[-3000:]
  (warning,) = [l for l in result.stderr.splitlines() if "does not restore" in l]
  assert "checkpoint 4 in" in warning, warning
  assert re.search(_data_file(resumed), warning), warning
  assert os.listdir(resumed / "corrupt_checkpoints")


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
