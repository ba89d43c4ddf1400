#!/usr/bin/env bash
# Runs the test suite in the project venv (created or updated first); extra arguments go to pytest:
#   launch/test.sh -k trainer
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cf_ensure_env
cd "$REPO_ROOT"
exec "$PY" -m pytest -q tests "$@"
