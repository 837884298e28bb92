"""Tests of the experiment binaries. Most run a binary in a subprocess (`run_python`):
their absl flags share names (dtype, heads, ...), so two cannot be imported into one
pytest process."""

import pathlib
import subprocess
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_python(*args: str) -> str:
  """`python *args` from the repository root; asserts it succeeds and returns stdout."""
  done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=_ROOT,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout
