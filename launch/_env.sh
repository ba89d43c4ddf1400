# Sourced by the launch scripts. Defines REPO_ROOT and cf_ensure_env, which makes sure $REPO_ROOT/.venv
# (or $CLUSTERFORMER_VENV) exists and matches requirements.txt, then sets PY to its python.
#
# The venv counts as stale when the sha256 of requirements.txt (plus CLUSTERFORMER_JAX_EXTRA) differs from
# the one stored in .venv/.requirements.sha256 after the last successful install; it is then updated with
# `pip install -r requirements.txt`. CLUSTERFORMER_JAX_EXTRA=tpu|cuda12|cuda13 also installs jax[EXTRA] at
# the pinned jax version for accelerators. PYTHON selects the interpreter that creates the venv (python3).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

cf_requirements_hash() {
  "${PYTHON:-python3}" - "$REPO_ROOT/requirements.txt" "${CLUSTERFORMER_JAX_EXTRA:-}" <<'PYEOF'
import hashlib, sys
digest = hashlib.sha256(open(sys.argv[1], 'rb').read())
digest.update(('\nextra=' + sys.argv[2]).encode() if sys.argv[2] else b'')
print(digest.hexdigest())
PYEOF
}

cf_ensure_env() {
  local venv="${CLUSTERFORMER_VENV:-$REPO_ROOT/.venv}"
  local stamp="$venv/.requirements.sha256"
  local want have=""
  want="$(cf_requirements_hash)" || return 1
  [[ -f "$stamp" ]] && have="$(cat "$stamp")"
  if [[ ! -x "$venv/bin/python" || "$want" != "$have" ]]; then
    echo "[launch] setting up $venv from requirements.txt" >&2
    if [[ ! -x "$venv/bin/python" ]]; then
      "${PYTHON:-python3}" -m venv "$venv" || return 1
    fi
    rm -f "$stamp"
    "$venv/bin/python" -m pip install -r "$REPO_ROOT/requirements.txt" || return 1
    if [[ -n "${CLUSTERFORMER_JAX_EXTRA:-}" ]]; then
      local jax_version
      jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$REPO_ROOT/requirements.txt")"
      "$venv/bin/python" -m pip install "jax[${CLUSTERFORMER_JAX_EXTRA}]==${jax_version}" || return 1
    fi
    echo "$want" > "$stamp"
  fi
  PY="$venv/bin/python"
  export PY
}
