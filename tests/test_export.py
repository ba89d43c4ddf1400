"""Export: params-only checkpoint + a serialized inference function with a symbolic batch, and its loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clusterformer_jax import checkpointing
from clusterformer_jax import export
from clusterformer_jax import sharding
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.models import registry
from clusterformer_jax.trainers.setup import build
from tests import REPO, load_config

DIGITS_INFO = {"num_classes": 10, "num_train": 1437, "num_eval": 360, "image_size": 32}


class _BatchNormNet(nn.Module):
    """A small CNN with BatchNorm statistics (the 'batch_stats' collection travels with the params)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(2, 2))(images)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.2)(nn.relu(x).mean(axis=(1, 2)), deterministic=not train)
        return nn.Dense(self.num_classes)(x)


registry.register_model("test_export_net", _BatchNormNet)


def _trained_run(workdir, model_name: str):
    """A workdir as training leaves it (config.json, dataset_info.json, a checkpoint of step 7) with random
    weights, and the Setup the trainer would build for it on one device."""
    config = load_config("quickstart.py")
    config.model.name = model_name
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "dataset_info.json"), "w") as f:
        json.dump(DIGITS_INFO, f)
    mesh = sharding.create_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    setup = build(config, mesh, DIGITS_INFO, total_steps=1, steps_per_epoch=1.0)
    rng = np.random.default_rng(0)

    def leaf(a):
        if np.issubdtype(a.dtype, np.floating):
            return (rng.normal(size=a.shape) * 0.05 + (1.0 if "var" in str(a) else 0.0)).astype(a.dtype)
        return np.zeros(a.shape, a.dtype)

    state = jax.tree.map(leaf, setup.abstract_state)
    if state.batch_stats:  # positive variances
        state = state.replace(batch_stats=jax.tree.map(lambda x: np.abs(x) + 0.5, state.batch_stats))
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), async_save=False)
    ckpt.save(7, state, force=True)
    ckpt.close()
    return setup, state


def _in_framework(setup, state, images):
    """The trainer's evaluation forward pass (setup.model, as ``predict_step`` applies it)."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return np.asarray(jax.jit(lambda v, x: setup.model.apply(v, images=x, train=False))(variables, images))


def _check_export(tmp_path, model_name: str):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    setup, state = _trained_run(workdir, model_name)
    signature = export.export(workdir, out)
    assert signature["inputs"] == {"images": {"shape": ["b", 32, 32, 3], "dtype": "float32"}}
    assert signature["outputs"] == {"output": {"shape": ["b", 10], "dtype": "float32"}}
    assert signature["step"] == 7 and signature["model"] == model_name
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "dataset_info.json", "load_exported.py", "model.jax_exported", "params", "signature.json"]
    )
    # (a) the params-only checkpoint holds exactly the run's parameters (and BatchNorm statistics)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(os.path.join(out, "params"))
    want = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    assert jax.tree.structure(stored) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(stored), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), expected)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model"]["name"] == model_name
    # (b) the serialized function at two batch sizes equals the trainer's forward pass
    with open(os.path.join(out, "model.jax_exported"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        images = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
        got, want = np.asarray(exported.call({"images": images})), _in_framework(setup, state, images)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # the loader, in a process that cannot import the project (no PYTHONPATH, started outside the repo)
    np.savez(tmp_path / "inputs.npz", images=images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert not [m for m in sys.modules if m.startswith('clusterformer_jax')]"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, os.path.join(out, "load_exported.py"), out, "inputs.npz", "outputs.npz"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "output: shape (3, 10) dtype float32" in done.stdout
    with open(os.path.join(out, "load_exported.py")) as f:
        assert len(f.read().splitlines()) <= 30
    loaded = np.load(tmp_path / "outputs.npz")["output"]
    np.testing.assert_array_equal(loaded, got)


def test_export_round_trip_small_batchnorm_model(tmp_path):
    _check_export(tmp_path, "test_export_net")


@pytest.mark.slow
def test_export_round_trip_clusterformer_nano(tmp_path):
    """The clustering (scan over EM steps, windows by batch) under a symbolic batch dimension."""
    _check_export(tmp_path, "clusterformer_nano")


def test_bf16_params_and_missing_ema_or_checkpoint(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    _, state = _trained_run(workdir, "test_export_net")
    export.export(workdir, out, bf16=True)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(os.path.join(out, "params"))
    kernel = stored["params"]["Dense_0"]["kernel"]
    assert kernel.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), state.params["Dense_0"]["kernel"].astype(jax.numpy.bfloat16))
    with pytest.raises(ConfigError, match="keeps no EMA parameters; export without --ema"):
        export.export(workdir, str(tmp_path / "ema"), ema=True)
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        export.export(workdir, out)
    with pytest.raises(ConfigError, match="holds no config.json"):
        export.export(str(tmp_path), str(tmp_path / "other"))


def test_command_line_usage_error_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "clusterformer_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {str(tmp_path)!r} holds no config.json; pass the workdir of a training run"
    ]
