#!/usr/bin/env bash
# One entry point that sets itself up: creates .venv with python3.12 if missing, installs
# attn_jax and its pinned dependencies (requirements/constraints.txt) when they changed,
# then runs what was asked.
#
#   ./dev.sh train [flags]   the training binary (default: MQAR, experiments/configs/mqar.py)
#   ./dev.sh test [args]     the whole test suite (pytest, 8 virtual CPU devices)
#   ./dev.sh python ...      anything else inside the environment
#
# Environment: ATTN_JAX_VENV (default .venv), ATTN_JAX_CONSTRAINTS (default
# requirements/constraints.txt; "none" installs the newest versions setup.cfg allows).
set -euo pipefail
cd "$(dirname "$0")"

venv=${ATTN_JAX_VENV:-.venv}
constraints=${ATTN_JAX_CONSTRAINTS:-requirements/constraints.txt}

find_python() {
  local candidate
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
                   /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "dev.sh: no working python3.12 found; install Python 3.12 (JAX >= 0.11 needs it)" >&2
  exit 1
}

if [ ! -x "$venv/bin/python" ]; then
  echo "dev.sh: creating $venv" >&2
  "$(find_python)" -m venv "$venv"
fi

stamp="$venv/.attn_jax-installed"
want=$(cat setup.cfg pyproject.toml "$constraints" 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "dev.sh: installing attn_jax into $venv" >&2
  pin=()
  [ "$constraints" != none ] && pin=(-c "$constraints")
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${pin[@]}" -e '.[test,plot,notebook]'
  echo "$want" > "$stamp"
fi

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  train) exec "$venv/bin/python" -m experiments.train "$@" ;;
  test) exec "$venv/bin/python" -m pytest -n "${ATTN_JAX_TEST_WORKERS:-2}" -q "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
