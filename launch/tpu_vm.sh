#!/usr/bin/env bash
# Runs a binary on every worker of a Cloud TPU VM or pod slice, from your machine:
#   1. create the TPU VM (or reuse it if it exists and is READY),
#   2. copy this checkout's code to every worker (~/attn_jax; nothing there is deleted),
#   3. install it on every worker with the README's pinned set-up (./dev.sh, then
#      jax[tpu] at the version of requirements/constraints.txt),
#   4. start the binary on all workers at once with the same flags, detached (nohup), so
#      a dropped connection does not stop it,
#   5. stream worker 0's log here (Ctrl-C stops the stream, not the job).
#
#   launch/tpu_vm.sh --name=lm-v6e --zone=us-east5-b --accelerator_type=v6e-16 --spot -- \
#       --config=experiments/configs/lm_text.py --workdir=gs://my-bucket/runs/lm \
#       --config.data.data_dir=/tmp/attn_jax_data
#   launch/tpu_vm.sh --name=lm-v6e --zone=us-east5-b --logs     # follow worker 0 again
#   launch/tpu_vm.sh --name=lm-v6e --zone=us-east5-b --stop     # SIGTERM: save and stop
#
# Flags (before `--`; everything after `--` goes to the binary unchanged):
#   --name=NAME              the TPU VM (required)
#   --zone=ZONE              its zone (required), e.g. us-east5-b, europe-west4-a
#   --project=PROJECT        default: gcloud's configured project
#   --accelerator_type=TYPE  needed to create: v5litepod-8, v5litepod-16, v6e-8, v6e-16, …
#   --version=RUNTIME        TPU software version; default from the type (v6e:
#                            v2-alpha-tpuv6e, v5e: v2-alpha-tpuv5-lite, v5p:
#                            v2-alpha-tpuv5, v4: tpu-ubuntu2204-base)
#   --spot                   create a Spot TPU VM (cheaper; can be preempted)
#   --queued                 create through a queued resource (how v5e/v6e capacity is
#                            usually obtained) and wait until it is ACTIVE
#   --internal_ip            ssh/scp over internal IPs (running inside the VPC)
#   --binary=MODULE          the python module to run (default experiments.train, which
#                            also gets --distributed: jax.distributed.initialize() finds
#                            the pod's workers itself)
#   --env=VAR=VALUE          environment for the binary (repeatable), e.g.
#                            --env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true
#   --run_name=NAME          names the logs ~/attn_jax-logs/NAME-<time>.log and pid file
#                            (default: train)
#   --skip_create, --skip_sync, --skip_install, --no_stream   leave out a step
#   --logs                   only stream worker 0's newest log of --run_name
#   --stop                   only send SIGTERM to the binary this script started on every
#                            worker (the trainer saves a checkpoint and exits)
#   --dry_run                print every command instead of running it
#   --help                   this text
#
# It never deletes a TPU VM or a file: a preempted Spot VM is reported with the command
# to delete and recreate it, which is yours to run. Keep workdirs on gs:// (every worker
# must see the same workdir, and a VM's disk goes with it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
reject_control_characters "$@"

name=""
zone=""
project=""
accelerator_type=""
version=""
spot=0
queued=0
internal_ip=0
binary=experiments.train
run_name=train
env_vars=()
skip_create=0
skip_sync=0
skip_install=0
stream=1
action=all
binary_args=()

while (( $# )); do
  case "$1" in
    --name=*) name=$(flag_value "$1") ;;
    --zone=*) zone=$(flag_value "$1") ;;
    --project=*) project=$(flag_value "$1") ;;
    --accelerator_type=*) accelerator_type=$(flag_value "$1") ;;
    --version=*) version=$(flag_value "$1") ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --internal_ip) internal_ip=1 ;;
    --binary=*) binary=$(flag_value "$1") ;;
    --env=*=*) env_vars+=("$(flag_value "$1")") ;;
    --run_name=*) run_name=$(flag_value "$1") ;;
    --skip_create) skip_create=1 ;;
    --skip_sync) skip_sync=1 ;;
    --skip_install) skip_install=1 ;;
    --no_stream) stream=0 ;;
    --logs) action=logs ;;
    --stop) action=stop ;;
    --dry_run) DRY_RUN=1 ;;
    --help|-h) usage_from_header "$0"; exit 0 ;;
    --) shift; binary_args=("$@"); break ;;
    *) die "unknown flag '$1' (flags of the binary go after '--'; see --help)." ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name is required (the TPU VM's name)."
[[ -n "$zone" ]] || die "--zone is required (e.g. --zone=us-east5-b)."
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name must be lower-case letters, digits and '-', starting with a letter; got '$name'."
[[ "$run_name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run_name must be a plain name; got '$run_name'."
[[ "$binary" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--binary must be a python module; got '$binary'."

default_version() {  # ACCELERATOR_TYPE
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

gcloud_where=("--zone=$zone")
[[ -n "$project" ]] && gcloud_where+=("--project=$project")
ssh_flags=()
(( internal_ip )) && ssh_flags+=(--internal-ip)

logs_dir='~/attn_jax-logs'  # remote paths stay unexpanded here; the worker's shell expands ~
remote_code='~/attn_jax'
remote_tarball='attn_jax-code.tar.gz'

# on_workers WORKER COMMAND: runs the shell COMMAND on worker WORKER ("all" or an index).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_where[@]}" "${ssh_flags[@]}" \
    "--worker=$1" "--command=$2"
}

# ---- 1. create or reuse ----------------------------------------------------------------
describe_cmd() {
  if (( queued )); then
    DESCRIBE=(gcloud compute tpus queued-resources describe "$name" "${gcloud_where[@]}"
              "--format=value(state.state)")
  else
    DESCRIBE=(gcloud compute tpus tpu-vm describe "$name" "${gcloud_where[@]}"
              "--format=value(state)")
  fi
}

create_vm() {
  [[ -n "$accelerator_type" ]] ||
    die "TPU VM '$name' does not exist in $zone: give --accelerator_type to create it."
  [[ -n "$version" ]] || version=$(default_version "$accelerator_type") ||
    die "no default --version for --accelerator_type=$accelerator_type; give one."
  local extra=()
  (( spot )) && extra+=(--spot)
  if (( queued )); then
    run gcloud compute tpus queued-resources create "$name" "--node-id=$name" \
      "${gcloud_where[@]}" "--accelerator-type=$accelerator_type" \
      "--runtime-version=$version" "${extra[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" "${gcloud_where[@]}" \
      "--accelerator-type=$accelerator_type" "--version=$version" "${extra[@]}"
  fi
}

preempted_message() {  # STATE
  local kind="tpu-vm"
  (( queued )) && kind="queued-resources"
  [[ "$1" == STOPPED && "$kind" == tpu-vm ]] &&
    die "'$name' is STOPPED: start it (gcloud compute tpus tpu-vm start $name" \
        "${gcloud_where[*]}) and rerun this command."
  die "'$name' is $1. This script deletes nothing: if it was preempted, delete it" \
      "yourself (gcloud compute tpus $kind delete $name ${gcloud_where[*]}; its disk and" \
      "any local files go with it) and rerun this command, which creates a new one; the" \
      "binary resumes from the newest checkpoint of its workdir."
}

ensure_vm() {
  describe_cmd
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "${DESCRIBE[@]}"
    if [[ -z "$accelerator_type" ]]; then
      note "a dry run looks nothing up (the command above tells whether '$name' exists):" \
           "READY/ACTIVE: reuse it; not found: the real run stops and asks for" \
           "--accelerator_type to create it."
      return 0
    fi
    note "READY/ACTIVE: reuse it; not found: create it:"
    create_vm
    (( queued )) && note "then poll the describe command until the state is ACTIVE"
    return 0
  fi
  local state waited=0
  while :; do
    state=$("${DESCRIBE[@]}" 2>/dev/null) || state=""
    case "$state" in
      READY|ACTIVE)
        log "TPU VM '$name' is $state"; return 0 ;;
      "")
        (( waited == 0 )) || die "'$name' disappeared while waiting for it."
        log "TPU VM '$name' not found in $zone: creating it"
        create_vm ;;
      CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING|ACCEPTED|WAITING_FOR_RESOURCES)
        log "'$name' is $state; waiting (Ctrl-C leaves it to finish)" ;;
      *) preempted_message "$state" ;;
    esac
    waited=1
    sleep 20
  done
}

# ---- 2. copy the code ----------------------------------------------------------------
sync_code() {
  local tarball="${TMPDIR:-/tmp}/attn_jax-code-$name.tar.gz"
  run python3 "$LAUNCH_DIR/pack_code.py" "$tarball"
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$remote_tarball" \
    "${gcloud_where[@]}" "${ssh_flags[@]}" --worker=all
  on_workers all "mkdir -p $remote_code && tar -xzf ~/$remote_tarball -C $remote_code"
}

# ---- 3. install ----------------------------------------------------------------------
install_code() {
  local jax_version pip_extra=""
  jax_version=$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements/constraints.txt")
  [[ -n "$jax_version" ]] || die "no jax== pin in requirements/constraints.txt."
  # gs:// workdirs are read and written through fsspec's gcsfs (etils.epath, TFDS).
  [[ " ${binary_args[*]} " == *gs://* ]] && pip_extra=" gcsfs"
  on_workers all "set -e; cd $remote_code
if ! command -v python3.12 > /dev/null; then
  sudo apt-get update -q && sudo apt-get install -y -q software-properties-common
  sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q
  sudo apt-get install -y -q python3.12 python3.12-venv
fi
./dev.sh python -m pip install -q -c requirements/constraints.txt 'jax[tpu]==$jax_version'$pip_extra
.venv/bin/python -c 'import jax; print(\"jax\", jax.__version__, \"installed\")'"
}

# ---- 4. start on every worker ----------------------------------------------------------
start_binary() {
  local stamp args env_words
  stamp=$(date +%Y%m%d-%H%M%S)
  RUN_LOG="$logs_dir/$run_name-$stamp.log"
  args=("${binary_args[@]}")
  if [[ "$binary" == experiments.train && " ${args[*]} " != *" --distributed "* &&
        " ${args[*]} " != *--coordinator_address* ]]; then
    args=(--distributed "${args[@]}")
  fi
  env_words=$(quote PYTHONUNBUFFERED=1 "${env_vars[@]}")
  local pid_file="$logs_dir/$run_name.pid"
  on_workers all "cd $remote_code && mkdir -p $logs_dir
if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2> /dev/null; then
  echo \"\$(hostname): $run_name is still running (pid \$(cat $pid_file)); stop it with --stop\" >&2
  exit 1
fi
nohup env $env_words .venv/bin/python -m $binary $(quote "${args[@]}") >> $RUN_LOG 2>&1 < /dev/null &
echo \$! > $pid_file
ln -sfn $run_name-$stamp.log $logs_dir/$run_name.log
echo \"\$(hostname): started $binary, pid \$!, log $RUN_LOG\""
}

# ---- 5. follow worker 0 ----------------------------------------------------------------
stream_logs() {  # LOG
  note "streaming worker 0's $1; Ctrl-C stops the stream, not the job (--stop does)"
  on_workers 0 "tail -n +1 -F --pid=\"\$(cat $logs_dir/$run_name.pid)\" $1"
}

stop_binary() {
  local pid_file="$logs_dir/$run_name.pid"
  on_workers all "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2> /dev/null; then
  kill -TERM \"\$(cat $pid_file)\" && echo \"\$(hostname): sent SIGTERM to $run_name\"
else
  echo \"\$(hostname): $run_name is not running\"
fi"
}

case "$action" in
  logs) stream_logs "$logs_dir/$run_name.log" ;;
  stop) stop_binary ;;
  all)
    (( skip_create )) || ensure_vm
    (( skip_sync )) || sync_code
    (( skip_install )) || install_code
    start_binary
    if (( stream )); then stream_logs "$RUN_LOG"; fi
    ;;
esac
