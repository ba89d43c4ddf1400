"""The one task table: ``config.task`` -> the task class the shared trainer drives.

``clusterformer_jax.main`` checks ``config.task`` against ``TASKS`` before training; the trainer builds the
task through ``create_task`` and uses only the ``tasks.base.Task`` protocol, never the task's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from clusterformer_jax.tasks.base import Task
from clusterformer_jax.tasks.classification import ClassificationTask
from clusterformer_jax.errors import ConfigError

TASKS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], Task]] = {
    "classification": ClassificationTask,
}


def create_task(config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Task:
    """Instantiates ``TASKS[config.task]`` for a dataset described by ``dataset_info``."""
    name = config["task"]
    if name not in TASKS:
        raise ConfigError(f'unknown task {name!r}; available: {", ".join(sorted(TASKS))}')
    return TASKS[name](config, dataset_info)
