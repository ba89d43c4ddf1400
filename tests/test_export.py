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
from clusterformer_jax.data import dense_pipeline
from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.models import registry
from clusterformer_jax.trainers.setup import build
from tests import REPO, load_config, presets

DIGITS_INFO = presets.DIGITS_INFO


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


def _trained_run(workdir, model_name: str, config=None, dataset_info=DIGITS_INFO):
    """A workdir as training leaves it (config.json, dataset_info.json, a checkpoint of step 7) with random
    weights, and the Setup the trainer would build for it on one device (default: the quickstart)."""
    if config is None:
        config = load_config("quickstart.py")
        config.model.name = model_name
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "dataset_info.json"), "w") as f:
        json.dump(dataset_info, f)
    mesh = sharding.create_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    setup = build(config, mesh, dataset_info, total_steps=1, steps_per_epoch=1.0)
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


def _tiny_dense_config(filename: str, data_dir: str):
    """A one-block-per-stage ClusterFormer nano (width 16) behind a one-layer cluster decoder on the 64 px small
    shapes (eval canvas 64)."""
    config = load_config(filename, "clusterformer")
    config.input.update(data_dir=data_dir, shapes_variant="small", train_crop_size=64, eval_pad_size=64)
    config.input.update(eval_short_side=64, eval_max_size=64, max_instances=4)
    config.model.decoder.update(dim=8, num_layers=1, layer_strides=(32,), num_heads=1, ffn_dim=16)
    config.model.kwargs.update(depths=(1, 1, 1, 1), dims=(16, 16, 16, 16), num_heads=(1, 1, 1, 1), head_dim=16)
    return config


@pytest.mark.parametrize(
    "filename",
    [
        "shapes_instance.py",
        pytest.param("shapes_semantic.py", marks=pytest.mark.slow),
        pytest.param("shapes_panoptic.py", marks=pytest.mark.slow),  # random weights: mostly void segments
    ],
)
def test_export_round_trip_dense_task(tmp_path, filename):
    """The task's fixed-shape predictions (what the evaluator receives) through the exported function."""
    shapes_lib.prepare_shapes(str(tmp_path / "tfds"), "small")
    config = _tiny_dense_config(filename, str(tmp_path / "tfds"))
    info = dense_pipeline.get_dataset_info(config.input)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    setup, state = _trained_run(workdir, config.model.name, config, info)
    signature = export.export(workdir, out)
    assert signature["inputs"] == {
        "images": {"shape": ["b", 64, 64, 3], "dtype": "float32"},
        "pixel_mask": {"shape": ["b", 64, 64], "dtype": "bool"},
    }
    with open(os.path.join(out, "model.jax_exported"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
    pixel_mask = np.zeros((3, 64, 64), bool)
    pixel_mask[:, :48, :56] = True  # an image smaller than the canvas, as the eval pipeline pads it
    want = setup.predict_step(state, {"image": images, "image_mask": pixel_mask})  # rows are independent
    assert set(want) == set(signature["outputs"])
    for batch in (1, 3):
        got = exported.call({"images": images[:batch], "pixel_mask": pixel_mask[:batch]})
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for key in want:
            a, b = np.asarray(got[key]), np.asarray(want[key])[:batch]
            assert a.shape == b.shape and a.dtype == b.dtype, key
            if np.issubdtype(b.dtype, np.floating):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=key)
            else:
                np.testing.assert_array_equal(a, b, err_msg=key)


def test_bf16_params_and_bad_format_or_workdir(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    _, state = _trained_run(workdir, "test_export_net")
    export.export(workdir, out, bf16=True)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(os.path.join(out, "params"))
    kernel = stored["params"]["Dense_0"]["kernel"]
    assert kernel.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), state.params["Dense_0"]["kernel"].astype(jax.numpy.bfloat16))
    with pytest.raises(ConfigError, match="--format='onnx' is not one of jax, saved_model"):
        export.export(workdir, str(tmp_path / "onnx"), format="onnx")
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        export.export(workdir, out)
    with pytest.raises(ConfigError, match="holds no config.json"):
        export.export(str(tmp_path), str(tmp_path / "other"))
    from clusterformer_jax.trainers import trainer  # loads TensorFlow, which export avoids

    assert export.DATASET_INFO_FILE == trainer.DATASET_INFO_FILE


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
