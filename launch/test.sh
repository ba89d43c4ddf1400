#!/usr/bin/env bash
# Runs the formatter check, then the whole test suite (slow tests included), in the project venv (created or
# updated first). Test files are spread over TEST_WORKERS pytest-xdist processes (default 2: the suite is
# dominated by single-threaded XLA compilation; files with costly module fixtures stay on one worker; work
# units start in collection order, which tests/conftest.py sorts costliest first); extra arguments go to pytest:
#   launch/test.sh -k trainer          launch/test.sh -m 'not slow'          TEST_WORKERS=0 launch/test.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cf_ensure_env
cf_ensure_libtpu  # tests/test_aot.py cross-compiles the quickstart for a TPU slice
cf_ensure_cuda_aot  # ... and for a node of 8 H100s
cd "$REPO_ROOT"
if ! "$PY" -m black --check --quiet .; then
  echo "[test] files above are not formatted; run: .venv/bin/python -m black ." >&2
  exit 1
fi
# One persistent XLA cache for the run (tests/conftest.py): what one test or subprocess compiled, others read.
CF_TEST_XLA_CACHE="$(mktemp -d)"
export CF_TEST_XLA_CACHE
trap 'rm -rf "$CF_TEST_XLA_CACHE"' EXIT
"$PY" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder --durations=25 tests "$@"
