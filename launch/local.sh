#!/usr/bin/env bash
# Single-process run on this machine (all local devices):
#   launch/local.sh --config=configs/quickstart.py --workdir=runs/quickstart [--config.a.b=value ...]
#
# SIGTERM or Ctrl-C (SIGINT) finishes the step in flight, commits a checkpoint and exits with code 75;
# run the same command again to resume bit for bit. A second signal exits at once (128 + signal).
# CLUSTERFORMER_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [[ "${1:-}" == --help || "${1:-}" == -h ]]; then
  cf_usage "${BASH_SOURCE[0]}"
  exit 0
fi
cf_env
cd "$REPO_ROOT"
if cf_dry_run; then
  cf_print_command "$PY" -m clusterformer_jax.main "$@"
  exit 0
fi
exec "$PY" -m clusterformer_jax.main "$@"
