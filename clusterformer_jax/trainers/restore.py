"""Where a run's train state comes from: the workdir's checkpoint, ``config.resume``, ``config.init_from``
(parameters only, from another run's checkpoint or a converted ``.safetensors`` file) or scratch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import ml_collections
from absl import logging

from clusterformer_jax import checkpointing
from clusterformer_jax import convert
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.trainers.setup import Setup, TrainState


def restore_or_init(
    config: ml_collections.ConfigDict, setup: Setup, ckpt: checkpointing.Checkpointer, train_iter: Any
) -> tuple[TrainState, str]:
    """The train state from (in order) the workdir's checkpoint, ``config.resume``, ``config.init_from``
    (parameters only) or scratch, and where it came from; the iterator is restored alongside a full state."""
    abstract = setup.abstract_with_shardings()
    if ckpt.latest_step() is not None:
        return ckpt.restore(abstract, train_iter), f"workdir checkpoint (step {ckpt.latest_step()})"
    if config.resume:
        source, step = checkpointing.open_readonly(config.resume)
        state = source.restore(abstract, train_iter, step)
        source.close()
        return state, f"resume={config.resume} (step {step})"
    state = setup.init_state(config.seed)
    if config.init_from:
        return init_params_from(config.init_from, setup, state), f"init_from={config.init_from}"
    return state, "scratch"


def _wanted_fields(state: TrainState) -> tuple[str, ...]:
    return ("params", "batch_stats") if state.batch_stats else ("params",)


def _log_skipped(skipped: list[str]) -> None:
    if skipped:
        logging.warning(
            "init_from: %d leaves keep their fresh init (missing or shape differs): %s",
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )


def _merged(state: TrainState, loaded: Mapping[str, Any]) -> TrainState:
    """``state`` with the leaves of ``loaded`` ({field: partial tree}) put in place."""
    replaced = {}
    for field, subtree in loaded.items():
        merged = flax.traverse_util.flatten_dict(getattr(state, field), sep="/")
        merged.update(flax.traverse_util.flatten_dict(subtree, sep="/"))
        replaced[field] = flax.traverse_util.unflatten_dict(merged, sep="/")
    return state.replace(**replaced)


def init_params_from(path: str, setup: Setup, state: TrainState) -> TrainState:
    """Loads parameters (and BatchNorm statistics) from another run's checkpoint or a converted file.

    Leaves whose shape differs from this model (e.g. a classifier head for another number of classes) or
    that the source lacks keep their fresh initialisation and are logged; the optimizer state stays fresh.
    """
    if path.endswith(".safetensors"):
        return _init_from_converted(path, setup, state)
    ckpt, step = checkpointing.open_readonly(path)
    target = setup.abstract_with_shardings()
    stored = ckpt.item_shapes(step)
    keep, skipped = {}, []
    for field in _wanted_fields(state):
        stored_field = stored.get(field, {}) if isinstance(stored, Mapping) else {}
        flat = flax.traverse_util.flatten_dict(getattr(target, field), sep="/")
        stored_flat = flax.traverse_util.flatten_dict(stored_field, sep="/") if stored_field else {}
        kept = {k: v for k, v in flat.items() if k in stored_flat and tuple(stored_flat[k]) == tuple(v.shape)}
        skipped += [f"{field}/{k}" for k in flat if k not in kept]
        if kept:
            keep[field] = flax.traverse_util.unflatten_dict(kept, sep="/")
    if not keep:
        raise ConfigError(f"init_from={path!r}: no parameter of this model matches the checkpoint")
    restored = ckpt.restore_subtree(keep, step)
    ckpt.close()
    _log_skipped(skipped)
    logging.info("Initialised %s from %s (step %d)", ", ".join(keep), path, step)
    return _merged(state, {field: restored[field] for field in keep})


def _init_from_converted(path: str, setup: Setup, state: TrainState) -> TrainState:
    """Variables from a released checkpoint converted by ``clusterformer_jax.convert`` (Flax-path keys)."""
    stored = convert.load_variables(path)
    loaded, skipped, count = {}, [], 0
    for field in _wanted_fields(state):
        file_flat = flax.traverse_util.flatten_dict(stored.get(field, {}), sep="/")
        current = flax.traverse_util.flatten_dict(getattr(state, field), sep="/")
        shardings = flax.traverse_util.flatten_dict(getattr(setup.state_shardings, field), sep="/")
        kept = {
            k: jax.device_put(file_flat[k].astype(v.dtype), shardings[k])
            for k, v in current.items()
            if k in file_flat and file_flat[k].shape == v.shape
        }
        skipped += [f"{field}/{k}" for k in current if k not in kept]
        if kept:
            loaded[field] = flax.traverse_util.unflatten_dict(kept, sep="/")
            count += len(kept)
    if "params" not in loaded:
        raise ConfigError(f"init_from={path!r}: no parameter of this model matches the file")
    _log_skipped(skipped)
    logging.info("Initialised %s (%d leaves) from %s", ", ".join(loaded), count, path)
    return _merged(state, loaded)
