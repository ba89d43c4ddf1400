"""The one task table: ``config.task`` -> (the task class the shared trainer drives, its input pipeline).

``clusterformer_jax.main`` checks ``config.task`` against ``TASKS`` before training; the trainer reads data
through ``input_module(config)``, builds the task through ``create_task`` and then uses only the
``tasks.base.Task`` protocol, never the task's name. A new task is one ``register_task(name, factory,
input_module)`` call (e.g. a per-pixel regression over ``data.dense_pipeline``; see tests/test_open_seam.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from clusterformer_jax.data import dense_pipeline, pipeline
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks.base import Task
from clusterformer_jax.tasks.classification import ClassificationTask
from clusterformer_jax.tasks.detection import detection_task, instance_segmentation_task
from clusterformer_jax.tasks.panoptic import PanopticTask
from clusterformer_jax.tasks.semantic import SemanticTask

TaskFactory = Callable[[Mapping[str, Any], Mapping[str, Any]], Task]

TASKS: dict[str, tuple[TaskFactory, ModuleType]] = {}


def register_task(name: str, factory: TaskFactory, input_module: ModuleType) -> None:
    """Adds (or replaces) task ``name``: ``factory(config, dataset_info)`` builds the ``Task``, and
    ``input_module`` (``get_dataset_info``, ``create_train_iterator``, ``create_eval_iterator``) feeds it."""
    TASKS[name] = (factory, input_module)


def _entry(config: Mapping[str, Any]) -> tuple[TaskFactory, ModuleType]:
    name = config["task"]
    if name not in TASKS:
        raise ConfigError(f'unknown task {name!r}; available: {", ".join(sorted(TASKS))}')
    return TASKS[name]


def input_module(config: Mapping[str, Any]) -> ModuleType:
    """The input pipeline of ``config.task`` (``get_dataset_info``, ``create_train_iterator``,
    ``create_eval_iterator`` over ``config.input``)."""
    return _entry(config)[1]


def create_task(config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Task:
    """Instantiates the task of ``config.task`` for a dataset described by ``dataset_info``."""
    return _entry(config)[0](config, dataset_info)


register_task("classification", ClassificationTask, pipeline)
register_task("detection", detection_task, dense_pipeline)
register_task("instance_segmentation", instance_segmentation_task, dense_pipeline)
register_task("semantic_segmentation", SemanticTask, dense_pipeline)
register_task("panoptic_segmentation", PanopticTask, dense_pipeline)
