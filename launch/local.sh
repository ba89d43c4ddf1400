#!/usr/bin/env bash
# Single-process run on this machine (all local devices):
#   launch/local.sh --config=configs/quickstart.py --workdir=runs/quickstart [--config.a.b=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cf_ensure_env
cd "$REPO_ROOT"
exec "$PY" -m clusterformer_jax.main "$@"
