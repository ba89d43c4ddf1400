"""The contract between a task and the shared trainer.

A task owns everything task-specific, so the trainer never branches on the task: which input pipeline to
read, how to build the model and its dummy inputs, which arrays of a batch the model takes, the loss over
the model's output pytree, the train metrics, a fixed-shape ``predict`` (jitted by the trainer) and the
host-side evaluator that scores the predictions over the eval split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
from clu import metrics as clu_metrics

from clusterformer_jax.evaluation.base import Evaluator


class Task(Protocol):
    """What the shared trainer needs from a task; it never looks at the task's name.

    Batches are dicts of global arrays; eval batches also carry a float 'mask' (1 for real rows, 0 for
    padding). ``outputs`` is whatever pytree the model returns (logits, or a dict of stacked predictions).
    """

    def build_model(self, model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
        """The model for this task on backbone/preset ``model_name`` (kwargs already resolved for the machine)."""
        ...

    def dummy_inputs(self, batch_size: int) -> dict[str, jax.Array]:
        """Model inputs of the train shape, for ``model.init`` and shape inference."""
        ...

    def model_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The keyword arguments of ``model.apply`` (besides ``train``) taken from a batch."""
        ...

    def prepare_train_batch(self, batch: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        """On-device, per-step batch transform inside the jitted train step (e.g. Mixup/CutMix, targets)."""
        ...

    def loss_fn(
        self, outputs: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar training loss, values for ``train_metric_fields``)."""
        ...

    def train_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        """CLU metrics computed on device from ``loss_fn``'s values during training."""
        ...

    def predict(self, outputs: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Fixed-shape per-example predictions (batch-major) that the evaluator consumes; jitted."""
        ...

    def create_evaluator(self) -> Evaluator:
        """A fresh host-side evaluator for one pass over the eval split."""
        ...

    def serving(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Any:
        """The task's JAX-free serving side (serving/base.py): the SavedModel's in-graph preprocessing and
        postprocessing to source pixels, and the prediction records and drawings, so that export and predict
        never branch on the task."""
        ...

    def summary(self, eval_metrics: Mapping[str, Any]) -> dict[str, float]:
        """The headline numbers for results.json (e.g. top1/top5/loss, or COCO bbox/segm AP)."""
        ...
