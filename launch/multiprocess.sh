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
# Output lines are prefixed with [pI]; the script fails if any process fails.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES MAIN_ARGS..." >&2
  exit 2
fi
num_processes="$1"
shift
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cf_ensure_env
cd "$REPO_ROOT"

port="${PORT:-12355}"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    export CLUSTERFORMER_DISTRIBUTED=1
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
    export CLUSTERFORMER_NUM_PROCESSES="$num_processes"
    export CLUSTERFORMER_PROCESS_ID="$i"
    if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
      first=$((i * GPUS_PER_PROCESS))
      export CUDA_VISIBLE_DEVICES="$(seq -s, "$first" $((first + GPUS_PER_PROCESS - 1)))"
    else
      export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
      export JAX_NUM_CPU_DEVICES="${CPU_DEVICES:-1}"
    fi
    exec "$PY" -m clusterformer_jax.main "$@" > >(sed -u "s/^/[p${i}] /") 2>&1
  ) &
  pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    cleanup
  fi
done
exit "$status"
