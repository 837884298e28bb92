"""Packs this checkout's code into a .tar.gz for copying to remote machines (tpu_vm.sh).

    python3 launch/pack_code.py OUT.tar.gz

In a git checkout it packs what git would commit: tracked files and untracked files that
.gitignore does not exclude (so not .venv, workdirs/ or build outputs), as they are on
disk now, uncommitted edits included. Elsewhere (an unpacked archive) it packs the tree
without .git, virtual environments, workdirs/ and caches. Standard library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_DIRS = {".git", "workdirs", "__pycache__", ".pytest_cache", ".hypothesis", "build",
              "dist"}


def code_files(root: str = ROOT) -> list[str]:
  """Paths (relative to `root`, sorted) of the files to copy."""
  try:
    listed = subprocess.run(
        ["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True).stdout.decode().split("\0")
  except (OSError, subprocess.CalledProcessError):
    listed = []
    for directory, dirs, files in os.walk(root):
      dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".venv")
                       and not d.endswith(".egg-info"))
      listed += [os.path.relpath(os.path.join(directory, f), root) for f in files]
  # Files deleted in the working tree are still listed by git until committed.
  return sorted({p for p in listed if p and os.path.isfile(os.path.join(root, p))})


def main(argv: list[str]) -> int:
  if len(argv) != 2 or not argv[1].endswith(".tar.gz"):
    print("usage: python3 launch/pack_code.py OUT.tar.gz", file=sys.stderr)
    return 2
  files = code_files()
  with tarfile.open(argv[1], "w:gz") as tar:
    for path in files:
      tar.add(os.path.join(ROOT, path), arcname=path, recursive=False)
  print(f"packed {len(files)} files of {ROOT} into {argv[1]}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
