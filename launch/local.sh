#!/usr/bin/env bash
# Runs N processes of a binary on this machine's CPU, joined by jax.distributed on
# localhost: the multi-process code path of a TPU pod slice or a GPU cluster (sharded
# data loading, cross-process collectives, one checkpoint written by all processes),
# without the hardware.
#
#   launch/local.sh --num_processes=2 -- --workdir=/tmp/mp --config.train.num_steps=20
#   launch/local.sh --num_processes=2 --devices_per_process=4 -- \
#       --workdir=/tmp/mp8 --config.mesh.fsdp=2 --config.mesh.tensor=2
#
# Flags (before `--`; everything after `--` goes to the binary unchanged):
#   --num_processes=N        processes (default 2)
#   --devices_per_process=D  virtual CPU devices per process (default 1), by XLA_FLAGS
#   --port=P                 coordinator port on localhost (default: a free port)
#   --binary=MODULE          the python module to run (default experiments.train)
#   --python=PATH            the interpreter (default: $ATTN_JAX_VENV/bin/python, the
#                            venv relative to <repo> unless absolute, .venv if unset;
#                            ./dev.sh creates it)
#   --log_dir=DIR            where the per-process logs go (default: a new directory
#                            /tmp/attn_jax-local-<time>); logs are appended, never removed
#   --dry_run                print the commands instead of running them
#   --help                   this text
#
# Process I runs `python -m MODULE --coordinator_address=localhost:P
# --num_processes=N --process_id=I ARGS...`, which experiments/train.py passes to
# jax.distributed.initialize(). Process 0 streams its output here; the others write to
# --log_dir. If one fails the others are stopped (SIGTERM, then SIGKILL after
# $GRACE_SECONDS, default 60). The exit status is the first failure's, else 0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
reject_control_characters "$@"

num_processes=2
devices_per_process=1
port=""
binary=experiments.train
python=$(venv_python)
log_dir=""
binary_args=()

while (( $# )); do
  case "$1" in
    --num_processes=*) num_processes=$(flag_value "$1") ;;
    --devices_per_process=*) devices_per_process=$(flag_value "$1") ;;
    --port=*) port=$(flag_value "$1") ;;
    --binary=*) binary=$(flag_value "$1") ;;
    --python=*) python=$(flag_value "$1") ;;
    --log_dir=*) log_dir=$(flag_value "$1") ;;
    --dry_run) DRY_RUN=1 ;;
    --help|-h) usage_from_header "$0"; exit 0 ;;
    --) shift; binary_args=("$@"); break ;;
    *) die "unknown flag '$1' (flags of the binary go after '--'; see --help)." ;;
  esac
  shift
done

require_int num_processes "$num_processes" 1
require_int devices_per_process "$devices_per_process" 1
if [[ -z "$port" ]]; then
  port=$(free_port "$python")
fi
require_int port "$port" 1
[[ "$DRY_RUN" == 1 || -x "$python" ]] ||
  die "--python=$python is not an executable; run ./dev.sh python -c '' to create .venv."
log_dir=${log_dir:-/tmp/attn_jax-local-$(date +%Y%m%d-%H%M%S)-$$}

process_command() {  # I
  PROCESS_CMD=(env JAX_PLATFORMS=cpu
               "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
               "PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
               "$python" -m "$binary"
               "--coordinator_address=localhost:$port" "--num_processes=$num_processes"
               "--process_id=$1" "${binary_args[@]}")
}

note "$num_processes process(es) x $devices_per_process CPU device(s), coordinator" \
     "localhost:$port, logs in $log_dir"
run_processes "$num_processes" "$log_dir"
