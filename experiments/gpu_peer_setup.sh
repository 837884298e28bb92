#!/usr/bin/env bash
# Installs the benchmark peers (experiments/peers.py) on a GPU machine from the wheels in
# .whl/ (downloaded beside the repo: docs in /work/shared/PEERS.md) and points PYTHONPATH at
# them and at the xprof stand-in .whl/stub (tokamax imports xprof, which the image lacks).
# Source it from the repository root, then run a benchmark with --peers:
#
#   source experiments/gpu_peer_setup.sh && python3 -m experiments.bench_attention --peers=...
#
# (Run as a script, it prints the export line instead.) The GPU image lacks two of our
# own dependencies, so .whl/ carries them too (bench_training and the trainer need them):
#
#   pip download --no-deps ml_collections -d .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 pyyaml -d .whl
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .whl/*.whl || { echo "gpu_peer_setup.sh: installing .whl/*.whl failed" >&2; return 1 2>/dev/null || exit 1; }
line="export PYTHONPATH=$site:$PWD/.whl/stub${PYTHONPATH:+:$PYTHONPATH}"
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  eval "$line"
else
  echo "$line"
fi
