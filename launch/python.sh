#!/usr/bin/env bash
# Runs a Python script or module in the project venv with the launch environment (tcmalloc preloaded when
# the system has it, see _env.sh), e.g. the benchmarks:
#   launch/python.sh benchmarks/model_throughput.py --models clusterformer_tiny_official
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cf_ensure_env
cd "$REPO_ROOT"
exec "$PY" "$@"
