"""The contract between a task and the shared trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
from clu import metrics as clu_metrics


class Task(Protocol):
    """What the shared trainer needs from a task; it never looks at the task's name.

    Batches are dicts of global arrays with at least 'image' (the model input); eval batches also carry a
    float 'mask' (1 for real rows, 0 for padding).
    """

    def prepare_train_batch(self, batch: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        """On-device, per-step batch transform inside the jitted train step (e.g. Mixup/CutMix, targets)."""
        ...

    def loss_fn(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar training loss, model outputs for ``train_metric_fields``)."""
        ...

    def train_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        """CLU metrics computed from ``loss_fn``'s outputs during training."""
        ...

    def eval_outputs(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Model outputs for ``eval_metric_fields``; must include the batch 'mask'."""
        ...

    def eval_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        """CLU metrics accumulated over the eval split (padded rows masked out)."""
        ...

    def summary(self, eval_metrics: Mapping[str, Any]) -> dict[str, float]:
        """The headline numbers for results.json (e.g. top1, top5, loss)."""
        ...
