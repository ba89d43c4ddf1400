"""Serving side of semantic and panoptic segmentation: label maps and segment maps at the source size.

The mapping is the evaluators' (evaluation/semantic.py ``map_prediction``): the canvas-grid map's valid region
round(orig_size * scale) sampled at the source size, bilinearly for logits (then argmax), nearest for ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from clusterformer_jax import render
from clusterformer_jax.data.coco_format import id_to_rgb
from clusterformer_jax.serving import base
from clusterformer_jax.serving import preprocess as pre

IGNORE = 255


def _per_image(values, orig, scale, canvas, height, width, bilinear, fill):
    """One image's canvas-grid map (h, w[, C]) sampled at its source size, padded to (height, width)."""
    grid = values.shape[0], values.shape[1]
    region = [base.valid_extent(orig[a], scale[a], canvas) * grid[a] / canvas for a in (0, 1)]
    cells = [tf.maximum(1, tf.minimum(grid[a], tf.cast(tf.math.ceil(region[a] - 1e-9), tf.int32))) for a in (0, 1)]
    position = [region[a] / tf.cast(orig[a], tf.float64) for a in (0, 1)]
    if bilinear:
        wy = base.bilinear_weights(orig[0], position[0], 0.5, cells[0], grid[0])
        wx = base.bilinear_weights(orig[1], position[1], 0.5, cells[1], grid[1])
        out = tf.cast(tf.argmax(tf.einsum("ai,ijc,bj->abc", wy, values, wx), axis=-1), tf.int32)
    else:
        rows = base.nearest_index(orig[0], position[0], cells[0])
        cols = base.nearest_index(orig[1], position[1], cells[1])
        out = tf.gather(tf.gather(values, rows, axis=0), cols, axis=1)
    return base.pad_to(out[None], height, width, axis=1, value=fill)[0]


def _source_maps(outputs, key, canvas, bilinear, fill):
    orig, scale = outputs["orig_size"], outputs["scale"]
    height, width = tf.reduce_max(orig[:, 0]), tf.reduce_max(orig[:, 1])
    return tf.map_fn(
        lambda a: _per_image(a[0], a[1], a[2], canvas, height, width, bilinear, fill),
        (outputs[key], orig, scale),
        fn_output_signature=tf.TensorSpec((None, None), tf.int32),
    )


class SemanticServing:
    """Outputs ``semantic`` int32 (B, H, W): the class per source pixel (255 beyond each image's
    ``image_size``); writes it as ``<stem>_semantic.png``."""

    def __init__(self, class_names: Sequence[str], preprocessing: Mapping[str, Any]):
        self.class_names = [str(n) for n in class_names]
        self.preprocessing = dict(preprocessing)
        self.preprocess = pre.from_constants(self.preprocessing)
        self.colours = np.asarray([render.palette(i) for i in range(len(self.class_names))], np.uint8)

    def spec(self) -> dict[str, Any]:
        return base.spec_of(self, class_names=self.class_names, preprocessing=self.preprocessing)

    def postprocess(self, outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        logits = tf.cast(outputs["semantic_logits"], tf.float32)
        outputs = {**outputs, "semantic_logits": logits}
        semantic = _source_maps(outputs, "semantic_logits", self.preprocess.canvas, True, IGNORE)
        return {"semantic": semantic, "image_size": tf.cast(outputs["orig_size"], tf.int32)}

    def record(self, row: Mapping[str, np.ndarray], out_dir: str, stem: str) -> dict[str, Any]:
        height, width = (int(v) for v in row["image_size"])
        path = os.path.join(out_dir, f"{stem}_semantic.png")
        Image.fromarray(np.asarray(row["semantic"])[:height, :width].astype(np.uint8)).save(path)
        return {"semantic_png": os.path.basename(path)}

    def finish(self, out_dir: str, records: list[dict[str, Any]]) -> None:
        """Nothing beyond the PNGs and JSON lines."""

    def draw(self, image: np.ndarray, row: Mapping[str, np.ndarray]) -> np.ndarray:
        labels = np.asarray(row["semantic"])[: image.shape[0], : image.shape[1]]
        return render.draw_label_map(image, np.where(labels == IGNORE, -1, labels), self.colours)

    def truth(self, batch: Mapping[str, np.ndarray], index: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        labels = np.asarray(batch["semantic"][index])[: shape[0], : shape[1]].astype(np.int32)
        return {"semantic": labels, "image_size": np.asarray(shape)}


class PanopticServing:
    """Outputs ``panoptic`` int32 (B, H, W) segment id per source pixel (0 void; 0 beyond ``image_size``) and the
    segment table ``segment_classes`` int32 (B, Q) (-1: no segment) and ``segment_scores`` (B, Q), segment id
    = row + 1; writes COCO panoptic PNGs (``panoptic/<stem>.png``) and ``panoptic.json``."""

    def __init__(self, class_names: Sequence[str], category_ids: Sequence[int], is_thing, preprocessing):
        self.class_names = [str(n) for n in class_names]
        self.category_ids, self.is_thing = [int(c) for c in category_ids], [bool(t) for t in is_thing]
        self.preprocessing = dict(preprocessing)
        self.preprocess = pre.from_constants(self.preprocessing)
        self.colours = np.asarray([render.palette(i) for i in range(len(self.class_names))], np.uint8)

    def spec(self) -> dict[str, Any]:
        return base.spec_of(self, class_names=self.class_names, category_ids=self.category_ids,
                            is_thing=self.is_thing, preprocessing=self.preprocessing)  # fmt: skip

    def postprocess(self, outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        panoptic = _source_maps(outputs, "panoptic", self.preprocess.canvas, False, 0)
        return {
            "panoptic": panoptic,
            "segment_classes": tf.cast(outputs["segment_classes"], tf.int32),
            "segment_scores": tf.cast(outputs["segment_scores"], tf.float32),
            "image_size": tf.cast(outputs["orig_size"], tf.int32),
        }

    def record(self, row: Mapping[str, np.ndarray], out_dir: str, stem: str) -> dict[str, Any]:
        height, width = (int(v) for v in row["image_size"])
        ids = np.asarray(row["panoptic"])[:height, :width]
        classes = np.asarray(row["segment_classes"])
        os.makedirs(os.path.join(out_dir, "panoptic"), exist_ok=True)
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(out_dir, "panoptic", f"{stem}.png"))
        segments = [
            {"id": int(k), "category_id": self.category_ids[classes[k - 1]], "name": self.class_names[classes[k - 1]],
             "score": float(row["segment_scores"][k - 1]), "area": int((ids == k).sum())}
            for k in np.unique(ids) if k > 0 and classes[k - 1] >= 0
        ]  # fmt: skip
        return {"panoptic_png": f"panoptic/{stem}.png", "segments_info": segments}

    def finish(self, out_dir: str, records: list[dict[str, Any]]) -> None:
        """``panoptic.json`` in COCO panoptic format (annotations, categories, images)."""
        categories = [{"id": c, "name": n, "isthing": int(t)}
                      for c, n, t in zip(self.category_ids, self.class_names, self.is_thing)]  # fmt: skip
        annotations = [
            {"image_id": r["image_id"], "file_name": os.path.basename(r["panoptic_png"]),
             "segments_info": [{k: s[k] for k in ("id", "category_id", "area")} for s in r["segments_info"]]}
            for r in records
        ]  # fmt: skip
        images = [{"id": r["image_id"], "file_name": r["file"], "height": r["height"], "width": r["width"]}
                  for r in records]  # fmt: skip
        with open(os.path.join(out_dir, "panoptic.json"), "w") as f:
            json.dump({"annotations": annotations, "categories": categories, "images": images}, f)

    def draw(self, image: np.ndarray, row: Mapping[str, np.ndarray]) -> np.ndarray:
        """Segments coloured by class, borders between segments darkened (instances of a class stay apart)."""
        ids = np.asarray(row["panoptic"])[: image.shape[0], : image.shape[1]]
        classes = np.asarray(row["segment_classes"])
        colour = np.where(ids > 0, classes[np.clip(ids - 1, 0, len(classes) - 1)], -1)
        drawn = render.draw_label_map(image, colour, self.colours)
        edge = np.zeros(ids.shape, bool)
        edge[1:] |= ids[1:] != ids[:-1]
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        drawn[edge] = drawn[edge] // 3
        return drawn

    def truth(self, batch: Mapping[str, np.ndarray], index: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["panoptic_ids"][index])[: shape[0], : shape[1]]
        return {"panoptic": ids, "segment_classes": np.asarray(batch["classes"][index]),
                "segment_scores": np.ones(len(batch["classes"][index]), np.float32)}  # fmt: skip
