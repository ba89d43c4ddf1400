#!/usr/bin/env bash
# N cooperating processes on this host through jax.distributed (coordinator 127.0.0.1:PORT): a local
# rehearsal of a multi-host job, or one process per GPU.
#
#   launch/multiprocess.sh NUM_PROCESSES --config=configs/quickstart.py --workdir=runs/mp [--config...]
#
# Environment:
#   PORT                 coordinator port (default 12355)
#   CPU_DEVICES          virtual CPU devices per process (sets JAX_NUM_CPU_DEVICES; default 1 when no GPU
#                        split is requested)
#   GPUS_PER_PROCESS     give process i the GPUs [i*G, (i+1)*G) through CUDA_VISIBLE_DEVICES
#   CLUSTERFORMER_DRY_RUN=1  print each process's environment and command instead of running them
# Output lines are prefixed with [pI]. SIGTERM/SIGINT to this script is passed to every process: they stop
# at one common step, commit its checkpoint and exit 75, and so does the script; rerun it to resume. A
# second signal stops them at once. Exit code: 0 when all succeed, 75 when all stopped that way, else the
# first other failure (the remaining processes are then stopped).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [[ "${1:-}" == --help || "${1:-}" == -h ]]; then
  cf_usage "${BASH_SOURCE[0]}"
  exit 0
fi
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES MAIN_ARGS... (--help for more)" >&2
  exit 2
fi
num_processes="$1"
shift
cf_env
cd "$REPO_ROOT"

port="${PORT:-12355}"
process_env() {  # the environment of process $1, as NAME=value words
  local words=(CLUSTERFORMER_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=127.0.0.1:${port}"
    "CLUSTERFORMER_NUM_PROCESSES=$num_processes" "CLUSTERFORMER_PROCESS_ID=$1")
  if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
    local first=$(($1 * GPUS_PER_PROCESS))
    words+=("CUDA_VISIBLE_DEVICES=$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))")
  else
    words+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}" "JAX_NUM_CPU_DEVICES=${CPU_DEVICES:-1}")
  fi
  printf '%s\n' "${words[@]}"
}

if cf_dry_run; then
  for ((i = 0; i < num_processes; i++)); do
    mapfile -t words < <(process_env "$i")
    cf_print_command env "${words[@]}" "$PY" -m clusterformer_jax.main "$@"
  done
  exit 0
fi

pids=()
forward() {  # pass a signal on to every process that still runs
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < num_processes; i++)); do
  mapfile -t words < <(process_env "$i")
  (
    export "${words[@]}"
    # the prefixing sed ignores the signals, so that a stopping process can still write its last lines
    exec "$PY" -m clusterformer_jax.main "$@" > >(trap '' INT TERM; exec sed -u "s/^/[p${i}] /") 2>&1
  ) &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait until the process is gone, then read its code
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  code=0
  wait "$pid" || code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    [[ $code -ne $CF_EXIT_PREEMPTED ]] && forward TERM
  elif [[ $code -ne 0 && $code -ne $CF_EXIT_PREEMPTED && $status -eq $CF_EXIT_PREEMPTED ]]; then
    status=$code
  fi
done
exit "$status"
