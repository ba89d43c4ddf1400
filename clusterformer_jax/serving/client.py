"""Runs an exported SavedModel (``export --format=saved_model``) with TensorFlow alone: no JAX, no Flax.

``block_jax()`` before TensorFlow is imported keeps JAX out of the process even where it is installed
(``tensorflow.lite`` imports it when it can): the serving side must not need the training stack.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is not imported on the serving side", name=name)
        return None


def block_jax() -> None:
    """Makes ``import jax`` (and Flax, Optax, Orbax) fail in this process from now on."""
    if not any(isinstance(f, _Blocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _Blocker())


class ExportedModel:
    """An export directory's ``serving_default`` signature and its task's serving side (from the assets)."""

    def __init__(self, directory: str):
        import tensorflow as tf

        from clusterformer_jax.errors import ConfigError
        from clusterformer_jax.serving import base, saved_model

        info_path = os.path.join(directory, "assets", saved_model.SERVING_FILE)
        if not os.path.isfile(info_path):
            raise ConfigError(
                f"{directory!r} is not a SavedModel export (no assets/{saved_model.SERVING_FILE}); "
                "write one with: python -m clusterformer_jax.export --format=saved_model"
            )
        with open(info_path) as f:
            self.info = json.load(f)
        self.serving = base.from_spec(self.info["serving"])
        self._tf = tf
        self._signature = tf.saved_model.load(directory).signatures[saved_model.DEFAULT_SIGNATURE]
        self._input = saved_model.BYTES_INPUT

    def __call__(self, encoded: Sequence[bytes]) -> dict[str, Any]:
        """Outputs (numpy, batch-major) for a batch of encoded images."""
        outputs = self._signature(**{self._input: self._tf.constant(list(encoded))})
        return {k: v.numpy() for k, v in outputs.items()}
