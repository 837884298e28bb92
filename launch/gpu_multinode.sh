#!/usr/bin/env bash
# Starts this node's processes of a multi-node GPU job: one per GPU (default) or one per
# node, all joined by jax.distributed.initialize(coordinator_address, num_processes,
# process_id). Run it once on every node: by hand, with pdsh, or under SLURM
# (launch/slurm_gpu.sbatch). On a single 8-GPU node you need none of this:
# `./dev.sh train ...` is one process that drives all 8 GPUs.
#
#   # on node 0 (10.0.0.1) and, with --node_rank=1, on node 1:
#   launch/gpu_multinode.sh --coordinator=10.0.0.1:12345 --num_nodes=2 --node_rank=0 -- \
#       --config=experiments/configs/lm_text.py --workdir=/shared/runs/lm
#   # inside a SLURM allocation, one task per node:
#   srun --ntasks-per-node=1 launch/gpu_multinode.sh --slurm -- --workdir=/shared/runs/lm
#
# Flags (before `--`; everything after `--` goes to the binary unchanged):
#   --coordinator=HOST:PORT  process 0's node and a free port; the same on every node
#                            (default with one node: localhost and a free port)
#   --num_nodes=N            nodes in the job (default 1)
#   --node_rank=R            this node's index, 0 … N-1 (node 0 hosts the coordinator)
#   --slurm                  N, R and the coordinator from SLURM's environment: the
#                            job's first node, port 10000 + job id % 50000 (or --port)
#   --port=P                 the coordinator port with --slurm or one node
#   --gpus_per_node=G        default: the GPUs in CUDA_VISIBLE_DEVICES, else nvidia-smi's
#   --mode=per_gpu|per_host  per_gpu (default): G processes per node, process R·G + i
#                            sees only GPU i (CUDA_VISIBLE_DEVICES); per_host: one
#                            process per node that drives all its GPUs
#   --binary=MODULE          the python module to run (default experiments.train)
#   --python=PATH            the interpreter (default $ATTN_JAX_VENV/bin/python: .venv if
#                            unset, relative to <repo> unless absolute)
#   --log_dir=DIR            this node's per-process logs (default /tmp/attn_jax-gpu-<id>)
#   --dry_run                print the commands instead of running them
#   --help                   this text
#
# NCCL settings, exported to every process unless already set in the environment
# (docs/launch.md says when to change them):
#   NCCL_DEBUG=WARN           INFO prints the topology, rings and transports chosen
#   NCCL_NVLS_ENABLE=0        NVLink SHARP (multicast) off; 1 turns it on where the
#                             cluster allows it (NVSwitch nodes: faster all-reduce)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE, NCCL_CROSS_NIC, NCCL_NET_GDR_LEVEL
#                             not set: NCCL detects the network; set them when it picks
#                             the wrong interface (e.g. NCCL_SOCKET_IFNAME=eth0) or
#                             there is no InfiniBand (NCCL_IB_DISABLE=1)
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75 of each GPU) and XLA_FLAGS pass through.
#
# If one process fails, this node's others get SIGTERM (they checkpoint if they can) and
# SIGKILL after $GRACE_SECONDS (default 60); SIGTERM to this script (SLURM preemption,
# scancel) is passed on the same way. Exit status: the first failure's, else 0.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
reject_control_characters "$@"

coordinator=""
num_nodes=1
node_rank=0
use_slurm=0
port=""
gpus_per_node=""
mode=per_gpu
binary=experiments.train
python=$(venv_python)
log_dir=""
binary_args=()

while (( $# )); do
  case "$1" in
    --coordinator=*) coordinator=$(flag_value "$1") ;;
    --num_nodes=*) num_nodes=$(flag_value "$1") ;;
    --node_rank=*) node_rank=$(flag_value "$1") ;;
    --slurm) use_slurm=1 ;;
    --port=*) port=$(flag_value "$1") ;;
    --gpus_per_node=*) gpus_per_node=$(flag_value "$1") ;;
    --mode=*) mode=$(flag_value "$1") ;;
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

# first_slurm_host NODELIST: the first host of a SLURM node list ("gpu-[03-04,07],b1" →
# gpu-03), by scontrol where there is one.
first_slurm_host() {
  if command -v scontrol > /dev/null; then
    scontrol show hostnames "$1" | head -n 1
  elif [[ "$1" =~ ^([^,\[]+)(\[([0-9]+))? ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[3]}"
  else
    die "cannot read the first host of SLURM_JOB_NODELIST='$1'."
  fi
}

if (( use_slurm )); then
  [[ -n "${SLURM_JOB_ID:-}" ]] || die "--slurm outside a SLURM job (no SLURM_JOB_ID)."
  num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
  node_rank=${SLURM_NODEID:-}
  [[ -n "$num_nodes" && -n "$node_rank" ]] ||
    die "--slurm needs SLURM_JOB_NUM_NODES and SLURM_NODEID (run it with srun)."
  if [[ -n "${SLURM_NTASKS:-}" && "$SLURM_NTASKS" != "$num_nodes" ]]; then
    die "--slurm starts the processes of a node itself: run one task per node" \
        "(srun --ntasks-per-node=1); this step has SLURM_NTASKS=$SLURM_NTASKS for" \
        "$num_nodes node(s)."
  fi
  [[ -z "$coordinator" ]] || die "give either --slurm or --coordinator, not both."
  coordinator="$(first_slurm_host "${SLURM_JOB_NODELIST:?}"):${port:-$((10000 + SLURM_JOB_ID % 50000))}"
fi

require_int num_nodes "$num_nodes" 1
require_int node_rank "$node_rank" 0
if [[ -z "$coordinator" && "$num_nodes" == 1 ]]; then
  coordinator="localhost:${port:-$(free_port "$python")}"
fi
(( node_rank < num_nodes )) || die "--node_rank=$node_rank must be < --num_nodes=$num_nodes."
[[ "$coordinator" =~ ^[^:]+:[0-9]+$ || "$coordinator" =~ ^\[.*\]:[0-9]+$ ]] ||
  die "--coordinator must be HOST:PORT (process 0's node); got '$coordinator'."
case "$mode" in per_gpu|per_host) ;; *) die "--mode must be per_gpu or per_host; got '$mode'." ;; esac

# The GPUs this node may use: CUDA_VISIBLE_DEVICES (SLURM sets it) or all of nvidia-smi's.
visible=()
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi > /dev/null; then
  for ((i = 0; i < $(nvidia-smi -L | grep -c '^GPU'); i++)); do visible+=("$i"); done
fi
if [[ -z "$gpus_per_node" ]]; then
  if (( ${#visible[@]} )); then
    gpus_per_node=${#visible[@]}
  elif [[ "$DRY_RUN" == 1 ]]; then
    gpus_per_node=8
    note "no GPUs visible here: planning for --gpus_per_node=8"
  else
    die "found no GPUs (no CUDA_VISIBLE_DEVICES, no nvidia-smi); give --gpus_per_node."
  fi
fi
require_int gpus_per_node "$gpus_per_node" 1
(( ${#visible[@]} )) || for ((i = 0; i < gpus_per_node; i++)); do visible+=("$i"); done
(( gpus_per_node <= ${#visible[@]} )) ||
  die "--gpus_per_node=$gpus_per_node but only ${#visible[@]} GPU(s) visible" \
      "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})."
[[ "$DRY_RUN" == 1 || -x "$python" ]] ||
  die "--python=$python is not an executable; on every node run" \
      "./dev.sh python -m pip install -c requirements/constraints.txt -e '.[gpu]'."

if [[ "$mode" == per_gpu ]]; then
  local_processes=$gpus_per_node
else
  local_processes=1
fi
num_processes=$((num_nodes * local_processes))
log_dir=${log_dir:-/tmp/attn_jax-gpu-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}-node$node_rank}

nccl_env=("NCCL_DEBUG=${NCCL_DEBUG:-WARN}" "NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}")
for var in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_CROSS_NIC NCCL_NET_GDR_LEVEL \
           XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS; do
  [[ -n "${!var:-}" ]] && nccl_env+=("$var=${!var}")
done

process_command() {  # I (this node's process index)
  local gpus
  if [[ "$mode" == per_gpu ]]; then
    gpus=${visible[$1]}
  else
    gpus=$(IFS=,; echo "${visible[*]:0:$gpus_per_node}")
  fi
  PROCESS_CMD=(env "CUDA_VISIBLE_DEVICES=$gpus" "${nccl_env[@]}"
               "PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
               "$python" -m "$binary"
               "--coordinator_address=$coordinator" "--num_processes=$num_processes"
               "--process_id=$((node_rank * local_processes + $1))" "${binary_args[@]}")
}

note "node $node_rank of $num_nodes: $local_processes process(es) ($mode, $gpus_per_node" \
     "GPU(s)), $num_processes in all, coordinator $coordinator, logs in $log_dir"
run_processes "$local_processes" "$log_dir"
