"""Optimizer and learning-rate schedule: AdamW (optionally AMSGrad), linear warmup + cosine, clipping.

Reads ``config.optim``:
  base_lr, lr_base_batch_size (> 0: lr = base_lr * global_batch / lr_base_batch_size),
  warmup_steps (or warmup_epochs when warmup_steps < 0), warmup_start_ratio, min_lr_ratio,
  b1, b2, eps, amsgrad, weight_decay, weight_decay_mask ('all' | 'no_bias_norm'), grad_clip_norm (<= 0: off),
  lr_multipliers ({parameter path prefix: factor}, e.g. {'backbone': 0.1} as dense recipes use; 1.0 = off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging

from clusterformer_jax.errors import ConfigError

WEIGHT_DECAY_MASKS = ("all", "no_bias_norm")
# Leaf or module names (lower case substrings) that 'no_bias_norm' never decays.
_NO_DECAY_MARKERS = ("bias", "norm", "scale", "gamma", "pos_embed")


def peak_learning_rate(optim: Mapping[str, Any], global_batch_size: int) -> float:
    """``base_lr``, linearly rescaled by ``global_batch_size / lr_base_batch_size`` when that is > 0."""
    lr = float(optim["base_lr"])
    base_batch = int(optim.get("lr_base_batch_size", 0) or 0)
    if base_batch > 0:
        lr = lr * global_batch_size / base_batch
    return lr


def warmup_steps(optim: Mapping[str, Any], steps_per_epoch: float) -> int:
    """``warmup_steps`` when >= 0, else ``round(warmup_epochs * steps_per_epoch)``."""
    steps = int(optim.get("warmup_steps", -1))
    if steps >= 0:
        return steps
    return int(round(float(optim.get("warmup_epochs", 0.0)) * steps_per_epoch))


def create_learning_rate_schedule(
    peak_lr: float,
    total_steps: int,
    warmup: int,
    *,
    warmup_start_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from ``peak_lr * warmup_start_ratio`` to ``peak_lr`` over ``warmup`` steps, then cosine
    decay to ``peak_lr * min_lr_ratio`` at ``total_steps`` (a warmup longer than the run is cut to the run):
    ``optax.warmup_cosine_decay_schedule``, whose init_value / end_value are peak_lr times the two ratios."""
    if total_steps <= 0:
        raise ConfigError(f"the number of training steps must be positive, got {total_steps}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0 steps, got {warmup}")
    if warmup > total_steps:
        logging.warning("warmup (%d steps) is longer than the run; shortened to %d steps", warmup, total_steps)
        warmup = total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=peak_lr * warmup_start_ratio,
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=warmup + max(total_steps - warmup, 1),  # optax counts the warmup in the decay steps
        end_value=peak_lr * min_lr_ratio,
    )


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)).lower())
                break
    return names


def weight_decay_mask(params: Any, mode: str) -> Any:
    """Pytree of bools: which leaves get weight decay.

    'all' decays every parameter (the released mmcls recipe); 'no_bias_norm' skips 1-D and scalar leaves and
    any leaf whose name or enclosing module name mentions a bias, norm, scale or layer scale.
    """
    if mode not in WEIGHT_DECAY_MASKS:
        raise ConfigError(f"optim.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got {mode!r}")

    def decay(path, leaf) -> bool:
        if mode == "all":
            return True
        if jnp.ndim(leaf) <= 1:
            return False
        names = _path_names(path)
        leaf_name = names[-1] if names else ""
        module = names[-2] if len(names) > 1 else ""
        return not any(m in leaf_name or m in module for m in _NO_DECAY_MARKERS)

    return jax.tree_util.tree_map_with_path(decay, params)


class ScaleByAmsgradTorchState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_amsgrad_torch(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AMSGrad as ``torch.optim.AdamW(amsgrad=True)`` computes it (the released recipe's optimizer).

    PyTorch keeps the running maximum of the *raw* second moment and bias-corrects it with the current step:
    ``m_hat / (sqrt(max_t v_t) / sqrt(1 - b2^t) + eps)``. ``optax.scale_by_amsgrad`` instead takes the
    maximum of the already bias-corrected moments, which differs from step 2 on.
    """

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return ScaleByAmsgradTorchState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        t = count.astype(jnp.float32)
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        new_updates = jax.tree.map(
            lambda m, vm: (m / bc1.astype(m.dtype)) / (jnp.sqrt(vm) / jnp.sqrt(bc2).astype(vm.dtype) + eps),
            mu,
            nu_max,
        )
        return new_updates, ScaleByAmsgradTorchState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def _path_key(path: tuple[Any, ...]) -> str:
    return "/".join(_path_names(path))


def scale_by_param_group(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies the final update of every parameter under a path prefix (``'backbone'``, or
    ``'decoder/queries'``) by its factor: the learning rate *and* the decoupled weight decay of that group,
    as per-group learning rates in PyTorch optimizers scale both. Stateless, so checkpoints are unchanged.
    The longest matching prefix wins; a prefix that matches no parameter is a config error."""
    groups = {str(k).strip("/").lower(): float(v) for k, v in multipliers.items()}

    def factor(path) -> float:
        key = _path_key(path)
        hits = [p for p in groups if key == p or key.startswith(p + "/")]
        return groups[max(hits, key=len)] if hits else 1.0

    def init_fn(params):
        keys = [_path_key(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        for prefix in groups:
            if not any(k == prefix or k.startswith(prefix + "/") for k in keys):
                top = sorted({k.split("/")[0] for k in keys})
                raise ConfigError(
                    f"optim.lr_multipliers names {prefix!r}, which matches no parameter; top-level groups: {top}"
                )
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(optim: Mapping[str, Any], learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """clip_by_global_norm -> Adam/AMSGrad moments -> decoupled weight decay -> learning rate.

    Equivalent to PyTorch AdamW: ``p -= lr * (adam_update + wd * p)``.
    """
    parts = []
    clip = float(optim.get("grad_clip_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    b1, b2, eps = float(optim.get("b1", 0.9)), float(optim.get("b2", 0.999)), float(optim.get("eps", 1e-8))
    if optim.get("amsgrad", False):
        parts.append(scale_by_amsgrad_torch(b1, b2, eps))
    else:
        parts.append(optax.scale_by_adam(b1, b2, eps))
    wd = float(optim.get("weight_decay", 0.0) or 0.0)
    if wd > 0:
        mode = str(optim.get("weight_decay_mask", "all"))
        if mode not in WEIGHT_DECAY_MASKS:
            raise ConfigError(f"optim.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got {mode!r}")
        mask = None if mode == "all" else (lambda params: weight_decay_mask(params, mode))
        parts.append(optax.add_decayed_weights(wd, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    multipliers = {k: float(v) for k, v in dict(optim.get("lr_multipliers", None) or {}).items() if float(v) != 1.0}
    if multipliers:
        parts.append(scale_by_param_group(multipliers))
    return optax.chain(*parts)


def create_optimizer_and_schedule(
    optim: Mapping[str, Any], *, total_steps: int, steps_per_epoch: float, global_batch_size: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimizer and its learning-rate schedule (the schedule is also logged per step)."""
    schedule = create_learning_rate_schedule(
        peak_learning_rate(optim, global_batch_size),
        total_steps,
        warmup_steps(optim, steps_per_epoch),
        warmup_start_ratio=float(optim.get("warmup_start_ratio", 0.0)),
        min_lr_ratio=float(optim.get("min_lr_ratio", 0.0)),
    )
    return create_optimizer(optim, schedule), schedule
