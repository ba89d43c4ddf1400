"""Options that trade memory or precision without changing what is learned: gradient accumulation inside the
one jitted step (k micro-batches = one k-times batch) and bfloat16 compute with float32 parameters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax import sharding
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.models import registry
from clusterformer_jax.trainers import setup as setup_lib
from tests import load_config, presets

INFO = {"num_classes": 10, "num_train": 1437, "num_eval": 360, "image_size": 16}


class _GroupNormNet(nn.Module):
    """Conv -> GroupNorm -> GELU -> pool -> Dense: normalisation inside each example only (no BatchNorm)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.gelu(nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3), strides=(2, 2))(images)))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


registry.register_model("grad_accum_test_net", _GroupNormNet)


def _config(accum: int, batch: int = 32):
    config = load_config("quickstart.py")
    config.model.name = "grad_accum_test_net"
    config.batch_size = batch
    config.grad_accum_steps = accum
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 1.0  # clipping sees the accumulated (full-batch) gradient
    config.classification.mixup_alpha = 0.8  # mixed on the whole batch before it is split
    config.classification.cutmix_alpha = 1.0
    return config


def _step(config, batch):
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    setup = setup_lib.build(config, mesh, INFO, total_steps=10, steps_per_epoch=10.0)
    state = setup.init_state(0)
    batch = sharding.shard_batch(batch, setup.batch_sharding)
    for _ in range(2):
        state, acc = setup.train_step(state, batch, setup.empty_train_accumulator())
    return state, acc[0].compute()


def test_micro_batches_give_the_parameters_of_one_full_batch():
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=(32,)).astype(np.int32),
    }
    full_state, full_metrics = _step(_config(1), batch)
    micro_state, micro_metrics = _step(_config(4), batch)
    for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(micro_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    # the metrics see the same per-example values in the same order
    for key in ("loss", "top1", "grad_norm"):
        np.testing.assert_allclose(float(micro_metrics[key]), float(full_metrics[key]), rtol=1e-5)


@pytest.mark.parametrize("accum", [0, 3])
def test_micro_batches_must_split_the_batch_over_the_mesh(accum):
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    with pytest.raises(ConfigError, match=f"grad_accum_steps={accum} must be >= 1 and split batch_size=32"):
        setup_lib.build(_config(accum), mesh, INFO, total_steps=10, steps_per_epoch=10.0)


def test_split_and_merge_keep_batch_order():
    rows = jnp.arange(24).reshape(12, 2)
    micro = setup_lib.split_micro_batches(rows, 3)
    assert micro.shape == (3, 4, 2) and micro[1, 0, 0] == 2  # micro-batch 1 starts at row 1
    np.testing.assert_array_equal(setup_lib.merge_micro_values(micro), rows)
    assert float(setup_lib.merge_micro_values(jnp.array([1.0, 2.0, 6.0]))) == 3.0


@pytest.mark.slow
def test_bfloat16_compute_follows_the_float32_loss_curve(digits_dir):
    """20 steps of the tiny classification preset (tests/presets.py: clusterformer_nano on digits, batch 16, every
    random op on) on one device with bfloat16 compute and float32 parameters, from the same initial state: the
    loss curve, averaged over windows of 10 steps, stays within 0.05 of the float32 one (about 2% of the starting
    loss), and the parameters and optimizer state stay float32. The float32 step is test_trainer's one-device
    reference program, which the run-wide compilation cache serves."""
    from clusterformer_jax.data import pipeline

    curves, initial = {}, None
    for dtype in ("float32", "bfloat16"):
        config = presets.tiny_classification_config(digits_dir)
        config.model.kwargs.dtype = dtype
        mesh = sharding.create_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
        setup = setup_lib.build(config, mesh, presets.DIGITS_INFO, total_steps=20, steps_per_epoch=1.0)
        if initial is None:  # parameters are float32 in both; the steps donate their state, so keep a host copy
            initial = jax.device_get(setup.init_state(0))
        state = jax.device_put(initial, setup.state_shardings)
        batches = pipeline.create_train_iterator(config.input, seed=0, global_batch_size=16)
        losses = []
        for _ in range(20):
            batch = sharding.shard_batch(next(batches), setup.batch_sharding)
            state, acc = setup.train_step(state, batch, setup.empty_train_accumulator())
            losses.append(float(acc[0].compute()["loss"]))
        dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state)) if leaf.ndim}
        assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
        curves[dtype] = np.asarray(losses).reshape(-1, 10).mean(axis=1)
    assert curves["float32"][-1] < 0.75 * curves["float32"][0]  # it learns (2.17 -> 1.51)
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], atol=0.05)
