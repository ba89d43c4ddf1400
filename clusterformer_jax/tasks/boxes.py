"""Box arithmetic for the set-prediction heads (DETR semantics), in jnp so it runs inside jit.

Three layouts meet here:
  cxcywh  the model's boxes: normalised (centre x, centre y, width, height) relative to the canvas (W, H).
  xyxy    (x0, y0, x1, y1), the layout IoU and GIoU are computed in (same normalisation as the input).
  yxyx    the pipeline's [ymin, xmin, ymax, xmax] in canvas pixels (pixel edges), and the evaluator's layout.

IoU and GIoU divide by ``max(denominator, eps)`` so degenerate (zero-area) boxes, such as the zeros in empty
target slots, give finite values and finite gradients instead of NaN; DETR asserts non-degenerate boxes
instead, which cannot be done inside jit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

EPS = 1e-7


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], axis=-1)


def box_area(boxes_xyxy: jax.Array) -> jax.Array:
    """(..., 4) xyxy -> (...) area; inverted boxes count as zero area."""
    w = jnp.maximum(boxes_xyxy[..., 2] - boxes_xyxy[..., 0], 0.0)
    h = jnp.maximum(boxes_xyxy[..., 3] - boxes_xyxy[..., 1], 0.0)
    return w * h


def _iou_parts(b1: jax.Array, b2: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """IoU, union and enclosing-box area of broadcast-compatible xyxy boxes."""
    lt = jnp.maximum(b1[..., :2], b2[..., :2])
    rb = jnp.minimum(b1[..., 2:], b2[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(b1) + box_area(b2) - inter
    iou = inter / jnp.maximum(union, eps)
    lt_c = jnp.minimum(b1[..., :2], b2[..., :2])
    rb_c = jnp.maximum(b1[..., 2:], b2[..., 2:])
    wh_c = jnp.maximum(rb_c - lt_c, 0.0)
    enclosing = wh_c[..., 0] * wh_c[..., 1]
    return iou, union, enclosing


def box_iou(boxes1: jax.Array, boxes2: jax.Array, eps: float = EPS) -> jax.Array:
    """Pairwise IoU of xyxy boxes: (..., N, 4), (..., M, 4) -> (..., N, M)."""
    iou, _, _ = _iou_parts(boxes1[..., :, None, :], boxes2[..., None, :, :], eps)
    return iou


def _giou(b1: jax.Array, b2: jax.Array, eps: float) -> jax.Array:
    iou, union, enclosing = _iou_parts(b1, b2, eps)
    return iou - (enclosing - union) / jnp.maximum(enclosing, eps)


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array, eps: float = EPS) -> jax.Array:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes: (..., N, 4), (..., M, 4) -> (..., N, M).

    In [-1, 1]: IoU minus the fraction of the smallest enclosing box that the union does not cover.
    """
    return _giou(boxes1[..., :, None, :], boxes2[..., None, :, :], eps)


def elementwise_generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array, eps: float = EPS) -> jax.Array:
    """GIoU of matched pairs: (..., 4), (..., 4) -> (...); the diagonal of the pairwise version, at O(N)."""
    return _giou(boxes1, boxes2, eps)


def _canvas_hw(canvas_hw: Sequence[float] | jax.Array) -> tuple[jax.Array, jax.Array]:
    hw = jnp.asarray(canvas_hw, jnp.float32)
    return hw[..., 0:1], hw[..., 1:2]


def yxyx_pixels_to_cxcywh(boxes: jax.Array, canvas_hw: Sequence[float] | jax.Array) -> jax.Array:
    """Pipeline boxes [ymin, xmin, ymax, xmax] in canvas pixels -> normalised (cx, cy, w, h).

    ``canvas_hw`` is the canvas (H, W) in pixels: a pair, or an array broadcastable against boxes[..., :1]
    (e.g. (B, 1, 2) for per-image canvases). Pixel edges map to [0, 1]: a box over the whole canvas is
    (0.5, 0.5, 1, 1).
    """
    h, w = _canvas_hw(canvas_hw)
    y0, x0, y1, x1 = jnp.split(boxes.astype(jnp.float32), 4, axis=-1)
    return jnp.concatenate([(x0 + x1) / (2 * w), (y0 + y1) / (2 * h), (x1 - x0) / w, (y1 - y0) / h], axis=-1)


def cxcywh_to_yxyx_pixels(boxes: jax.Array, canvas_hw: Sequence[float] | jax.Array) -> jax.Array:
    """Normalised (cx, cy, w, h) -> [ymin, xmin, ymax, xmax] in canvas pixels; inverse of the above."""
    h, w = _canvas_hw(canvas_hw)
    x0, y0, x1, y1 = jnp.split(cxcywh_to_xyxy(boxes), 4, axis=-1)
    return jnp.concatenate([y0 * h, x0 * w, y1 * h, x1 * w], axis=-1)
