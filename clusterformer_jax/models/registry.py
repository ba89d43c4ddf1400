"""Model registry: ``create_model(name, **overrides)``, ``model_fields(name)`` and ``list_models()``.

Every family's module lists its presets (``PRESETS``: name -> constructor fields); this table is the one
place that collects them, so model modules never import the registry. Overrides are checked against the
model's fields, so a typo in ``config.model.kwargs`` fails with one line naming the field.

``create_model`` and ``create_backbone`` fill the execution fields the model has (``runtime.EXECUTION_FIELDS``:
depthwise_impl, remat_impl, em_unroll, group_chunk_bytes, norm_impl, dispatch_impl; same numbers, different speed)
with this machine's settings unless the caller passes them (None included), so ``create_model(name)`` in a
notebook runs as fast as through the trainer; the module classes themselves never read the machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

from clusterformer_jax import runtime
from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models import clusterformer, context_cluster, groupmixformer, paca_vit

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dataclass_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)) - {"parent", "name"}


# family: (builder taking the flat fields, the fields it accepts, its presets)
_FAMILIES: Tuple[Tuple[Callable[..., nn.Module], frozenset[str], Dict[str, Dict[str, Any]]], ...] = (
    (clusterformer.from_fields, frozenset(clusterformer.FIELDS), clusterformer.PRESETS),
    (
        context_cluster.ContextClusterClassifier,
        _dataclass_fields(context_cluster.ContextClusterClassifier),
        context_cluster.PRESETS,
    ),
    (groupmixformer.GroupMixFormer, _dataclass_fields(groupmixformer.GroupMixFormer), groupmixformer.PRESETS),
    (paca_vit.PaCaViTClassifier, _dataclass_fields(paca_vit.PaCaViTClassifier), paca_vit.PRESETS),
)
_PRESETS = {
    name: (builder, fields, preset) for builder, fields, presets in _FAMILIES for name, preset in presets.items()
}


def list_models() -> list[str]:
    return sorted(_PRESETS)


def _entry(name: str):
    if name not in _PRESETS:
        raise ModelConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _PRESETS[name]


def model_fields(name: str) -> frozenset[str]:
    """The constructor fields ``create_model(name, **overrides)`` accepts."""
    return _entry(name)[1]


def with_machine_settings(fields: frozenset[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` plus this machine's execution settings (``runtime.execution_settings``) for the execution
    fields among ``fields`` that ``overrides`` does not name; a named one, even None, is the caller's choice
    (the trainer passes the settings it resolved, possibly for another machine)."""
    missing = [k for k in runtime.EXECUTION_FIELDS if k in fields and k not in overrides]
    if not missing:
        return overrides
    return {**runtime.with_execution_settings(missing, {}), **overrides}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds preset ``name`` with ``overrides`` (e.g. num_classes=10, num_iters=1, dtype='bfloat16') and this
    machine's execution settings for the execution fields that ``overrides`` leaves out."""
    builder, accepted, preset = _entry(name)
    fields = dict(preset, **with_machine_settings(accepted, overrides))
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise ModelConfigError(f"model {name!r} has no field {unknown[0]!r}; valid: {sorted(accepted)}")
    if isinstance(fields.get("dtype"), str):
        if fields["dtype"] not in _DTYPES:
            raise ModelConfigError(f"model dtype {fields['dtype']!r} is not one of {sorted(_DTYPES)}")
        fields["dtype"] = _DTYPES[fields["dtype"]]
    for key, value in fields.items():  # ConfigDict lists arrive as lists; modules want hashable tuples
        if isinstance(value, list):
            fields[key] = tuple(value)
    return builder(**fields)


def register_model(name: str, cls: type, **preset: Any) -> None:
    """Adds a preset of a flax module class (e.g. a user's own model) to the table."""
    _PRESETS[name] = (cls, _dataclass_fields(cls), preset)


def _clusterformer_backbone(**fields: Any) -> nn.Module:
    """``ClusterFormerBackbone`` from flat fields: mixer fields to its ``MixerConfig``, the rest to the module."""
    mixer_names = {f.name for f in dataclasses.fields(clusterformer.MixerConfig)}
    mixer = clusterformer.MixerConfig(**{k: v for k, v in fields.items() if k in mixer_names})
    rest = {k: v for k, v in fields.items() if k not in mixer_names}
    return clusterformer.ClusterFormerBackbone(mixer=mixer, **rest)


# classifier builder -> (backbone builder taking flat fields, the backbone's accepted fields)
_BACKBONES: Dict[Any, Tuple[Callable[..., nn.Module], frozenset[str]]] = {
    clusterformer.from_fields: (_clusterformer_backbone, frozenset(clusterformer.FIELDS) - {"num_classes", "head"}),
    context_cluster.ContextClusterClassifier: (
        context_cluster.ContextClusterBackbone,
        _dataclass_fields(context_cluster.ContextClusterBackbone),
    ),
    groupmixformer.GroupMixFormer: (
        groupmixformer.GroupMixFormerBackbone,
        _dataclass_fields(groupmixformer.GroupMixFormerBackbone),
    ),
    paca_vit.PaCaViTClassifier: (paca_vit.PaCaViTBackbone, _dataclass_fields(paca_vit.PaCaViTBackbone)),
}


def _backbone_entry(name: str):
    builder, classifier_fields, preset = _entry(name)
    if builder not in _BACKBONES:
        raise ModelConfigError(
            f"model {name!r} has no registered backbone; dense tasks need one of the built-in families"
        )
    backbone_builder, accepted = _BACKBONES[builder]
    return backbone_builder, accepted, classifier_fields - accepted, preset


def backbone_fields(name: str) -> frozenset[str]:
    """The override names ``create_backbone(name, **overrides)`` accepts."""
    return _backbone_entry(name)[1]


def create_backbone(name: str, **overrides: Any) -> nn.Module:
    """The backbone module of preset ``name`` (the one its classifier builds as 'backbone', so the parameter
    trees match): the preset's fields plus ``overrides``, minus the classifier-only fields (num_classes,
    head), with this machine's execution settings as in ``create_model``. Used by ``DenseModel(backbone=...)``;
    name it 'backbone' by passing it as that field."""
    builder, accepted, classifier_only, preset = _backbone_entry(name)
    for key in sorted(overrides):
        if key not in accepted:
            why = "is a classifier-only field" if key in classifier_only else "is not a field"
            raise ModelConfigError(f"backbone of {name!r}: {key!r} {why}; valid: {sorted(accepted)}")
    overrides = with_machine_settings(accepted, overrides)
    fields = {k: v for k, v in dict(preset, **overrides).items() if k not in classifier_only}
    if isinstance(fields.get("dtype"), str):
        if fields["dtype"] not in _DTYPES:
            raise ModelConfigError(f"model dtype {fields['dtype']!r} is not one of {sorted(_DTYPES)}")
        fields["dtype"] = _DTYPES[fields["dtype"]]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return builder(**fields)
