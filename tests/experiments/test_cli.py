"""The console scripts (setup.cfg) and the commands the docs show."""

import ast
import configparser
import re
import subprocess
import sys

import pytest

from tests.experiments import _ROOT


def _console_scripts():
  config = configparser.ConfigParser()
  config.read(_ROOT / "setup.cfg")
  lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
  return [tuple(part.strip() for part in line.split("=")) for line in lines]


@pytest.mark.parametrize("name, target", _console_scripts())
def test_console_script_help_lists_its_flags(name, target):
  """`--help` under the script's own name (as its generated wrapper runs it) shows the
  module's docstring and every flag the module defines."""
  module, function = target.split(":")
  code = (f"import sys; from absl import flags; import {module} as m; "
          f"print(' '.join(f.name for f in flags.FLAGS.get_flags_for_module(m.__name__))); "
          f"sys.argv = [{name!r}, '--help']; m.{function}()")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=_ROOT, timeout=300, check=False)
  assert done.returncode == 1, done.stderr[-2000:]  # absl's --help exits with 1
  names, _, help_text = done.stdout.partition("\n")
  assert names.split(), f"{module} defines no flags"
  for flag in names.split():
    assert re.search(rf"--(\[no\])?{flag}:", help_text), f"--{flag} missing:\n{help_text}"
  source = (_ROOT / (module.replace(".", "/") + ".py")).read_text()
  assert ast.get_docstring(ast.parse(source)).splitlines()[0] in help_text


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md"])
def test_docs_run_binaries_through_dev_sh(doc):
  """A bare `python -m experiments.X` fails outside the virtual environment."""
  text = (_ROOT / doc).read_text()
  assert "python -m experiments." in text
  assert not re.findall(r"(?<!\./dev\.sh )python -m experiments\.\w+", text)
