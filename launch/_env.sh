# Sourced by the launch scripts. Defines REPO_ROOT and cf_ensure_env, which makes sure $REPO_ROOT/.venv
# (or $CLUSTERFORMER_VENV) exists and matches requirements.txt, then sets PY to its python.
#
# The venv counts as stale when the sha256 of requirements.txt (plus CLUSTERFORMER_JAX_EXTRA) differs from
# the one stored in .venv/.requirements.sha256 after the last successful install; it is then updated with
# `pip install -r requirements.txt`. CLUSTERFORMER_JAX_EXTRA=tpu|cuda12|cuda13 also installs jax[EXTRA] at
# the pinned jax version for accelerators. PYTHON selects the interpreter that creates the venv (python3).
#
# cf_ensure_env also preloads tcmalloc when the system has it (Debian/Ubuntu: apt-get install
# libtcmalloc-minimal4). XLA on CPU allocates and frees buffers of tens of MB every step; glibc hands them
# back to the kernel and page-faults them in again, which cost ClusterFormer-T's CPU train step about a fifth
# of its time (benchmarks/RESULTS.md). CLUSTERFORMER_TCMALLOC=0 turns this off, =/path/lib.so picks the library.

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
  cf_preload_tcmalloc
}

cf_preload_tcmalloc() {
  local lib="${CLUSTERFORMER_TCMALLOC:-}"
  [[ "$lib" == 0 || "${LD_PRELOAD:-}" == *tcmalloc* ]] && return 0
  if [[ -z "$lib" ]]; then
    # `|| true`: no ldconfig at all must not stop a `set -e` caller
    lib="$( { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } \
      | sed -n 's/.*libtcmalloc_minimal\.so\.4 .*=> //p' | head -n 1)" || true
    [[ -z "$lib" ]] && return 0
  elif [[ ! -f "$lib" ]]; then
    echo "[launch] CLUSTERFORMER_TCMALLOC=$lib is not a file; set it to a libtcmalloc .so or to 0" >&2
    return 1
  fi
  export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  # no stderr line for every allocation over 1 GiB (tcmalloc's default report threshold)
  export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}"
}

# The compilers of the ahead-of-time compile check (clusterformer_jax/aot.py), each installed without
# dependencies into its own folder inside the venv, which only the compile check puts on sys.path (with libtpu
# on the default path, jax would try to open a TPU on every start). libtpu: the version jax[tpu] pins for the
# pinned jax, ~700 MB. For absent GPUs (--topology=h100-8): jax's CUDA plugin and PJRT library of the pinned
# jax's version plus CUDA's compiler parts (ptxas, libdevice), ~650 MB.
CF_LIBTPU_PACKAGES="libtpu==0.0.42.1"
CF_CUDA_AOT_PACKAGES="jax-cuda13-plugin==0.10.2 jax-cuda13-pjrt==0.10.2 nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88"

# _cf_ensure_packages VAR SUBDIR WHAT PACKAGES: installs PACKAGES into $VAR (default: the venv's SUBDIR) unless
# its stamp lists exactly them, then exports VAR.
_cf_ensure_packages() {
  local var="$1" what="$3" packages="$4"
  local folder="${!var:-${CLUSTERFORMER_VENV:-$REPO_ROOT/.venv}/$2}"
  local stamp="$folder/.packages"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$packages" ]]; then
    echo "[launch] installing $packages into $folder ($what)" >&2
    rm -rf "$folder"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-deps --target "$folder" $packages || return 1
    echo "$packages" > "$stamp"
  fi
  printf -v "$var" '%s' "$folder"
  export "${var?}"
}

cf_ensure_libtpu() {
  _cf_ensure_packages CLUSTERFORMER_LIBTPU_DIR libtpu_aot "TPU cross-compilation" "$CF_LIBTPU_PACKAGES"
}

cf_ensure_cuda_aot() {
  _cf_ensure_packages CLUSTERFORMER_CUDA_AOT_DIR cuda_aot "GPU cross-compilation" "$CF_CUDA_AOT_PACKAGES"
}

# The exit code of a run stopped by SIGTERM/SIGINT after it committed a checkpoint of its last step
# (clusterformer_jax/preemption.py EXIT_PREEMPTED; tests/test_launch.py checks that both agree). Running the
# same command again resumes bit for bit; slurm.sbatch requeues the job on it, tpu_pod.sh restarts.
CF_EXIT_PREEMPTED=75

# CLUSTERFORMER_DRY_RUN=1: the scripts print the commands they would run (one a line) and run nothing.
cf_dry_run() { [[ "${CLUSTERFORMER_DRY_RUN:-0}" == 1 ]]; }

# Prints "$@" shell-quoted on one line.
cf_print_command() {
  local quoted
  quoted="$(printf '%q ' "$@")"
  echo "${quoted% }"
}

# Prints the comment block at the top of script $1 (its usage) without the '#'.
cf_usage() {
  sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/!d;s/^# \{0,1\}//;p}' "$1"
}

# Like cf_ensure_env, but in a dry run only names the venv's python (installs nothing).
cf_env() {
  if cf_dry_run; then
    PY="${CLUSTERFORMER_VENV:-$REPO_ROOT/.venv}/bin/python"
  else
    cf_ensure_env
  fi
}
