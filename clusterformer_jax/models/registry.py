"""Model registry: ``create_model(name, **overrides)`` and ``list_models()``.

A preset is a dict of constructor fields. Overrides are checked against the model's fields, so a typo in
``config.model.kwargs`` fails with one line naming the field instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax.numpy as jnp

from clusterformer_jax.models.clusterformer import ClusterFormer, ClusterFormerBackbone

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The released code (seed_systems.md §2.2) with the dev build's window counts [8,4,2,1] so 224 works.
_OFFICIAL = dict(
    dims=(96, 192, 384, 768),
    mlp_ratios=(8, 8, 4, 4),
    num_heads=(3, 6, 12, 24),
    head_dim=32,
    window_counts=(8, 4, 2, 1),
    centers=(10, 10),
    estep_axis="clusters",
    query_proj=True,
    mstep="sum",
    center_ffn=False,
    dispatch="official",
    partition="raw",
    head="official_neck",
)

# The paper's design (§3.2-3.3, "the architecture and configuration of Swin Transformer"): Swin widths,
# depths, heads and MLP ratio 4, 7x7-token spatial windows, Eq. 5 center FFN, Eq. 6 dispatch, and the
# single-layer head on the cluster centers.
_PAPER = dict(
    dims=(96, 192, 384, 768),
    mlp_ratios=(4, 4, 4, 4),
    num_heads=(3, 6, 12, 24),
    head_dim=32,
    window_counts=(8, 4, 2, 1),
    centers=(10, 10),
    num_iters=3,
    estep_axis="clusters",
    query_proj=True,
    mstep="sum",
    center_ffn=True,
    dispatch="paper",
    partition="spatial",
    head="paper_centers",
)

_PRESETS: Dict[str, Tuple[Callable[..., nn.Module], Dict[str, Any]]] = {
    "clusterformer_tiny": (ClusterFormer, dict(_PAPER, depths=(2, 2, 6, 2), drop_path_rate=0.2)),
    "clusterformer_small": (ClusterFormer, dict(_PAPER, depths=(2, 2, 18, 2), drop_path_rate=0.3)),
    "clusterformer_base": (
        ClusterFormer,
        dict(_PAPER, depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    ),
    # Released configs: tiny uses T=3, small silently runs with the default T=1; neither sets drop-path.
    "clusterformer_tiny_official": (ClusterFormer, dict(_OFFICIAL, depths=(2, 2, 6, 2), num_iters=3)),
    "clusterformer_small_official": (ClusterFormer, dict(_OFFICIAL, depths=(2, 2, 18, 2), num_iters=1)),
    # Quickstart: 32x32 digits (stage maps 8/4/2/1), whole-map clustering with 4x4 centers.
    "clusterformer_nano": (
        ClusterFormer,
        dict(
            _PAPER,
            depths=(1, 1, 2, 1),
            dims=(32, 64, 128, 192),
            num_heads=(1, 2, 4, 6),
            head_dim=32,
            mlp_ratios=(4, 4, 4, 4),
            window_counts=(1, 1, 1, 1),
            centers=(4, 4),
            num_iters=3,
            head="official_neck",
            num_classes=10,
        ),
    ),
}


def list_models() -> list[str]:
    return sorted(_PRESETS)


def register_model(name: str, cls: Callable[..., nn.Module], **preset: Any) -> None:
    """Adds a preset (used by the peer backbones' modules)."""
    _PRESETS[name] = (cls, preset)


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def model_fields(name: str) -> set[str]:
    """The constructor fields ``create_model(name, **overrides)`` accepts."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls = _PRESETS[name][0]
    if cls is ClusterFormer:
        return (_field_names(ClusterFormer) - {"backbone"}) | _field_names(ClusterFormerBackbone)
    return _field_names(cls)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds preset ``name`` with ``overrides`` (e.g. num_classes=10, num_iters=1, dtype='bfloat16')."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    cls, preset = _PRESETS[name]
    fields = dict(preset, **overrides)
    if isinstance(fields.get("dtype"), str):
        if fields["dtype"] not in _DTYPES:
            raise ValueError(f"model dtype {fields['dtype']!r} is not one of {sorted(_DTYPES)}")
        fields["dtype"] = _DTYPES[fields["dtype"]]
    for key, value in fields.items():  # ConfigDict lists arrive as lists; modules want hashable tuples
        if isinstance(value, list):
            fields[key] = tuple(value)
    if cls is ClusterFormer:
        top = _field_names(ClusterFormer) - {"backbone"}
        backbone_fields = _field_names(ClusterFormerBackbone)
        unknown = sorted(k for k in fields if k not in top and k not in backbone_fields)
        if unknown:
            raise ValueError(f"model {name!r} has no field {unknown[0]!r}; valid: {sorted(top | backbone_fields)}")
        backbone = {k: v for k, v in fields.items() if k not in top}
        return ClusterFormer(backbone=backbone, **{k: v for k, v in fields.items() if k in top})
    unknown = sorted(set(fields) - _field_names(cls))
    if unknown:
        raise ValueError(f"model {name!r} has no field {unknown[0]!r}; valid: {sorted(_field_names(cls))}")
    return cls(**fields)


# Peer backbones register their presets on import; they import register_model, so this comes last.
from clusterformer_jax.models import groupmixformer  # noqa: E402,F401
from clusterformer_jax.models import context_cluster  # noqa: E402,F401
from clusterformer_jax.models import paca_vit  # noqa: E402,F401
