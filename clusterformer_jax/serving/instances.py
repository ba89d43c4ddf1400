"""Serving side of detection and instance segmentation: boxes, scores, classes and masks in source pixels.

The mapping is the COCO evaluator's (evaluation/coco.py ``coco_detections``): canvas boxes divided by the
image's scale and clipped to it; a mask's stride-4 probability grid cropped to the valid canvas region
round(orig_size * scale), resized bilinearly (half-pixel centres) to the source size and thresholded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_util
from scipy import ndimage

from clusterformer_jax import render
from clusterformer_jax.serving import base
from clusterformer_jax.serving import preprocess as pre

MASK_STRIDE = 4


def largest_component_boxes(binary: np.ndarray) -> np.ndarray:
    """bool (K, H, W) -> float64 (K, 4) yxyx box of each mask's largest 8-connected component (the first in
    scan order among equals), NaN for empty masks: the COCO evaluator's ``box_source='mask'``, here without
    the evaluator's JAX imports (evaluation/coco.py has the same function)."""
    boxes = np.full((binary.shape[0], 4), np.nan)
    for k, mask in enumerate(binary):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if not count:
            continue
        component = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        rows, cols = np.flatnonzero(component.any(axis=1)), np.flatnonzero(component.any(axis=0))
        boxes[k] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return boxes


class InstanceServing:
    """Outputs ``boxes`` float32 (B, K, 4) [ymin, xmin, ymax, xmax] source pixels (the box head's), ``scores``
    (B, K), ``classes`` int32 (B, K) contiguous class index, ``image_size`` int32 (B, 2) and, with masks,
    ``masks`` bool (B, K, H, W) at the source size padded to the batch's largest image."""

    def __init__(
        self,
        class_names: Sequence[str],
        category_ids: Sequence[int],
        preprocessing: Mapping[str, Any],
        with_masks: bool,
        mask_threshold: float,
        box_source: str,
        score_threshold: float = 0.3,
    ):
        self.class_names = [str(n) for n in class_names]
        self.category_ids = [int(c) for c in category_ids]
        self.preprocessing = dict(preprocessing)
        self.preprocess = pre.from_constants(self.preprocessing)
        self.with_masks, self.mask_threshold, self.box_source = bool(with_masks), float(mask_threshold), box_source
        self.score_threshold = float(score_threshold)
        self._results: list[dict[str, Any]] = []

    def spec(self) -> dict[str, Any]:
        return base.spec_of(
            self,
            class_names=self.class_names,
            category_ids=self.category_ids,
            preprocessing=self.preprocessing,
            with_masks=self.with_masks,
            mask_threshold=self.mask_threshold,
            box_source=self.box_source,
        )

    def _masks(self, grid, orig, scale, height, width):
        """One image's uint8 (K, g, g) grid -> bool (K, height, width) (its source size, then padding)."""
        g = grid.shape[-1]
        out = []
        for axis in (0, 1):
            valid = tf.floor(tf.cast(orig[axis], tf.float64) * tf.cast(scale[axis], tf.float64) + 0.5)
            cells = tf.maximum(1, tf.minimum(g, tf.cast(tf.math.ceil(valid / MASK_STRIDE), tf.int32) + 1))
            size = orig[axis]
            out.append(base.bilinear_weights(size, valid / tf.cast(size, tf.float64) / MASK_STRIDE, 0.5, cells, g))
        probs = tf.cast(grid, tf.float32) * np.float32(1.0 / 255.0)
        masks = tf.einsum("hi,kij,wj->khw", out[0], probs, out[1]) >= self.mask_threshold
        return base.pad_to(masks, height, width, axis=1, value=False)

    def postprocess(self, outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        orig, scale = outputs["orig_size"], outputs["scale"]
        scale4 = tf.cast(tf.concat([scale, scale], axis=-1), tf.float64)[:, None, :]
        limit = tf.cast(tf.concat([orig, orig], axis=-1), tf.float64)[:, None, :]
        boxes = tf.clip_by_value(tf.cast(outputs["boxes"], tf.float64) / scale4, 0.0, limit)
        result = {
            "boxes": tf.cast(boxes, tf.float32),
            "scores": tf.cast(outputs["scores"], tf.float32),
            "classes": tf.cast(outputs["labels"], tf.int32),
            "image_size": tf.cast(orig, tf.int32),
        }
        if self.with_masks:
            height, width = tf.reduce_max(orig[:, 0]), tf.reduce_max(orig[:, 1])
            result["masks"] = tf.map_fn(
                lambda a: self._masks(a[0], a[1], a[2], height, width),
                (outputs["masks"], orig, scale),
                fn_output_signature=tf.TensorSpec((outputs["masks"].shape[1], None, None), tf.bool),
            )
        return result

    def _kept(self, row: Mapping[str, np.ndarray]):
        """(indices above the score threshold, their yxyx boxes, their source masks or None)."""
        height, width = (int(v) for v in row["image_size"])
        keep = np.flatnonzero((row["scores"] >= self.score_threshold) & (row["classes"] >= 0))
        boxes = np.asarray(row["boxes"], np.float64)[keep]
        masks = np.asarray(row["masks"])[keep, :height, :width] if "masks" in row else None
        if masks is not None and self.box_source == "mask":
            from_masks = largest_component_boxes(masks)
            boxes = np.where(np.isnan(from_masks), boxes, from_masks)
        return keep, boxes, masks

    def record(self, row: Mapping[str, np.ndarray], out_dir: str, stem: str) -> dict[str, Any]:
        keep, boxes, masks = self._kept(row)
        rles = []
        if keep.size and masks is not None:
            rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        detections = []
        for i, k in enumerate(keep):
            c = int(row["classes"][k])
            ymin, xmin, ymax, xmax = (float(v) for v in boxes[i])
            entry = {"category_id": self.category_ids[c], "class": c, "name": self.class_names[c],
                     "score": float(row["scores"][k]), "bbox": [xmin, ymin, xmax - xmin, ymax - ymin]}  # fmt: skip
            if masks is not None:
                entry["segmentation"] = {"size": list(masks.shape[1:]), "counts": rles[i]["counts"].decode("ascii")}
            detections.append(entry)
        return {"detections": detections}

    def finish(self, out_dir: str, records: list[dict[str, Any]]) -> None:
        """``predictions.json``: every kept detection in COCO results format (image_id, category_id, bbox, score,
        segmentation), readable by pycocotools' ``loadRes``."""
        keys = ("category_id", "bbox", "score", "segmentation")
        results = [
            {"image_id": record["image_id"], **{k: d[k] for k in keys if k in d}}
            for record in records
            for d in record["detections"]
        ]
        with open(os.path.join(out_dir, "predictions.json"), "w") as f:
            json.dump(results, f)

    def draw(self, image: np.ndarray, row: Mapping[str, np.ndarray]) -> np.ndarray:
        """Boxes (and masks) with class names and scores above the score threshold."""
        keep, boxes, masks = self._kept(row)
        return render.draw_instances(
            image, boxes, np.asarray(row["classes"])[keep], np.asarray(row["scores"])[keep], self.class_names, masks,
            score_threshold=self.score_threshold,
        )  # fmt: skip

    def truth(self, batch: Mapping[str, np.ndarray], index: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """The eval batch's ground truth of row ``index`` as outputs on its visible canvas ``shape``."""
        valid = np.asarray(batch["instance_valid"][index])
        row = {"boxes": batch["boxes"][index], "classes": np.where(valid, batch["classes"][index], -1),
               "scores": valid.astype(np.float32), "image_size": np.asarray(shape)}  # fmt: skip
        if self.with_masks and "instance_masks" in batch:
            grid = batch["instance_masks"][index]
            stride = batch["image"].shape[1] // grid.shape[-1]
            row["masks"] = np.repeat(np.repeat(grid, stride, axis=1), stride, axis=2)[:, : shape[0], : shape[1]] > 0
        return row
