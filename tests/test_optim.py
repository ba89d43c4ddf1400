"""Learning-rate schedule, weight-decay mask, AMSGrad and clipping, checked against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clusterformer_jax import optim
from clusterformer_jax.errors import ConfigError


def _optim_cfg(**overrides):
    cfg = dict(
        base_lr=0.1,
        lr_base_batch_size=0,
        warmup_steps=0,
        warmup_epochs=0.0,
        warmup_start_ratio=0.0,
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        amsgrad=False,
        weight_decay=0.0,
        weight_decay_mask="all",
        grad_clip_norm=0.0,
    )
    cfg.update(overrides)
    return cfg


def test_schedule_values_at_known_steps():
    schedule = optim.create_learning_rate_schedule(
        2.0, total_steps=110, warmup=10, warmup_start_ratio=0.1, min_lr_ratio=0.01
    )
    assert float(schedule(0)) == pytest.approx(0.2)  # warmup start: 2.0 * 0.1
    assert float(schedule(5)) == pytest.approx(1.1)  # halfway up the linear warmup
    assert float(schedule(10)) == pytest.approx(2.0)  # end of warmup: the peak
    assert float(schedule(60)) == pytest.approx((2.0 + 0.02) / 2)  # cosine midpoint
    assert float(schedule(110)) == pytest.approx(0.02)  # end: peak * min ratio
    assert float(schedule(85)) == pytest.approx(0.02 + (2.0 - 0.02) * (1 + math.cos(math.pi * 0.75)) / 2)


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.create_learning_rate_schedule(1.0, total_steps=10, warmup=0, min_lr_ratio=0.0)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-7)


def test_schedule_cuts_warmup_longer_than_run():
    schedule = optim.create_learning_rate_schedule(1.0, total_steps=10, warmup=50, warmup_start_ratio=0.0)
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        optim.create_learning_rate_schedule(1.0, total_steps=10, warmup=-1)


def test_learning_rate_batch_scaling_and_warmup_epochs():
    assert optim.peak_learning_rate(_optim_cfg(base_lr=1e-3, lr_base_batch_size=256), 1024) == pytest.approx(4e-3)
    assert optim.peak_learning_rate(_optim_cfg(base_lr=1e-3, lr_base_batch_size=0), 1024) == pytest.approx(1e-3)
    assert optim.warmup_steps(_optim_cfg(warmup_steps=-1, warmup_epochs=20.0), 1281167 / 1024) == 25023
    assert optim.warmup_steps(_optim_cfg(warmup_steps=50, warmup_epochs=20.0), 10.0) == 50


PARAMS = {
    "patch_embed": {"kernel": jnp.ones((4, 4, 3, 8)), "bias": jnp.ones((8,))},
    "block": {
        "norm1": {"scale": jnp.ones((8,)), "bias": jnp.ones((8,))},
        "mlp": {"fc1": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones((16,))}},
        "layer_scale_1": jnp.ones((8,)),
        "sim_alpha": jnp.ones((1,)),
    },
    "head_norm": {"scale": jnp.ones((8,))},
    "head": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones((10,))},
}


def test_weight_decay_mask_selects_kernels_only():
    mask = optim.weight_decay_mask(PARAMS, "no_bias_norm")
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == [
        "['block']['mlp']['fc1']['kernel']",
        "['head']['kernel']",
        "['patch_embed']['kernel']",
    ]
    assert all(jax.tree.leaves(optim.weight_decay_mask(PARAMS, "all")))
    with pytest.raises(ConfigError):
        optim.weight_decay_mask(PARAMS, "bogus")


def test_weight_decay_applies_to_masked_leaves_only():
    # Zero gradients: the Adam part is exactly 0, so the update is -lr * wd * p on decayed leaves.
    params = {"fc": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
    tx = optim.create_optimizer(_optim_cfg(weight_decay=0.5, weight_decay_mask="no_bias_norm"), 0.1)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["fc"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(new["fc"]["bias"], 2.0, rtol=1e-6)


def _run_scalar(tx, grads, p0=1.0):
    params = jnp.asarray(p0, jnp.float32)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
    return float(params)


def test_amsgrad_matches_hand_computed_two_steps_and_differs_from_adam():
    lr, b1, b2, eps = 0.1, 0.9, 0.9, 1e-8
    grads = [1.0, 0.01]  # the second step's raw second moment (0.09001) falls below the first's (0.1)
    ams = _run_scalar(optim.create_optimizer(_optim_cfg(base_lr=lr, b2=b2, amsgrad=True), lr), grads)
    adam = _run_scalar(optim.create_optimizer(_optim_cfg(base_lr=lr, b2=b2), lr), grads)

    # PyTorch AdamW(amsgrad=True), by hand.
    p, m, v, v_max = 1.0, 0.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        v_max = max(v_max, v)
        p -= lr * (m / (1 - b1**t)) / (math.sqrt(v_max) / math.sqrt(1 - b2**t) + eps)
    assert 1.0 - ams == pytest.approx(1.0 - p, rel=1e-5)
    # Step 1: both move by lr * 1; step 2: denominators sqrt(v_max) vs sqrt(v) differ by about 5%.
    assert abs(ams - adam) > 1e-3
    # Plain Adam by hand for the same two steps.
    p, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    assert 1.0 - adam == pytest.approx(1.0 - p, rel=1e-5)


def test_gradient_clipping_scales_to_max_norm():
    # b1 = b2 = 0 and eps = 1 make the Adam step g / (|g| + 1), which is not scale invariant, so the
    # update reveals whether the gradient (norm 50) was clipped to norm 5 first.
    params = {"w": jnp.zeros((2,))}
    grads = {"w": jnp.asarray([30.0, 40.0])}
    cfg = _optim_cfg(b1=0.0, b2=0.0, eps=1.0, grad_clip_norm=5.0)
    tx = optim.create_optimizer(cfg, 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-3.0 / 4.0, -4.0 / 5.0], rtol=1e-6)
    clipped, _ = optax.clip_by_global_norm(5.0).update(grads, None)
    assert float(optax.tree.norm(clipped)) == pytest.approx(5.0)
    tx = optim.create_optimizer(_optim_cfg(b1=0.0, b2=0.0, eps=1.0, grad_clip_norm=0.0), 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-30.0 / 31.0, -40.0 / 41.0], rtol=1e-6)


def test_create_optimizer_and_schedule_uses_scaled_peak():
    cfg = _optim_cfg(base_lr=1e-3, lr_base_batch_size=256, warmup_steps=10, warmup_start_ratio=0.0, min_lr_ratio=0.0)
    _, schedule = optim.create_optimizer_and_schedule(cfg, total_steps=100, steps_per_epoch=5.0, global_batch_size=512)
    assert float(schedule(10)) == pytest.approx(2e-3)
    assert float(schedule(0)) == pytest.approx(0.0)
