"""The shared trainer on the dense tasks (instance segmentation on the small synthetic shapes, 8 virtual CPU
devices): steps on the 2x4 data x fsdp mesh, a whole run with COCO eval and the predict command, init_from a
classifier, images without objects, per-group learning-rate multipliers.

Compiling the dense train step dominates this file, so it compiles it once: the module fixture's step on the
2x4 mesh is exactly the program the whole run compiles (served to it by the persistent compilation cache, as
is its init), and the other tests reuse it or need no step. (Sharding invariance, one device against the 2x4
mesh, is test_trainer's, on the classifier with every random op on.)
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from clusterformer_jax import checkpointing
from clusterformer_jax import sharding
from clusterformer_jax.convert.common import save_flax_params
from clusterformer_jax.data import dense_pipeline
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.models import registry
from clusterformer_jax.trainers import trainer
from clusterformer_jax.trainers.restore import init_params_from, restore_or_init
from clusterformer_jax.trainers.setup import build
from tests import presets

# one worker runs this file: its module fixtures are built once
pytestmark = [pytest.mark.xdist_group("dense_trainer"), pytest.mark.usefixtures("persistent_compilation_cache")]

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = presets.DENSE_STEPS  # the whole run's length; the sharding test takes the first 5 of its batches
BATCH = presets.DENSE_BATCH
SEGM_KEYS = tuple(f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "AP75", "APs", "APm", "APl"))


@pytest.fixture(scope="module")
def data_dir(shapes_dir):
    return shapes_dir  # the session's prepared small shapes (tests/conftest.py)


def _tree_pairs(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    return [(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)]


def _config(data_dir: str):
    """The shared tiny dense preset (tests/presets.py): a ClusterFormer-nano instance segmenter on the 64 px
    shapes, on the 2x4 data x fsdp mesh.

    The sharding test builds exactly the program the whole run compiles on that mesh (same config,
    total_steps and steps_per_epoch), so the persistent compilation cache serves it to the run.
    """
    return presets.tiny_dense_config(data_dir)


def _build(config, mesh):
    info = dense_pipeline.get_dataset_info(config.input)
    total, per_epoch = trainer.resolve_run_lengths(config, int(info["num_train"]))
    return build(config, mesh, info, total_steps=total, steps_per_epoch=per_epoch)


def _metrics(acc) -> dict[str, float]:
    return {k: float(v) for k, v in acc[0].compute().items()}


# ----------------------------------------------------------------------------------------------------------
# Several steps on different meshes.

MESHES = {"data2_fsdp4": ({"data": 2, "fsdp": 4}, 8)}
SHARDED_STEPS = 5


@pytest.fixture(scope="module")
def stepped(data_dir):
    """{mesh name: (setup, compiled train step, final state, per-step metrics)} on real train batches, plus
    'initial' (host state), 'batches' and 'config'."""
    config = _config(data_dir)
    iterator = dense_pipeline.create_train_iterator(config.input, seed=config.seed, global_batch_size=BATCH)
    batches = [dict(b) for b in itertools.islice(iterator, SHARDED_STEPS)]
    iterator.close()
    setups = {}
    for name, (mesh_config, num_devices) in MESHES.items():
        devices = None if num_devices == jax.device_count() else jax.devices()[:num_devices]
        setups[name] = _build(config, sharding.create_mesh(mesh_config, devices=devices))
    initial = jax.device_get(setups["data2_fsdp4"].init_state(config.seed))  # the whole run's init (cached for it)
    results = {"initial": initial, "batches": batches, "config": config}
    for name, setup in setups.items():
        state = jax.device_put(initial, setup.state_shardings)
        step_fn = None
        per_step = []
        for batch in batches:
            args = (state, sharding.shard_batch(batch, setup.batch_sharding), setup.empty_train_accumulator())
            if step_fn is None:
                step_fn = setup.train_step.lower(*args).compile()
            state, acc = step_fn(*args)
            per_step.append(_metrics(acc))
        results[name] = (setup, step_fn, state, per_step)
    return results


def test_real_batches_have_instances_and_fsdp_splits_decoder_kernels(stepped):
    batch = stepped["batches"][0]
    assert batch["image"].shape == (BATCH, 64, 64, 3) and batch["instance_valid"].shape == (BATCH, 4)
    assert batch["instance_valid"].any()
    setup, _, state, _ = stepped["data2_fsdp4"]
    decoder_specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params["decoder"])]
    assert any("fsdp" in tuple(spec) for spec in decoder_specs)
    kernel = state.params["decoder"]["layer_0"]["value"]["kernel"]
    assert kernel.shape == (32, 32) and "fsdp" in tuple(kernel.sharding.spec)
    assert {s.data.shape for s in kernel.addressable_shards} <= {(8, 32), (32, 8)}
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 4}


def test_sharded_steps_train_on_real_batches(stepped):
    _, _, state, steps = stepped["data2_fsdp4"]
    assert int(state.step) == SHARDED_STEPS
    for metrics in steps:
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["num_targets"] > 0
        for key in ("loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
            assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    assert len({round(s["loss"], 3) for s in steps}) > 1  # the steps really trained on different batches
    moved = [not np.array_equal(got, want) for got, want in _tree_pairs(state.params, stepped["initial"].params)]
    assert sum(moved) > 0.9 * len(moved)


# ----------------------------------------------------------------------------------------------------------
# Images without objects (the fixture's compiled step, no new compile).


@pytest.mark.parametrize("empty_rows", ["all", "first"])
def test_images_without_objects_give_finite_loss_and_gradients(stepped, empty_rows):
    setup, step_fn, _, _ = stepped["data2_fsdp4"]
    batch = dict(stepped["batches"][0])
    valid = batch["instance_valid"].copy()
    if empty_rows == "all":
        valid[:] = False
    else:
        valid[0] = False
    batch["instance_valid"] = valid
    state = jax.device_put(stepped["initial"], setup.state_shardings)
    state, acc = step_fn(state, sharding.shard_batch(batch, setup.batch_sharding), setup.empty_train_accumulator())
    metrics = _metrics(acc)
    assert metrics["num_targets"] == valid.sum()
    for key in ("loss", "grad_norm", "param_norm", "loss_class"):
        assert np.isfinite(metrics[key]), (key, metrics)
    assert metrics["grad_norm"] > 0  # the class loss still pushes every query towards 'no object'
    assert int(acc[1].bad_step) == -1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    if empty_rows == "all":
        for key in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
            assert metrics[key] == 0.0, (key, metrics)


# ----------------------------------------------------------------------------------------------------------
# init_from a classification checkpoint.


def test_init_from_classifier_loads_backbone_and_keeps_fresh_decoder(stepped, tmp_path):
    setup, _, _, _ = stepped["data2_fsdp4"]
    initial = stepped["initial"]
    fields = registry.model_fields("clusterformer_nano")
    classifier = registry.create_model(
        "clusterformer_nano", **{k: v for k, v in setup.model_kwargs.items() if k in fields}
    )
    abstract = jax.eval_shape(classifier.init, jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
    rng = np.random.default_rng(7)  # values no fresh init produces
    source = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract["params"])
    assert set(source) == {"backbone", "head"}
    path = str(tmp_path / "clusterformer_nano_imagenet.safetensors")
    save_flax_params(source, path)

    loaded = init_params_from(path, setup, jax.device_put(initial, setup.state_shardings))
    pairs = _tree_pairs(loaded.params["backbone"], source["backbone"])
    assert len(pairs) > 50
    for got, want in pairs:
        np.testing.assert_array_equal(got, want)
    for got, want in _tree_pairs(loaded.params["decoder"], initial.params["decoder"]):
        np.testing.assert_array_equal(got, want)
    for got, want in _tree_pairs(loaded.opt_state, initial.opt_state):
        np.testing.assert_array_equal(got, want)
    kernel = loaded.params["backbone"]["patch_embed"]["kernel"]
    assert kernel.sharding == setup.state_shardings.params["backbone"]["patch_embed"]["kernel"]

    # The same through config.init_from, as a run with an empty workdir starts.
    config = stepped["config"].copy_and_resolve_references()
    config.init_from = path
    ckpt = checkpointing.Checkpointer(str(tmp_path / "workdir" / "checkpoints"))
    state, source_name = restore_or_init(config, setup, ckpt, None)
    ckpt.close()
    assert source_name == f"init_from={path}" and int(state.step) == 0
    for got, want in _tree_pairs(state.params, loaded.params):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------------
# Per-group learning-rate multipliers (optimizer updates only: no train step to compile).


def _first_update(tx, grads, params):
    return jax.device_get(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params))


@pytest.fixture(scope="module")
def unscaled_update(stepped):
    """(gradients, the reference optimizer's first update of them) for the multiplier cases: random gradients,
    but none for one backbone leaf, which then moves by weight decay alone (the multiplier scales that too)."""
    reference_setup, _, _, _ = stepped["data2_fsdp4"]
    params = stepped["initial"].params
    rng = np.random.default_rng(3)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
    grads["backbone"]["patch_embed"]["kernel"] = np.zeros_like(params["backbone"]["patch_embed"]["kernel"])
    return grads, _first_update(reference_setup.tx, grads, params)


@pytest.mark.parametrize("factor", [0.1, 0.0])
def test_backbone_lr_multiplier_scales_its_updates_and_weight_decay(stepped, unscaled_update, factor):
    reference_setup, _, _, _ = stepped["data2_fsdp4"]
    initial = stepped["initial"]
    config = stepped["config"].copy_and_resolve_references()
    assert config.optim.lr_multipliers.backbone == 1.0  # the reference has no multiplier stage
    config.optim.lr_multipliers.backbone = factor
    setup = _build(config, reference_setup.mesh)
    params = initial.params
    grads, ref = unscaled_update
    scaled = _first_update(setup.tx, grads, params)
    for got, want in _tree_pairs(scaled["decoder"], ref["decoder"]):
        np.testing.assert_array_equal(got, want)
    pairs = _tree_pairs(scaled["backbone"], ref["backbone"])
    assert all(np.abs(want).max() > 0 for _, want in pairs)
    for got, want in pairs:
        np.testing.assert_allclose(got, np.float32(factor) * want, rtol=1e-6, atol=0)
    decay_only = ref["backbone"]["patch_embed"]["kernel"]
    lr = float(reference_setup.schedule(0))
    wd = float(config.optim.weight_decay)
    np.testing.assert_allclose(decay_only, -lr * wd * params["backbone"]["patch_embed"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(scaled["backbone"]["patch_embed"]["kernel"], factor * decay_only, rtol=1e-6)


def test_unknown_lr_multiplier_group_is_a_one_line_config_error(stepped):
    config = stepped["config"].copy_and_resolve_references()
    config.optim.lr_multipliers.neck = 0.5
    mesh = stepped["data2_fsdp4"][0].mesh
    with pytest.raises(ConfigError) as error:
        _build(config, mesh)
    message = str(error.value)
    assert "\n" not in message and "'neck'" in message and "backbone" in message and "decoder" in message


# ----------------------------------------------------------------------------------------------------------
# A whole run: train, COCO eval, results.json, and the predict command on its checkpoint.


@pytest.fixture(scope="module")
def whole_run(stepped, data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shapes_instance_run")
    config = _config(data_dir)
    return workdir, trainer.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_whole_run_writes_coco_results(whole_run):
    workdir, results = whole_run
    on_disk = json.loads((workdir / "results.json").read_text())
    assert set(SEGM_KEYS) | set(trainer.RESULT_KEYS) <= set(on_disk)
    for key in SEGM_KEYS:
        assert isinstance(on_disk[key], float) and -1.0 <= on_disk[key] <= 1.0, (key, on_disk[key])
        assert on_disk[key] == pytest.approx(results[key])
    assert on_disk["steps"] == NUM_STEPS and on_disk["train_steps_this_run"] == NUM_STEPS
    assert on_disk["seconds"] > 0 and on_disk["eval_num_examples"] == 16
    assert on_disk["mesh"] == {"data": 2, "fsdp": 4}
    assert list(workdir.glob("events.out.tfevents.*"))
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)))
    assert ckpt.latest_step() == NUM_STEPS
    ckpt.close()


@pytest.mark.slow
def test_predict_command_writes_side_by_side_pngs_and_coco_results(whole_run, tmp_path):
    workdir, _ = whole_run
    out = tmp_path / "predictions"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clusterformer_jax.predict",
            f"--workdir={workdir}",
            f"--out={out}",
            "--num_images=2",
            "--score_threshold=0.0",  # keep every detection of the barely trained model
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as image:
            image.load()
            width, height = image.size
            assert image.mode == "RGB" and width > height >= 64  # prediction | ground truth
    images = json.loads((out / "images.json").read_text())
    assert len(images) == 2 and {f"{i['id']:06d}.png" for i in images} == {p.name for p in pngs}
    detections = json.loads((out / "predictions.json").read_text())
    assert isinstance(detections, list) and detections
    assert {d["image_id"] for d in detections} == {i["id"] for i in images}
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert d["category_id"] in (1, 2, 3) and 0.0 <= d["score"] <= 1.0
        assert len(d["bbox"]) == 4 and all(isinstance(v, float) for v in d["bbox"])
        assert d["bbox"][2] >= 0 and d["bbox"][3] >= 0
        assert isinstance(d["segmentation"]["counts"], str) and len(d["segmentation"]["size"]) == 2
