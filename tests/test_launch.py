"""The launch environment: tcmalloc preloaded when the system has it, a clear error for a bad path."""

import os
import shutil
import signal
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "from clusterformer_jax import runtime; print(runtime.host_allocator())"


def _launch_python(env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CLUSTERFORMER_TCMALLOC")}
    env.update(env_update)
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", "python.sh"), *args], env=env, capture_output=True, text=True, timeout=600
    )


def _system_tcmalloc():
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if not os.path.exists(ldconfig):
        return None
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    return next((line.split("=> ")[-1] for line in listing.splitlines() if "libtcmalloc_minimal.so.4 " in line), None)


def test_tcmalloc_off_runs_on_glibc():
    done = _launch_python({"CLUSTERFORMER_TCMALLOC": "0"}, "-c", PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "glibc"


def test_bad_tcmalloc_path_is_one_clear_error():
    done = _launch_python({"CLUSTERFORMER_TCMALLOC": "/no/such/libtcmalloc.so"}, "-c", 'print("ran")')
    assert done.returncode == 1
    assert "ran" not in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "[launch] CLUSTERFORMER_TCMALLOC=/no/such/libtcmalloc.so is not a file; set it to a libtcmalloc .so or to 0"
    )


def test_system_tcmalloc_is_preloaded_by_default():
    library = _system_tcmalloc()
    if library is None:
        pytest.skip("no libtcmalloc_minimal.so.4 on this system (apt-get install libtcmalloc-minimal4)")
    default = _launch_python({}, "-c", PROBE)
    explicit = _launch_python({"CLUSTERFORMER_TCMALLOC": library}, "-c", PROBE)
    for done in (default, explicit):
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "tcmalloc"


# ----------------------------------------------------------------------------------------------------------
# Preemption exit code, --help and dry runs: the exact commands each script would run.

VENV_PY = os.path.join(REPO, ".venv", "bin", "python")
MAIN_ARGS = ["--config=configs/quickstart.py", "--workdir=runs/a b"]
MAIN_ARGS_QUOTED = "--config=configs/quickstart.py --workdir=runs/a\\ b"
SCRIPTS = ("local.sh", "multiprocess.sh", "slurm.sbatch", "tpu_pod.sh")


def _script(name, *args, env_update=None, dry_run=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERFORMER_", "SLURM_", "JAX_"))}
    env.pop("LD_PRELOAD", None)
    if dry_run:
        env["CLUSTERFORMER_DRY_RUN"] = "1"
    env.update(env_update or {})
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", name), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_preempted_exit_code_is_defined_once_for_the_scripts():
    from clusterformer_jax import preemption

    with open(os.path.join(REPO, "launch", "_env.sh")) as f:
        assignments = [line for line in f if line.startswith("CF_EXIT_PREEMPTED=")]
    assert assignments == [f"CF_EXIT_PREEMPTED={preemption.EXIT_PREEMPTED}\n"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_the_usage_and_the_preemption_exit_code(name):
    done = _script(name, "--help", dry_run=False)
    assert done.returncode == 0, done.stderr
    assert "75" in done.stdout and "#" not in done.stdout.splitlines()[0]
    assert "CLUSTERFORMER_DRY_RUN=1" in done.stdout


def test_local_dry_run_prints_the_command():
    done = _script("local.sh", *MAIN_ARGS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{VENV_PY} -m clusterformer_jax.main {MAIN_ARGS_QUOTED}"]


def test_multiprocess_dry_run_prints_one_command_per_process():
    done = _script("multiprocess.sh", "2", *MAIN_ARGS, env_update={"PORT": "23456", "CPU_DEVICES": "4"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"env CLUSTERFORMER_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=127.0.0.1:23456 CLUSTERFORMER_NUM_PROCESSES=2 "
        f"CLUSTERFORMER_PROCESS_ID={i} JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 "
        f"{VENV_PY} -m clusterformer_jax.main {MAIN_ARGS_QUOTED}"
        for i in range(2)
    ]
    gpus = _script("multiprocess.sh", "2", *MAIN_ARGS, env_update={"GPUS_PER_PROCESS": "2"})
    assert [line.split()[5] for line in gpus.stdout.splitlines()] == [
        "CUDA_VISIBLE_DEVICES=0\\,1",
        "CUDA_VISIBLE_DEVICES=2\\,3",
    ]
    usage = _script("multiprocess.sh", "x", dry_run=False)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_slurm_dry_run_prints_srun_and_the_requeue():
    done = _script("slurm.sbatch", *MAIN_ARGS, env_update={"SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_ID": "4242"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"srun --kill-on-bad-exit=1 {VENV_PY} -m clusterformer_jax.main {MAIN_ARGS_QUOTED}",
        "# on exit code 75:",
        "scontrol requeue 4242",
    ]
    with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
        directives = [line.strip() for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives and "#SBATCH --signal=TERM@300" in directives


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    env = {"TPU_NAME": "pod", "ZONE": "us-central2-b", "PROJECT": "proj", "SYNC": "1", "MAX_RESTARTS": "3"}
    done = _script("tpu_pod.sh", *MAIN_ARGS, env_update=env)
    assert done.returncode == 0, done.stderr
    flags = "--zone=us-central2-b --worker=all --project=proj"
    remote = "--command=cd\\ clusterformer_jax\\ \\&\\&\\ CLUSTERFORMER_JAX_EXTRA=tpu\\ CLUSTERFORMER_DISTRIBUTED=1"
    assert done.stdout.splitlines() == [
        f"git -C {REPO} archive --format=tar.gz -o ARCHIVE.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp ARCHIVE.tar.gz pod:clusterformer.tar.gz {flags}",
        f"gcloud compute tpus tpu-vm ssh pod {flags} --command=mkdir\\ -p\\ clusterformer_jax\\ \\&\\&\\ "
        "tar\\ -xzf\\ clusterformer.tar.gz\\ -C\\ clusterformer_jax",
        f"gcloud compute tpus tpu-vm ssh pod {flags} {remote}\\ bash\\ launch/local.sh\\ "
        "--config=configs/quickstart.py\\ --workdir=runs/a\\\\\\ b",
        "# repeated while it exits 75, at most 3 more times",
    ]
    missing = _script("tpu_pod.sh", *MAIN_ARGS, env_update={"ZONE": "z"})
    assert missing.returncode != 0 and "TPU_NAME" in missing.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
trap 'echo "process $CLUSTERFORMER_PROCESS_ID saves"; exit 75' TERM
if [[ "$CLUSTERFORMER_PROCESS_ID" == "$FAIL_PROCESS" ]]; then  # fails once the others are up
  for _ in $(seq 600); do [[ -e "$MARKS/started" ]] && break; sleep 0.05; done
  echo "process $CLUSTERFORMER_PROCESS_ID fails"
  exit 3
fi
[[ -n "${MARKS:-}" ]] && touch "$MARKS/started"
echo "process $CLUSTERFORMER_PROCESS_ID of $CLUSTERFORMER_NUM_PROCESSES started"
while true; do sleep 0.05; done
"""


@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose python stands in for a training process: exits 75 on SIGTERM (as main does)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    stamp = subprocess.run(
        ["bash", "-c", f"source {os.path.join(REPO, 'launch', '_env.sh')} && cf_requirements_hash"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (venv / ".requirements.sha256").write_text(stamp)
    return str(venv)


def test_multiprocess_passes_sigterm_to_every_process_and_exits_75(fake_venv):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERFORMER_", "JAX_"))}
    env.update(CLUSTERFORMER_VENV=fake_venv, CLUSTERFORMER_TCMALLOC="0")
    proc = subprocess.Popen(
        ["bash", os.path.join(REPO, "launch", "multiprocess.sh"), "3", *MAIN_ARGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = set()
    for line in proc.stdout:
        if "started" in line:
            started.add(line.split()[0])
        if len(started) == 3:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    assert sorted(line for line in out.splitlines() if "saves" in line) == [
        f"[p{i}] process {i} saves" for i in range(3)
    ]


def test_multiprocess_failure_stops_the_others_and_reports_it(fake_venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERFORMER_", "JAX_"))}
    env.update(CLUSTERFORMER_VENV=fake_venv, CLUSTERFORMER_TCMALLOC="0", FAIL_PROCESS="0", MARKS=str(tmp_path))
    done = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "multiprocess.sh"), "2", *MAIN_ARGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "[p0] process 0 fails" in done.stdout and "[p1] process 1 saves" in done.stdout
