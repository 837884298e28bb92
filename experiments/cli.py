"""`run(main, module_name)`: `app.run` for the binaries that are also console scripts."""

from __future__ import annotations

import sys

from absl import app, flags


def run(main, module_name: str) -> None:
  """`app.run(main)`, with `--help` showing the usage and flags of `module_name`.

  absl's `--help` lists the flags of the module named by `sys.argv[0]` and prints the
  `__main__` module's docstring. Under a console script (`attn-jax-train`, see setup.cfg)
  that is the generated wrapper, which defines no flags and has no docstring, so the
  flags of `module_name` are declared key flags of the wrapper and its docstring lent.
  Under `python -m module_name` this changes nothing.
  """
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:
    main_module.__doc__ = sys.modules[module_name].__doc__
  app.run(main)
