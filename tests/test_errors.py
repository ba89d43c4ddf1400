"""Bad input never gets a traceback: a table of mistakes a user makes (config typos and values, devices and
mesh, paths, checkpoints, datasets), each run through the entry point's own code (``main.parse_flags`` then
``main.main``, in this process) and, for one, through ``python -m clusterformer_jax.main``. Each asserts
the exit code (2), one ``error:`` line naming the thing and the fix, no traceback, and that no file under the
case's directory (the workdir and its neighbours) was created, changed or removed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import REPO
from tests.entry_point import run_main

pytestmark = pytest.mark.xdist_group("errors")

QUICK = os.path.join(REPO, "configs", "quickstart.py")
IMAGENET = os.path.join(REPO, "configs", "clusterformer_tiny_imagenet.py")
SHAPES = os.path.join(REPO, "configs", "shapes_detection.py")
COC = os.path.join(REPO, "configs", "coc_imagenet.py")


def _snapshot(root: str) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, mode and content hash."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (stat.st_mode, digest)
    return found


def _safetensors(path: str, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, path)


# Each case: (id, argv with {case} (this case's directory) and {data} (a shared prepared digits dir),
# setup(case_dir) -> None, words the one line must contain). Workdir defaults to {case}/run.
def _file(name: str, data: bytes = b"not what you think\n"):
    def setup(case: str) -> None:
        with open(os.path.join(case, name), "wb") as f:
            f.write(data)

    return setup


def _dirs(*names: str):
    def setup(case: str) -> None:
        for name in names:
            os.makedirs(os.path.join(case, name), exist_ok=True)

    return setup


def _other_model(case: str) -> None:
    """A converted file of another model: a backbone whose stem has other shapes, and one layer that fits."""
    _safetensors(
        os.path.join(case, "other.safetensors"),
        {"backbone/patch_embed/kernel": np.zeros((3, 3, 5, 7), np.float32), "head/bias": np.zeros((10,), np.float32)},
    )


def _nothing(case: str) -> None:
    pass


Q = ["--config=" + QUICK, "--config.input.data_dir={data}"]
CASES = [
    # config typos and values
    ("typo_key", Q + ["--config.optim.lrr=1"], _nothing, ["config.optim.lrr", "unknown config key"]),
    ("typo_nested", Q + ["--config.modle.name=x"], _nothing, ["config.modle", "unknown config key"]),
    ("wrong_type", Q + ["--config.batch_size=abc"], _nothing, ["batch_size", "abc"]),
    ("removed_key", Q + ["--config.mesh.tensor=2"], _nothing, ["mesh.tensor", "data and fsdp"]),
    ("no_config", ["--workdir={case}/run"], _nothing, ["--config is required", "configs/quickstart.py"]),
    ("no_workdir", Q, _nothing, ["--workdir is required"]),
    ("positional", Q + ["extra_arg"], _nothing, ["unexpected positional", "extra_arg"]),
    ("config_file_missing", ["--config={case}/nope.py"], _nothing, ["nope.py"]),
    ("config_arg_bad", ["--config=" + COC + ":coc_huge"], _nothing, ["MODEL", "coc_huge"]),
    ("unknown_task", Q + ["--config.task=segmentation"], _nothing, ["config.task", "segmentation", "available"]),
    ("unknown_model", Q + ["--config.model.name=clusterformer_huge"], _nothing, ["clusterformer_huge"]),
    ("batch_not_multiple", Q + ["--config.batch_size=12"], _nothing, ["batch_size=12", "multiple of 8"]),
    ("batch_zero", Q + ["--config.batch_size=0"], _nothing, ["batch_size=0", "positive multiple"]),
    ("eval_batch_bad", Q + ["--config.eval_batch_size=6"], _nothing, ["eval_batch_size=6", "multiple of 8"]),
    ("log_every_zero", Q + ["--config.log_every_steps=0"], _nothing, ["log_every_steps", "positive"]),
    ("no_run_length", Q + ["--config.num_train_steps=-1", "--config.num_epochs=0"], _nothing, ["num_epochs > 0"]),
    (
        "window_counts",
        Q + ["--config.model.kwargs.window_counts=(3,1,1,1)"],
        _nothing,
        ["window count 3", "--config.model.kwargs.window_counts"],
    ),
    ("unknown_dataset", Q + ["--config.input.dataset=cifar10"], _nothing, ["cifar10", "config.input.dataset"]),
    ("missing_split", Q + ["--config.input.eval_split=nosuch"], _nothing, ["'nosuch'", "prepare it with"]),
    # devices and mesh (8 virtual CPU devices)
    ("mesh_not_divisible", Q + ["--config.mesh.fsdp=3"], _nothing, ["mesh", "not divisible by 3"]),
    ("mesh_too_big", Q + ["--config.mesh.data=16"], _nothing, ["mesh", "16"]),
    ("mesh_two_auto", Q + ["--config.mesh.fsdp=-1"], _nothing, ["at most one mesh axis may be -1"]),
    ("mesh_zero", Q + ["--config.mesh.data=0"], _nothing, ["mesh sizes must be positive"]),
    # paths
    ("workdir_is_file", Q + ["--workdir={case}/run"], _file("run"), ["is a file", "pass a directory"]),
    ("workdir_parent_file", Q + ["--workdir={case}/run/sub"], _file("run"), ["parent", "is a file"]),
    ("workdir_read_only", Q + ["--workdir=/proc/self/run"], _nothing, ["not writable", "write to"]),
    # checkpoints
    ("init_from_missing", Q + ["--config.init_from={case}/nope"], _nothing, ["init_from=", "does not exist"]),
    ("init_from_not_safetensors", Q + ["--config.init_from={case}/w.pth"], _file("w.pth"), ["not .safetensors"]),
    (
        "init_from_corrupt",
        Q + ["--config.init_from={case}/w.safetensors"],
        _file("w.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"),
        ["not a readable safetensors", "convert"],
    ),
    ("init_from_empty_dir", Q + ["--config.init_from={case}/empty"], _dirs("empty"), ["holds no checkpoint"]),
    (
        "init_from_other_model",
        Q + ["--config.init_from={case}/other.safetensors"],
        _other_model,
        ["not a checkpoint of clusterformer_nano", "init_from_partial=True"],
    ),
    ("resume_missing", Q + ["--config.resume={case}/nope"], _nothing, ["resume=", "does not exist"]),
    ("resume_safetensors", Q + ["--config.resume={case}/other.safetensors"], _other_model, ["use init_from"]),
    # datasets
    (
        "imagenet_unprepared",
        ["--config=" + IMAGENET, "--config.input.data_dir={case}/tfds"],
        _dirs("tfds"),
        ["imagenet2012", "not prepared", "manual_dir", "python -m clusterformer_jax.data.pipeline"],
    ),
    (
        "imagenet_manual_missing",
        ["--config=" + IMAGENET, "--config.input.data_dir={case}/tfds", "--config.input.manual_dir={case}/tars"],
        _dirs("tfds"),
        ["manual_dir=", "does not exist", "python -m clusterformer_jax.data.pipeline"],
    ),
    (
        "coco_manual_missing",
        [
            "--config=" + SHAPES,
            "--config.input.dataset=coco_instances",
            "--config.input.data_dir={case}/tfds",
            "--config.input.manual_dir={case}/coco",
        ],
        _dirs("tfds"),
        ["manual_dir=", "coco_instances", "python -m clusterformer_jax.data.dense_pipeline"],
    ),
]


# digits_dir: the session's prepared digits (tests/conftest.py), shared by the cases (preparing it is the data
# pipeline's, not the case's)


def _argv(name: str, case_argv: list[str], case: str, data: str) -> list[str]:
    argv = [a.format(case=case, data=data) for a in case_argv]
    if not any(a.startswith("--workdir") for a in argv) and name != "no_workdir":
        argv.append(f"--workdir={case}/run")
    return argv


def _assert_one_line(code: int, stderr: str, words: list[str]) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert code == 2, (code, stderr)


def test_table_has_at_least_25_cases():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("name,case_argv,setup,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_workdir_untouched(name, case_argv, setup, words, tmp_path, digits_dir):
    case = str(tmp_path)
    setup(case)
    before = _snapshot(case)
    code, stderr = run_main(_argv(name, case_argv, case, digits_dir))
    _assert_one_line(code, stderr, words)
    assert _snapshot(case) == before


def test_read_only_workdir_chmod(tmp_path, digits_dir):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories; the /proc case covers a real read-only place")
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        before = _snapshot(str(tmp_path))
        code, stderr = run_main(Q + [f"--workdir={run}"] + [f"--config.input.data_dir={digits_dir}"])
        _assert_one_line(code, stderr, ["not writable"])
        assert _snapshot(str(tmp_path)) == before
    finally:
        run.chmod(0o755)


def test_real_entry_point_subprocess(tmp_path):
    """The same contract through ``python -m clusterformer_jax.main`` (one process: imports cost seconds)."""
    _other_model(str(tmp_path))
    argv = ["--config=" + QUICK, f"--config.init_from={tmp_path}/other.safetensors", f"--workdir={tmp_path}/run"]
    before = _snapshot(str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "clusterformer_jax.main", *argv],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    _assert_one_line(proc.returncode, proc.stderr, ["not a checkpoint of clusterformer_nano", "init_from_partial"])
    assert _snapshot(str(tmp_path)) == before


def test_init_from_partial_lists_what_fits(tmp_path):
    """The opt-in partial load: the plan names the leaves that load and those that stay fresh."""
    import jax

    from clusterformer_jax.errors import InitFromError
    from clusterformer_jax.trainers import restore
    from clusterformer_jax.trainers.setup import TrainState

    abstract = TrainState(
        step=None,
        params={
            "backbone": {"stem": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}},
            "head": {"bias": jax.ShapeDtypeStruct((10,), np.float32)},
        },
        opt_state=None,
        batch_stats={},
        rng=None,
    )
    path = str(tmp_path / "w.safetensors")
    _safetensors(path, {"backbone/stem/kernel": np.zeros((3, 5), np.float32), "head/bias": np.zeros((10,), np.float32)})
    with pytest.raises(InitFromError) as err:
        restore.plan_init_from(path, abstract, "m", partial=False)
    assert "backbone/stem/kernel" in str(err.value) and "(3, 5)" in str(err.value) and "\n" not in str(err.value)
    load, fresh = restore.plan_init_from(path, abstract, "m", partial=True)
    assert load == {"params": ["head/bias"]} and fresh == ["params/backbone/stem/kernel"]
    # A fresh head (other classes) with a fitting backbone needs no opt-in.
    _safetensors(path, {"backbone/stem/kernel": np.zeros((3, 4), np.float32), "head/bias": np.zeros((7,), np.float32)})
    load, fresh = restore.plan_init_from(path, abstract, "m", partial=False)
    assert load == {"params": ["backbone/stem/kernel"]} and fresh == ["params/head/bias"]
