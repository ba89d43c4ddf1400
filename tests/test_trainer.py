"""The shared trainer on 8 virtual CPU devices: sharding invariance, checkpoints, exact resume, NaN stop, CLI.

Compiled programs go to a per-session persistent compilation cache, so the whole runs compile the nano model
once.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import flax.linen as nn
import grain
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clusterformer_jax import checkpointing
from clusterformer_jax import sharding
from clusterformer_jax.convert.common import save_flax_params
from clusterformer_jax.data import pipeline
from clusterformer_jax.errors import NonFiniteError
from clusterformer_jax.models import registry
from clusterformer_jax.trainers import trainer
from clusterformer_jax.trainers.progress import StepClock
from clusterformer_jax.trainers.restore import init_params_from
from clusterformer_jax.trainers.setup import build
from tests import entry_point, load_config, presets

# one worker runs this file: its module fixtures are built once
pytestmark = [pytest.mark.xdist_group("trainer"), pytest.mark.usefixtures("persistent_compilation_cache")]

REPO = Path(__file__).resolve().parents[1]
DIGITS_INFO = presets.DIGITS_INFO


def _tree_pairs(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    return [(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)]


# ----------------------------------------------------------------------------------------------------------
# One step on different meshes.


def _run_config(data_dir: str = ""):
    """The shared tiny classification preset (tests/presets.py): the quickstart for 20 steps at batch 16 on the
    2x4 data x fsdp mesh, every random op on.

    The one-step tests build exactly the program the whole runs compile on that mesh, so the persistent
    compilation cache serves it to both.
    """
    return presets.tiny_classification_config(data_dir)


MESHES = {
    "one_device": ({"data": 1, "fsdp": 1}, 1),
    "data2_fsdp4": ({"data": 2, "fsdp": 4}, 8),
    "data8": ({"data": 8, "fsdp": 1}, 8),
}
STEPPED = ("one_device", "data2_fsdp4")  # the meshes a step is compiled for; 'data8' only restores


@pytest.fixture(scope="module")
def one_step():
    """{mesh name: (setup, state after one step, train metrics)} from the same initial state and batch on the
    ``STEPPED`` meshes; 'data8': (setup, None, None), a layout to restore onto without a compiled step.

    One multi-device step: the 2x4 mesh has both a data axis (the gradient all-reduce) and an fsdp axis (the
    split parameters), so an 8-way data mesh would prove nothing more than it does (the data-parallel
    whole-run path is covered by the whole runs below and test_multihost)."""
    config = _run_config()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=(16,)).astype(np.int32),
    }
    setups = {}
    for name, (mesh_config, num_devices) in MESHES.items():
        devices = None if num_devices == jax.device_count() else jax.devices()[:num_devices]
        mesh = sharding.create_mesh(mesh_config, devices=devices)
        setups[name] = build(config, mesh, DIGITS_INFO, total_steps=20, steps_per_epoch=1.0)
    initial = jax.device_get(setups["data2_fsdp4"].init_state(0))  # the whole runs' init (cached for them)
    results = {"data8": (setups["data8"], None, None)}
    for name in STEPPED:
        setup = setups[name]
        args = (
            jax.device_put(initial, setup.state_shardings),
            sharding.shard_batch(batch, setup.batch_sharding),
            setup.empty_train_accumulator(),
        )
        # 'data2_fsdp4' is the program the whole runs below use (cached for them)
        state, acc = setup.train_step.lower(*args).compile()(*args)
        results[name] = (setup, state, {k: float(v) for k, v in acc[0].compute().items()})
    results["initial"] = initial
    return results


@pytest.mark.parametrize("name", ["data2_fsdp4"])
def test_multi_device_step_matches_single_device(one_step, name):
    _, ref_state, ref_metrics = one_step["one_device"]
    setup, state, metrics = one_step[name]
    assert dict(state.params["head"]["kernel"].sharding.mesh.shape) == MESHES[name][0]
    assert np.isfinite(metrics["loss"])
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-5, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-5)
    assert int(state.step) == 1
    for got, want in _tree_pairs(state.params, ref_state.params):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
    if MESHES[name][0]["fsdp"] > 1:
        assert any("fsdp" in tuple(spec) for spec in specs)
        assert any(
            s.spec != jax.sharding.PartitionSpec()
            for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.opt_state))
        )


def test_fsdp_step_output_is_laid_out_by_the_rules(one_step):
    """The state that comes out of a step on the 2x4 mesh: big leaves split over 'fsdp' on their largest
    divisible axis (and replicated over 'data'), small leaves and the step counter replicated, and AdamW's
    moments laid out exactly like their parameters."""
    setup, state, _ = one_step["data2_fsdp4"]
    mesh, min_size = setup.mesh, int(setup.config.sharding.fsdp_min_size)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4} and min_size == 1024

    def fsdp_index(device) -> int:
        return int(np.argwhere(mesh.devices == device)[0][1])

    kernel = state.params["backbone"]["stage_2_block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.shape == (128, 512) and kernel.sharding.spec == P(None, "fsdp")
    for shard in kernel.addressable_shards:  # columns by fsdp index, the same on both data rows
        start = 128 * fsdp_index(shard.device)
        assert shard.data.shape == (128, 128) and shard.index[1] == slice(start, start + 128)
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(kernel)[:, start : start + 128])
    conv = state.params["backbone"]["downsample_3"]["kernel"]  # (3, 3, 128, 192): the output axis is largest
    assert conv.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape for s in conv.addressable_shards} == {(3, 3, 128, 48)}
    for small in (state.params["backbone"]["norm_3"]["scale"], state.step, state.rng):
        assert small.size < min_size and small.sharding.is_fully_replicated
        assert {s.data.shape for s in small.addressable_shards} == {small.shape}
    assert int(state.step) == 1
    for leaf in jax.tree.leaves(state.params):
        assert leaf.sharding.spec == sharding.param_partition_spec(leaf.shape, fsdp=4, fsdp_min_size=min_size)
    assert sum("fsdp" in tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)) > 50

    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    assert adam.count.sharding.is_fully_replicated
    for moment in (adam.mu, adam.nu):
        for m, p in _tree_leaves_pairs(moment, state.params):
            assert m.shape == p.shape and m.sharding == p.sharding
            assert [s.index for s in m.addressable_shards] == [s.index for s in p.addressable_shards]


def _tree_leaves_pairs(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    return list(zip(leaves_a, leaves_b))


def test_checkpoint_round_trip_onto_another_mesh(one_step, tmp_path):
    _, state, _ = one_step["data2_fsdp4"]
    dataset = grain.MapDataset.range(64).shuffle(seed=3).repeat().batch(4).to_iter_dataset()
    iterator = iter(dataset)
    next(iterator)
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, save_interval_steps=1)
    assert ckpt.save(1, state, iterator)
    ckpt.wait()
    expected_next = next(iterator)
    for target in ("data8", "one_device"):
        setup = one_step[target][0]
        restored_iterator = iter(dataset)
        restored = ckpt.restore(setup.abstract_with_shardings(), restored_iterator)
        for got, want in _tree_pairs(restored, state):
            np.testing.assert_array_equal(got, want)
        assert restored.params["head"]["kernel"].sharding == setup.state_shardings.params["head"]["kernel"]
        np.testing.assert_array_equal(next(restored_iterator), expected_next)
    ckpt.close()


def test_init_from_loads_parameters_only_and_keeps_mismatched_leaves(one_step, tmp_path):
    setup, stepped, _ = one_step["data2_fsdp4"]
    initial = one_step["initial"]
    # The source run classified 7 classes: its head cannot be loaded, everything else can.
    source = jax.device_get(stepped)
    width = source.params["head"]["kernel"].shape[0]
    params = dict(source.params, head={"kernel": np.ones((width, 7), np.float32), "bias": np.ones((7,), np.float32)})
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, source.replace(params=params))
    ckpt.close()
    loaded = init_params_from(str(tmp_path), setup, jax.device_put(initial, setup.state_shardings))
    for got, want in _tree_pairs(loaded.params["backbone"], source.params["backbone"]):
        np.testing.assert_array_equal(got, want)
    for got, want in _tree_pairs(loaded.params["head"], initial.params["head"]):
        np.testing.assert_array_equal(got, want)
    for got, want in _tree_pairs(loaded.opt_state, initial.opt_state):  # optimizer state stays fresh
        np.testing.assert_array_equal(got, want)
    assert int(loaded.step) == 0
    assert (
        loaded.params["backbone"]["patch_embed"]["kernel"].sharding
        == setup.state_shardings.params["backbone"]["patch_embed"]["kernel"]
    )


def test_init_from_converted_safetensors(one_step, tmp_path):
    """A file written by the released-checkpoint converter initialises the params; a 7-class head is skipped."""
    setup, stepped, _ = one_step["data2_fsdp4"]
    initial = one_step["initial"]
    source = jax.device_get(stepped).params
    width = source["head"]["kernel"].shape[0]
    path = str(tmp_path / "converted.safetensors")
    save_flax_params(dict(source, head={"kernel": np.ones((width, 7), np.float32)}), path)
    loaded = init_params_from(path, setup, jax.device_put(initial, setup.state_shardings))
    for got, want in _tree_pairs(loaded.params["backbone"], source["backbone"]):
        np.testing.assert_array_equal(got, want)
    for got, want in _tree_pairs(loaded.params["head"], initial.params["head"]):
        np.testing.assert_array_equal(got, want)


class _BatchNormNet(nn.Module):
    """A tiny BatchNorm CNN standing in for the peer backbones that carry a 'batch_stats' collection."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=(2, 2))(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.Dropout(0.2)(nn.relu(x).mean(axis=(1, 2)), deterministic=not train)
        return nn.Dense(self.num_classes)(x)


def test_batch_stats_are_updated_and_sharding_invariant(tmp_path):
    registry.register_model("test_batchnorm_net", _BatchNormNet)
    config = _run_config()
    config.model.name = "test_batchnorm_net"
    config.model.kwargs = {}
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.normal(2.0, 3.0, size=(16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=(16,)).astype(np.int32),
    }
    eval_batch = dict(batch, mask=np.asarray([1.0] * 12 + [0.0] * 4, np.float32))
    initial, outcomes = None, []
    for mesh_config, devices in (({"data": 1}, jax.devices()[:1]), ({"data": 4, "fsdp": 2}, None)):
        setup = build(
            config, sharding.create_mesh(mesh_config, devices), DIGITS_INFO, total_steps=20, steps_per_epoch=1.0
        )
        if initial is None:
            initial = jax.device_get(setup.init_state(0))
            assert set(initial.batch_stats) == {"BatchNorm_0"}
        state, _ = setup.train_step(
            jax.device_put(initial, setup.state_shardings),
            sharding.shard_batch(batch, setup.batch_sharding),
            setup.empty_train_accumulator(),
        )
        metrics = trainer.evaluate(setup, state, [eval_batch])
        outcomes.append((jax.device_get(state.batch_stats), {k: float(v) for k, v in metrics.items()}))
    (stats_one, eval_one), (stats_many, eval_many) = outcomes
    mean = stats_one["BatchNorm_0"]["mean"]
    assert not np.allclose(mean, initial.batch_stats["BatchNorm_0"]["mean"])  # statistics moved
    for got, want in _tree_pairs(stats_many, stats_one):  # global-batch statistics on any mesh
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for key in ("loss", "top1", "top5"):
        assert eval_many[key] == pytest.approx(eval_one[key], rel=1e-5, abs=1e-6)
    # A converted file with BatchNorm statistics ({'params', 'batch_stats'}, as the GroupMixFormer converter
    # writes) initialises both collections.
    path = str(tmp_path / "variables.safetensors")
    save_flax_params({"params": jax.device_get(state.params), "batch_stats": stats_many}, path)
    loaded = init_params_from(path, setup, jax.device_put(initial, setup.state_shardings))
    for got, want in _tree_pairs(loaded.params, state.params):
        np.testing.assert_array_equal(got, want)
    for got, want in _tree_pairs(loaded.batch_stats, stats_many):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------------
# Whole runs through train_and_evaluate on the digits quickstart.


@pytest.fixture(scope="module")
def data_dir(digits_dir):
    return digits_dir  # the session's prepared digits (tests/conftest.py)


def _restore_final(config, workdir: Path, step: int):
    mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = build(config, mesh, DIGITS_INFO, total_steps=config.num_train_steps, steps_per_epoch=1.0)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)))
    assert ckpt.latest_step() == step
    state = ckpt.restore(setup.abstract_with_shardings())
    ckpt.close()
    return state


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = _run_config(data_dir)
    return config, workdir, trainer.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_quickstart_smoke_run_writes_results(uninterrupted):
    _, workdir, results = uninterrupted
    on_disk = json.loads((workdir / "results.json").read_text())
    assert set(trainer.RESULT_KEYS) <= set(on_disk)
    assert on_disk["steps"] == 20
    assert on_disk["eval_num_examples"] == 360  # every eval image exactly once despite padding
    assert 0.15 < on_disk["top1"] <= on_disk["top5"] <= 1.0  # better than chance (0.1) after 20 steps
    assert np.isfinite(on_disk["loss"]) and on_disk["seconds"] > 0
    assert on_disk["top1"] == pytest.approx(results["top1"])
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "clusterformer_nano"
    assert list(workdir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_bitwise_identical(uninterrupted, tmp_path):
    """A run that starts from the uninterrupted run's step-10 checkpoint (train state and input position) ends
    bitwise equal to it: parameters, optimizer state and eval metrics. (The preemption paths that write such a
    checkpoint and exit, SIGTERM and the multi-host preemption service, are test_preemption's.)"""
    config, reference_dir, reference = uninterrupted
    workdir = tmp_path / "resumed"
    shutil.copytree(reference_dir / "checkpoints" / "10", workdir / "checkpoints" / "10")
    resumed = trainer.train_and_evaluate(config, str(workdir))
    assert resumed["steps"] == 20 and resumed["train_steps_this_run"] == 10
    assert (resumed["top1"], resumed["top5"], resumed["loss"]) == (
        reference["top1"],
        reference["top5"],
        reference["loss"],
    )
    for got, want in _tree_pairs(_restore_final(config, workdir, 20), _restore_final(config, reference_dir, 20)):
        np.testing.assert_array_equal(got, want)


class _PoisonedIterator:
    """Wraps a grain iterator and turns every image non-finite from batch ``start`` on (checkpointable)."""

    def __init__(self, inner, start: int):
        self._inner = inner
        self._start = start
        self._count = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self._inner))
        self._count += 1
        if self._count > self._start:
            batch["image"] = np.full_like(batch["image"], np.inf)
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"inner": self._inner.get_state(), "count": self._count}).encode()

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        self._inner.set_state(state["inner"])
        self._count = state["count"]

    def start_prefetch(self) -> None:
        if hasattr(self._inner, "start_prefetch"):
            self._inner.start_prefetch()

    def close(self) -> None:
        if hasattr(self._inner, "close"):
            self._inner.close()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    config = _run_config(data_dir)
    config.log_every_steps = 10  # the failure is caught by the check before the step-6 save
    config.checkpoint.every_steps = 2
    create = pipeline.create_train_iterator
    monkeypatch.setattr(pipeline, "create_train_iterator", lambda *a, **k: _PoisonedIterator(create(*a, **k), start=4))
    with pytest.raises(NonFiniteError) as error:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "at step 5" in message and "last good checkpoint: step 4" in message and "lr" in message
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path)))
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()
    state = _restore_final(config, tmp_path, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


# ----------------------------------------------------------------------------------------------------------
# Command line.


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.optim.lrr=1", "lrr"),
        ("--config.batch_size=abc", "batch_size"),
        ("--config.mesh.tensor=2", "tensor parallelism is not implemented; use data and fsdp"),
    ],
)
def test_bad_config_override_is_one_line_error(tmp_path, override, key):
    """Through the entry point's own parsing and checks, in this process (tests/entry_point.py; test_errors
    runs the one real ``python -m clusterformer_jax.main``)."""
    code, stderr = entry_point.run_main(
        [f"--config={REPO / 'configs' / 'quickstart.py'}", override, f"--workdir={tmp_path}"]
    )
    assert code != 0
    lines = stderr.strip().splitlines()
    assert lines and key in lines[-1]
    assert "Traceback" not in stderr


def test_imagenet_configs_follow_the_recipes():
    paper = load_config("clusterformer_tiny_imagenet.py")
    assert (paper.batch_size, paper.optim.base_lr, paper.optim.weight_decay) == (1024, 1e-3, 0.05)
    assert paper.classification.mixup_alpha == 0.8 and paper.classification.cutmix_alpha == 1.0
    assert paper.classification.label_smoothing == 0.1 and not paper.optim.amsgrad
    assert paper.input.eval_crop_pct == pytest.approx(224 / 248)
    total, per_epoch = trainer.resolve_run_lengths(paper, 1_281_167)
    assert total == int(300 * 1_281_167 / 1024) and per_epoch == pytest.approx(1_281_167 / 1024)
    tiny = load_config("clusterformer_tiny_imagenet.py", "official")
    assert tiny.model.name == "clusterformer_tiny_official" and tiny.optim.amsgrad
    assert (tiny.batch_size, tiny.optim.base_lr, tiny.optim.min_lr_ratio) == (256, 1.25e-4, 1e-4)
    assert tiny.optim.weight_decay_mask == "all" and tiny.classification.mixup_alpha == 0.0
    small = load_config("clusterformer_small_imagenet.py", "official")
    assert (small.batch_size, small.optim.base_lr, small.optim.min_lr_ratio) == (512, 1e-4, 1e-2)
    assert small.model.name == "clusterformer_small_official"


def test_checkpointer_accepts_a_relative_directory(tmp_path, monkeypatch):
    """The README's quickstart passes a relative --workdir; Orbax itself only takes absolute paths."""
    monkeypatch.chdir(tmp_path)
    ckpt = checkpointing.Checkpointer("runs/rel/checkpoints", async_save=False)
    ckpt.save(3, {"w": np.arange(4.0)}, force=True)
    ckpt.close()
    assert ckpt.directory == str(tmp_path / "runs" / "rel" / "checkpoints")
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()


# ----------------------------------------------------------------------------------------------------------
# Input stall accounting.


class _GatedOutput:
    """Stands in for a dispatched step's output: ready once ``gate`` is set."""

    def __init__(self, gate: threading.Event):
        self._gate = gate

    def block_until_ready(self):
        self._gate.wait()
        return self


def test_step_clock_counts_only_idle_device_time():
    clock = StepClock()
    gate = threading.Event()
    start = time.time()
    clock.dispatched(1, _GatedOutput(gate))
    # The batch for step 2 arrived while step 1 still ran: the wait overlapped the step, no stall.
    assert clock.stall(1, start, start + 0.25) == 0.0
    gate.set()
    deadline = time.time() + 10
    while clock.stall(1, start, time.time()) == 0.0 and time.time() < deadline:
        time.sleep(0.001)
    end = time.time()
    stall = clock.stall(1, start, end)
    assert 0.0 < stall <= end - start  # only the part of the wait after step 1 finished
    # A wait that began after step 1 had finished is idle time from start to end.
    assert clock.stall(1, end + 1.0, end + 1.5) == pytest.approx(0.5)
    # The clock has not seen step 2 finish: no stall is charged against it.
    assert clock.stall(2, end, end + 1.0) == 0.0
    clock.close()
