"""Where a run's train state comes from: the workdir's checkpoint, ``config.resume``, ``config.init_from``
(parameters only, from another run's checkpoint or a converted ``.safetensors`` file) or scratch.

``init_from`` must fit the model: every backbone parameter (every parameter, for a model without a
'backbone' part) must be in the source with the same shape; heads and decoders may start fresh (fine-tuning
on other classes, a dense model from a classifier). Anything else is a checkpoint of another model and
stops the run with one line, unless ``config.init_from_partial=True`` asks to load what fits, which is then
listed. ``check_sources`` runs these checks on shapes alone, before the run writes anything.

A workdir whose only checkpoints are unreadable ones an earlier run moved aside (``<step>.corrupt-<n>``)
stops the run (``check_workdir_checkpoints``) instead of silently starting over beside them, unless
``config.restart_from_scratch=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import ml_collections
from absl import logging
from etils import epath

from clusterformer_jax import checkpointing
from clusterformer_jax import convert
from clusterformer_jax.errors import InitFromError, PathError, one_line
from clusterformer_jax.trainers.setup import Setup, TrainState

_FORMS = "a run's workdir, its checkpoints/ directory, one step's directory"
_CONVERT_HINT = "python -m clusterformer_jax.convert.mmcls_clusterformer (or another converter)"


def restore_or_init(
    config: ml_collections.ConfigDict, setup: Setup, ckpt: checkpointing.Checkpointer, train_iter: Any
) -> tuple[TrainState, str]:
    """The train state from (in order) the workdir's checkpoint, ``config.resume``, ``config.init_from``
    (parameters only) or scratch, and where it came from; the iterator is restored alongside a full state."""
    abstract = setup.abstract_with_shardings()
    if ckpt.latest_step() is not None:
        return ckpt.restore(abstract, train_iter), f"workdir checkpoint (step {ckpt.latest_step()})"
    check_workdir_checkpoints(config, ckpt.directory)
    if config.resume:
        source, step = _open_checkpoint(config.resume, "resume")
        state = source.restore(abstract, train_iter, step)
        source.close()
        return state, f"resume={config.resume} (step {step})"
    state = setup.init_state(config.seed)
    if config.init_from:
        partial = bool(config.get("init_from_partial", False))
        return init_params_from(config.init_from, setup, state, partial=partial), f"init_from={config.init_from}"
    return state, "scratch"


def set_aside_only(directory: str) -> list[str]:
    """The ``<step>.corrupt-<n>`` names in ``directory`` when it holds no committed step (else [])."""
    path = epath.Path(directory)
    if not path.is_dir():
        return []
    names = [p.name for p in path.iterdir()]
    if any(name.isdigit() for name in names):
        return []
    suffix = checkpointing.CORRUPT_SUFFIX
    return sorted(n for n in names if suffix in n and n.split(suffix, 1)[0].isdigit())


def check_workdir_checkpoints(config: ml_collections.ConfigDict, directory: str) -> None:
    """Raises ``CheckpointError`` (one line) when the only checkpoints in ``directory`` are unreadable ones set
    aside by an earlier run, unless ``config.restart_from_scratch``; then says in one line that it starts over."""
    aside = set_aside_only(directory)
    if not aside:
        return
    names = ", ".join(aside[:4]) + (f" and {len(aside) - 4} more" if len(aside) > 4 else "")
    if config.get("restart_from_scratch", False):
        logging.warning("restart_from_scratch=True: starting over in %s beside the unreadable %s", directory, names)
        return
    raise checkpointing.CheckpointError(
        f"the only checkpoints in {directory} are unreadable ones an earlier run set aside ({names}), so this run "
        "would start over: move them away (or repair them and drop the suffix) to resume, or pass "
        "--config.restart_from_scratch=True to start over beside them"
    )


def _wanted_fields(state: TrainState) -> tuple[str, ...]:
    return ("params", "batch_stats") if state.batch_stats else ("params",)


def _open_checkpoint(path: str, what: str) -> tuple[checkpointing.Checkpointer, int]:
    """A read-only checkpoint and its step, or a one-line error naming ``what`` (the config field)."""
    if not os.path.exists(path):
        raise PathError(f"{what}={path!r} does not exist; pass {_FORMS}")
    if os.path.isfile(path):
        extra = " (parameters only: use init_from)" if path.endswith(".safetensors") and what == "resume" else ""
        raise PathError(f"{what}={path!r} is a file{extra}; pass {_FORMS}")
    try:
        return checkpointing.open_readonly(path)
    except FileNotFoundError:
        raise PathError(f"{what}={path!r} holds no checkpoint; pass {_FORMS}") from None


def _safetensors_shapes(path: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{field: {'a/b/kernel': shape}} from a converted file's header (nothing loaded), as ``load_variables``
    splits it."""
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    try:
        with safe_open(path, framework="np") as f:
            flat = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # pylint: disable=broad-except
        raise InitFromError(
            f"init_from={path!r} is not a readable safetensors file ({one_line(e)}); convert the released "
            f"checkpoint again with {_CONVERT_HINT}"
        ) from None
    tops = {key.split("/", 1)[0] for key in flat}
    if "params" in tops and tops <= {"params", "batch_stats"}:
        split: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in flat.items():
            field, rest = key.split("/", 1)
            split.setdefault(field, {})[rest] = shape
        return split
    return {"params": flat}


def source_shapes(path: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{field: {flat key: shape}} of an ``init_from`` source (checkpoint metadata or safetensors header)."""
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        raise PathError(
            f"init_from={path!r} is a file but not .safetensors; pass {_FORMS}, or a .safetensors file "
            f"written by {_CONVERT_HINT}"
        )
    if path.endswith(".safetensors") and os.path.isfile(path):
        return _safetensors_shapes(path)
    ckpt, step = _open_checkpoint(path, "init_from")
    try:
        stored = ckpt.item_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
        raise InitFromError(f"init_from={path!r}: cannot read step {step}'s metadata ({one_line(e)})") from None
    finally:
        ckpt.close()
    if not isinstance(stored, Mapping):
        raise InitFromError(f"init_from={path!r}: step {step} holds no train state")
    return {
        field: flax.traverse_util.flatten_dict(stored[field], sep="/") if stored.get(field) else {}
        for field in ("params", "batch_stats")
    }


def plan_init_from(
    path: str, abstract: TrainState, model_name: str, partial: bool
) -> tuple[dict[str, list[str]], list[str]]:
    """({field: keys to load}, 'field/key' left fresh) for ``init_from=path``; raises ``InitFromError``
    naming the first misfit when the source is another model's and ``partial`` is False."""
    stored = source_shapes(path)
    load: dict[str, list[str]] = {}
    fresh: list[str] = []
    required, misfits = 0, []
    for field in _wanted_fields(abstract):
        flat = flax.traverse_util.flatten_dict(getattr(abstract, field), sep="/")
        have = stored.get(field, {})
        backbone = [k for k in flat if k.startswith("backbone/")]
        must = set(backbone) if backbone else set(flat)
        load[field] = [k for k in flat if k in have and tuple(have[k]) == tuple(flat[k].shape)]
        fitting = set(load[field])
        fresh += [f"{field}/{k}" for k in flat if k not in fitting]
        required += len(must)
        misfits += [(f"{field}/{k}", have.get(k), tuple(flat[k].shape)) for k in flat if k in must and k not in fitting]
    loaded = sum(len(v) for v in load.values())
    if misfits and not partial:
        key, theirs, ours = misfits[0]
        what = "missing" if theirs is None else f"shape {tuple(theirs)}, model {ours}"
        raise InitFromError(
            f"init_from={path!r} is not a checkpoint of {model_name}: {len(misfits)} of its {required} "
            f"{'backbone ' if any(k.startswith('params/backbone/') for k, _, _ in misfits) else ''}parameters "
            f"do not fit (first {key}: {what}); pass a checkpoint of {model_name}, or "
            f"--config.init_from_partial=True to load the {loaded} that fit"
        )
    if not loaded or "params" not in {f for f, keys in load.items() if keys}:
        raise InitFromError(f"init_from={path!r}: no parameter of {model_name} is in it; pass a checkpoint of it")
    return {field: keys for field, keys in load.items() if keys}, fresh


def check_sources(config: ml_collections.ConfigDict, abstract: TrainState) -> None:
    """``config.resume`` and ``config.init_from`` checked on shapes alone (nothing restored, nothing written)."""
    if config.resume:
        ckpt, _ = _open_checkpoint(config.resume, "resume")
        ckpt.close()
    elif config.init_from:
        plan_init_from(config.init_from, abstract, config.model.name, bool(config.get("init_from_partial", False)))


def _names(keys: list[str], every: bool) -> str:
    """All of ``keys`` (a partial load the user asked for), or the first 8 and how many more."""
    shown = len(keys) if every else 8
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _log_plan(path: str, load: Mapping[str, list[str]], fresh: list[str], partial: bool) -> None:
    loaded = [f"{field}/{key}" for field, keys in load.items() for key in keys]
    if not fresh:
        logging.info("init_from=%s: loaded all %d leaves", path, len(loaded))
        return
    logging.info("init_from=%s: loaded %d leaves: %s", path, len(loaded), _names(loaded, partial))
    (logging.warning if partial else logging.info)(
        "init_from=%s: %d leaves keep their fresh init (missing or shape differs): %s",
        path,
        len(fresh),
        _names(fresh, partial),
    )


def _merged(state: TrainState, loaded: Mapping[str, Any]) -> TrainState:
    """``state`` with the leaves of ``loaded`` ({field: partial tree}) put in place."""
    replaced = {}
    for field, subtree in loaded.items():
        merged = flax.traverse_util.flatten_dict(getattr(state, field), sep="/")
        merged.update(flax.traverse_util.flatten_dict(subtree, sep="/"))
        replaced[field] = flax.traverse_util.unflatten_dict(merged, sep="/")
    return state.replace(**replaced)


def init_params_from(path: str, setup: Setup, state: TrainState, *, partial: bool = False) -> TrainState:
    """Loads parameters (and BatchNorm statistics) from another run's checkpoint or a converted file.

    The source must fit the model (module docstring); leaves outside the backbone that it lacks or shapes
    differently (e.g. a classifier head for another number of classes) keep their fresh initialisation,
    and so does everything that does not fit when ``partial``. The optimizer state stays fresh.
    """
    target = setup.abstract_with_shardings()
    load, fresh = plan_init_from(path, target, setup.config.model.name, partial)
    if path.endswith(".safetensors") and os.path.isfile(path):
        stored = convert.load_variables(path)
        loaded = {}
        for field, keys in load.items():
            file_flat = flax.traverse_util.flatten_dict(stored[field], sep="/")
            current = flax.traverse_util.flatten_dict(getattr(state, field), sep="/")
            shardings = flax.traverse_util.flatten_dict(getattr(setup.state_shardings, field), sep="/")
            kept = {k: jax.device_put(file_flat[k].astype(current[k].dtype), shardings[k]) for k in keys}
            loaded[field] = flax.traverse_util.unflatten_dict(kept, sep="/")
    else:
        ckpt, step = _open_checkpoint(path, "init_from")
        keep = {}
        for field, keys in load.items():
            flat = flax.traverse_util.flatten_dict(getattr(target, field), sep="/")
            keep[field] = flax.traverse_util.unflatten_dict({k: flat[k] for k in keys}, sep="/")
        try:
            loaded = ckpt.restore_subtree(keep, step)
        finally:
            ckpt.close()
        loaded = {field: loaded[field] for field in keep}
    _log_plan(path, load, fresh, partial)
    return _merged(state, loaded)
