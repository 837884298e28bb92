# Shared by the launch scripts (sourced, not run): quoting, --dry_run, logging, and the
# supervisor of local processes used by local.sh and gpu_multinode.sh.
#
# Every command a script would run goes through `run`: with DRY_RUN=1 it prints the
# command, one line a POSIX shell reads back as the same words, on stdout; otherwise it
# logs it to stderr and runs it. Nothing here deletes a file.

if [[ -z "${BASH_VERSINFO:-}" || "${BASH_VERSINFO[0]}" -lt 4 ||
      ( "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -lt 4 ) ]]; then
  echo "launch scripts need bash >= 4.4 (this is ${BASH_VERSION:-not bash}); on macOS use" \
       "Homebrew's bash or Cloud Shell." >&2
  exit 2
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
DRY_RUN=0

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

# The project's interpreter: $ATTN_JAX_VENV/bin/python, the environment ./dev.sh creates
# (default .venv; a relative path is the repository's, as dev.sh takes it, an absolute one
# stays as it is).
venv_python() {
  local venv=${ATTN_JAX_VENV:-.venv}
  [[ "$venv" == /* ]] || venv="$REPO_ROOT/$venv"
  echo "$venv/bin/python"
}
log() { echo "[$(basename "$0")] $*" >&2; }

# quote WORD...: the words as one line that a shell splits back into the same words.
quote() {
  local out=() word
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# run CMD...: prints CMD (dry run) or logs and runs it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    log "+ $(quote "$@")"
    "$@"
  fi
}

# note TEXT: a comment in the dry-run plan (and a log line otherwise); every line of TEXT
# stays a comment.
note() {
  local text="$*"
  if [[ "$DRY_RUN" == 1 ]]; then echo "# ${text//$'\n'/$'\n'# }"; else log "$text"; fi
}

# reject_control_characters ARG...: stops with an error naming the first argument that
# holds a control character (a newline in a flag value would end a comment line of the
# dry-run plan and run as a command when the plan is sourced).
reject_control_characters() {
  local arg
  for arg in "$@"; do
    if [[ "$arg" =~ [[:cntrl:]] ]]; then
      die "argument $(quote "${arg%%=*}") holds a control character (newline, tab, ...):" \
          "$(printf '%q' "$arg"). Pass it without one."
    fi
  done
}

# usage_from_header FILE: prints the comment block at the top of FILE (its --help).
usage_from_header() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# flag_value ARG: the value of `--name=value`.
flag_value() { echo "${1#*=}"; }

# free_port [PYTHON]: a TCP port of localhost that is free now (python3, else PYTHON).
free_port() {
  local python=python3
  command -v python3 > /dev/null || python=${1:?python3 not found}
  "$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])'
}

require_int() {  # NAME VALUE MIN
  [[ "$2" =~ ^[0-9]+$ ]] && (( $2 >= $3 )) ||
    die "--$1 must be an integer >= $3; got '$2'."
}

# ---- supervising the processes of this machine (local.sh, gpu_multinode.sh) ----------
#
# The caller defines `process_command I`, which sets the array PROCESS_CMD to process I's
# command (`env VAR=value ... python -m ...`), then calls `run_processes N LOG_DIR`.
# Process 0 streams to the terminal (and to LOG_DIR/process_0.log); the others write
# LOG_DIR/process_I.log. If one process fails, the others get SIGTERM (so they save a
# checkpoint if they can), then SIGKILL after GRACE_SECONDS. SIGINT/SIGTERM to this
# script are passed on the same way. Returns the first failing exit status, else 0.

GRACE_SECONDS=${GRACE_SECONDS:-60}
_PIDS=()

_stop_processes() {
  local pid waited=0 alive
  for pid in "${_PIDS[@]}"; do
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done
  while (( waited < GRACE_SECONDS )); do
    alive=0
    for pid in "${_PIDS[@]}"; do
      [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    (( alive )) || return 0
    sleep 1
    waited=$((waited + 1))
  done
  for pid in "${_PIDS[@]}"; do
    [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
  done
}

_on_signal() {
  log "signal received: sending SIGTERM to the processes (they checkpoint and stop)"
  _stop_processes
  exit 143
}

run_processes() {  # N LOG_DIR
  local n=$1 log_dir=$2 i status
  if [[ "$DRY_RUN" == 1 ]]; then
    for ((i = 0; i < n; i++)); do
      process_command "$i"
      if (( i == 0 )); then
        echo "$(quote "${PROCESS_CMD[@]}") 2>&1 | tee -a $(quote "$log_dir/process_0.log") &"
      else
        echo "$(quote "${PROCESS_CMD[@]}") > $(quote "$log_dir/process_$i.log") 2>&1 &"
      fi
    done
    echo "wait"
    return 0
  fi
  mkdir -p "$log_dir"
  trap _on_signal INT TERM
  _PIDS=()
  for ((i = 0; i < n; i++)); do
    process_command "$i"
    log "+ $(quote "${PROCESS_CMD[@]}")"
    if (( i == 0 )); then
      "${PROCESS_CMD[@]}" > >(tee -a "$log_dir/process_0.log") 2>&1 &
    else
      "${PROCESS_CMD[@]}" >> "$log_dir/process_$i.log" 2>&1 &
    fi
    _PIDS+=("$!")
  done
  log "$n process(es) started; logs in $log_dir"
  local remaining=$n
  while (( remaining > 0 )); do
    for i in "${!_PIDS[@]}"; do
      local pid=${_PIDS[$i]}
      [[ -z "$pid" ]] && continue
      kill -0 "$pid" 2>/dev/null && continue
      status=0
      wait "$pid" || status=$?
      _PIDS[$i]=""
      remaining=$((remaining - 1))
      if (( status != 0 )); then
        log "process $i exited with status $status; stopping the others. Its log:" \
            "$log_dir/process_$i.log"
        (( i == 0 )) || tail -n 30 "$log_dir/process_$i.log" >&2 || true
        _stop_processes
        trap - INT TERM
        return "$status"
      fi
    done
    (( remaining > 0 )) && sleep 1
  done
  trap - INT TERM
  log "all $n process(es) finished"
  return 0
}
