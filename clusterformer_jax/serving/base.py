"""What every task's serving side shares: rebuilding it from an export's assets, and the resampling weights that
map the model's canvas-grid predictions back to each source image in TF (the evaluators' numpy mapping:
evaluation/coco.py and evaluation/semantic.py).

A task's serving object (``task.serving(config)``, see classification.py, instances.py, segmentation.py) is
free of JAX: ``postprocess`` (TF: the JAX function's fixed-shape outputs -> named outputs in source pixels),
``record`` (numpy: one image's outputs -> its JSON line, and any PNGs), ``finish`` (files over all images) and
``draw`` (a picture of one image's outputs), so the SavedModel's client and ``predict`` need no task branches.
"""

from __future__ import annotations

import importlib
from typing import Any

import tensorflow as tf


def spec_of(serving: Any, **kwargs: Any) -> dict[str, Any]:
    """The JSON an export stores to rebuild ``serving`` without the task: its class and constructor kwargs."""
    cls = type(serving)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}


def from_spec(spec: dict[str, Any]) -> Any:
    """The serving object an export's ``serving.json`` describes (``spec_of``)."""
    module, name = spec["class"].split(":")
    return getattr(importlib.import_module(module), name)(**spec["kwargs"])


def valid_extent(orig: tf.Tensor, scale: tf.Tensor, canvas: int) -> tf.Tensor:
    """float64 canvas pixels an image covers along one axis: round(orig * scale), at most the canvas."""
    value = tf.floor(tf.cast(orig, tf.float64) * tf.cast(scale, tf.float64) + 0.5)
    return tf.minimum(value, float(canvas))


def bilinear_weights(out_size: tf.Tensor, position_scale: tf.Tensor, offset: float, cells: tf.Tensor, grid: int):
    """float32 (out_size, grid) weights: output pixel p reads position (p + 0.5) * position_scale - offset,
    clipped to [0, cells - 1], linearly between its two neighbouring cells (cells >= ``cells`` get none)."""
    cells_f = tf.cast(cells, tf.float64)
    g = (tf.range(out_size, dtype=tf.float64) + 0.5) * position_scale - offset
    g = tf.clip_by_value(g, 0.0, cells_f - 1.0)
    lo = tf.floor(g)
    hi = tf.minimum(lo + 1.0, cells_f - 1.0)
    frac = g - lo
    index = tf.range(grid, dtype=tf.float64)[None, :]
    weights = tf.where(index == lo[:, None], 1.0 - frac[:, None], 0.0)
    weights += tf.where(index == hi[:, None], frac[:, None], 0.0)
    return tf.cast(weights, tf.float32)


def nearest_index(out_size: tf.Tensor, position_scale: tf.Tensor, cells: tf.Tensor) -> tf.Tensor:
    """int32 (out_size,): the cell output pixel p reads, floor((p + 0.5) * position_scale) clipped."""
    g = tf.floor((tf.range(out_size, dtype=tf.float64) + 0.5) * position_scale)
    return tf.cast(tf.clip_by_value(g, 0.0, tf.cast(cells, tf.float64) - 1.0), tf.int32)


def pad_to(tensor: tf.Tensor, height: tf.Tensor, width: tf.Tensor, axis: int, value: Any = 0) -> tf.Tensor:
    """Pads dims ``axis`` and ``axis + 1`` of ``tensor`` at the end to (height, width) with ``value``."""
    shape = tf.shape(tensor)
    paddings = [[0, 0]] * tensor.shape.rank
    paddings[axis] = [0, height - shape[axis]]
    paddings[axis + 1] = [0, width - shape[axis + 1]]
    return tf.pad(tensor, paddings, constant_values=value)
