"""COCO box and mask AP (pycocotools, or faster-coco-eval) over the evaluated images.

`update` maps each real row's detections from the eval canvas back to its source image: boxes are divided
by batch['scale'] (the eval image sits at the canvas' top-left, no offset), clipped to the source size and
written as [x, y, w, h]; a mask's stride-4 probability grid is cropped to the valid canvas region
round(orig_size * scale), resized bilinearly (half-pixel centres) to the source (H, W), thresholded and RLE
encoded. `compute` gathers every process's results and runs COCOeval once per IoU type, restricted to the
image ids seen, so a split slice ('validation[:50]') is scored against its own annotations only. Stats are
fractions (pycocotools' stats[0..5]); -1 means no ground truth of that size and is passed through.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from pycocotools import mask as mask_util
from scipy import ndimage

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.evaluation.base import real_rows
from clusterformer_jax.evaluation.gather import allgather_objects

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")
# Where a detection's COCO box comes from: 'head' the box head's regression; 'mask' the bounding box of the
# largest 8-connected component of its thresholded mask at the source size (instance segmentation only).
BOX_SOURCES = ("head", "mask")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_STRIDE = 4


def _backend_classes(backend: str) -> tuple[Any, Any]:
    """(COCO, COCOeval) classes of the backend."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
        raise ConfigError(
            "the COCO evaluator backend 'faster_coco_eval' is not installed: `pip install faster-coco-eval` "
            "or use backend='pycocotools'"
        ) from e
    return COCO, COCOeval_faster


def _resize_weights(out_size: int, valid: float, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear weights float32 (out_size, n) from grid cells to output pixels, and each pixel's lower cell.

    Output pixel p's centre (p + 0.5) lies at canvas coordinate (p + 0.5) * valid / out_size, i.e. grid
    coordinate that / 4 - 0.5 (cell i is centred on canvas 4 * (i + 0.5)); edges replicate. Only the n cells
    that cover the valid canvas region take part.
    """
    n = max(1, min(grid_size, int(math.ceil(valid / MASK_STRIDE)) + 1))
    g = (np.arange(out_size, dtype=np.float64) + 0.5) * (valid / out_size) / MASK_STRIDE - 0.5
    g = np.clip(g, 0.0, n - 1)
    lo = np.floor(g).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    frac = g - lo
    weights = np.zeros((out_size, n), np.float64)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights.astype(np.float32), lo


def _source_weights(grid: np.ndarray, orig_size: Sequence[int], scale: Sequence[float]):
    """Probabilities of the cells in use and the row / column weights and lower cells for the source size."""
    height, width = int(orig_size[0]), int(orig_size[1])
    valid_h = float(np.floor(height * float(scale[0]) + 0.5))  # round(orig * scale), as the eval resize
    valid_w = float(np.floor(width * float(scale[1]) + 0.5))
    wy, ly = _resize_weights(height, valid_h, grid.shape[1])
    wx, lx = _resize_weights(width, valid_w, grid.shape[2])
    probs = grid[:, : wy.shape[1], : wx.shape[1]].astype(np.float32) * np.float32(1.0 / 255.0)
    return probs, wy, ly, wx, lx


def masks_to_source(grid: np.ndarray, orig_size: Sequence[int], scale: Sequence[float]) -> np.ndarray:
    """uint8 (K, g, g) mask probabilities * 255 on the stride-4 canvas grid -> float32 (K, H, W) in [0, 1].

    The valid canvas region round(orig_size * scale) of the grid, resized bilinearly to orig_size.
    """
    probs, wy, _, wx, _ = _source_weights(grid, orig_size, scale)
    return np.einsum("hi,kij,wj->khw", wy, probs, wx, optimize=True)


def binary_masks_to_source(
    grid: np.ndarray, orig_size: Sequence[int], scale: Sequence[float], threshold: float
) -> np.ndarray:
    """`masks_to_source(...) >= threshold` as bool (K, H, W), computed only around each mask's support.

    A bilinear value is a convex combination of at most 2 x 2 cells, so it can reach `threshold` only where
    one of them does: each mask is resized just over the pixels whose cells touch its cells >= threshold
    (about 10x less work than the dense resize on COCO-sized images with object-sized masks).
    """
    probs, wy, ly, wx, lx = _source_weights(grid, orig_size, scale)
    out = np.zeros((probs.shape[0], wy.shape[0], wx.shape[0]), bool)
    for k in range(probs.shape[0]):
        rows, cols = np.nonzero(probs[k] >= threshold)
        if not rows.size:
            continue
        (r0, r1), (c0, c1) = (rows.min(), rows.max()), (cols.min(), cols.max())
        ys = np.flatnonzero((ly >= r0 - 1) & (ly <= r1))  # pixels whose 2 cells meet rows r0..r1
        xs = np.flatnonzero((lx >= c0 - 1) & (lx <= c1))
        if not ys.size or not xs.size:
            continue
        a, b, c, d = max(r0 - 1, 0), r1 + 2, max(c0 - 1, 0), c1 + 2
        block = wy[ys[0] : ys[-1] + 1, a:b] @ probs[k, a:b, c:d] @ wx[xs[0] : xs[-1] + 1, c:d].T
        out[k, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1] = block >= threshold
    return out


def _quiet(fn, *args):
    """Runs a pycocotools call with its prints captured into the debug log."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args)
    if out.getvalue().strip():
        logging.debug("%s", out.getvalue().rstrip())
    return result


def largest_component_boxes(binary: np.ndarray) -> np.ndarray:
    """bool (K, H, W) masks -> float64 (K, 4) [ymin, xmin, ymax, xmax] pixel-edge boxes of each mask's largest
    8-connected component (the first in scan order among equal sizes); NaN rows for empty masks. A mask that
    also fires on a second, smaller blob (another object of its class) keeps the box of its own object."""
    boxes = np.full((binary.shape[0], 4), np.nan)
    eight = np.ones((3, 3), bool)
    for k, mask in enumerate(binary):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not rows.size:
            continue
        y0, x0 = rows[0], cols[0]
        crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
        labels, count = ndimage.label(crop, structure=eight)
        if count > 1:
            sizes = np.bincount(labels.ravel())[1:]
            crop = labels == 1 + int(np.argmax(sizes))
            rows, cols = np.flatnonzero(crop.any(axis=1)) + y0, np.flatnonzero(crop.any(axis=0)) + x0
        boxes[k] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return boxes


def coco_detections(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None,
    orig_size: Sequence[int],
    scale: Sequence[float],
    category_ids: Sequence[int],
    mask_threshold: float,
    box_source: str = "head",
) -> list[dict[str, Any]]:
    """One image's detections in COCO results format: canvas boxes [ymin, xmin, ymax, xmax] divided by
    ``scale`` and clipped to ``orig_size`` as [x, y, w, h]; ``category_ids[label]``; stride-4 mask grids
    (K, g, g) mapped to the source image, thresholded and RLE-encoded (``masks`` None: boxes only). With
    ``box_source='mask'`` a detection's box is its source mask's ``largest_component_boxes`` (the head's box
    where the mask is empty)."""
    height, width = int(orig_size[0]), int(orig_size[1])
    sy, sx = float(scale[0]), float(scale[1])
    src = np.asarray(boxes, np.float64) / np.array([sy, sx, sy, sx])
    src = np.clip(src, 0.0, np.array([height, width, height, width], np.float64))
    rles = None
    if masks is not None and labels.size:
        binary = binary_masks_to_source(masks, orig_size, scale, mask_threshold)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
        if box_source == "mask":
            from_masks = largest_component_boxes(binary)
            src = np.where(np.isnan(from_masks), src, from_masks)
    results = []
    for k in range(labels.size):
        ymin, xmin, ymax, xmax = (float(v) for v in src[k])
        entry = {
            "image_id": int(image_id),
            "category_id": int(category_ids[labels[k]]),
            "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
            "score": float(scores[k]),
        }
        if rles is not None:
            entry["segmentation"] = {"size": [height, width], "counts": rles[k]["counts"].decode("ascii")}
        results.append(entry)
    return results


class COCOEvaluator:
    """COCO instances AP for detection ('bbox') and instance segmentation ('segm').

    predictions per row (task predict, fixed K): 'boxes' (K, 4) [ymin, xmin, ymax, xmax] canvas pixels,
    'scores' (K,), 'labels' (K,) contiguous class (< 0: padding), 'masks' uint8 (K, S/4, S/4) for 'segm'.
    `category_ids[label]` is the COCO category id of a contiguous class.
    """

    def __init__(
        self,
        instances_json: str | None,
        category_ids: Sequence[int],
        iou_types: Sequence[str] = IOU_TYPES,
        backend: str = "pycocotools",
        max_detections: int = 100,
        mask_threshold: float = 0.5,
        box_source: str = "head",
    ):
        if instances_json is None:
            raise ConfigError(
                "this eval split has no COCO instances json; set config.input.eval_split to a split with "
                "COCO annotations (coco_instances validation, or shapes with its coco_format export)"
            )
        if not os.path.exists(os.path.expanduser(instances_json)):
            raise ConfigError(f"COCO instances json {instances_json!r} does not exist; prepare the dataset first")
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ConfigError(f"COCO iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
        if backend not in BACKENDS:
            raise ConfigError(f"COCO evaluator backend must be one of {BACKENDS}, got {backend!r}")
        if box_source not in BOX_SOURCES:
            raise ConfigError(f"COCO evaluator box_source must be one of {BOX_SOURCES}, got {box_source!r}")
        if box_source == "mask" and "segm" not in iou_types:
            raise ConfigError("box_source='mask' takes boxes from the predicted masks; evaluate 'segm' too")
        self._coco_cls, self._eval_cls = _backend_classes(backend)
        self.instances_json = os.path.expanduser(instances_json)
        self.category_ids = np.asarray(category_ids, np.int64)
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.max_detections = int(max_detections)
        self.mask_threshold = float(mask_threshold)
        self.box_source = box_source
        self._gt = None
        self.reset()

    def reset(self) -> None:
        self._results: list[dict[str, Any]] = []
        self._image_ids: list[int] = []

    def update(self, predictions: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> None:
        if "segm" in self.iou_types and "masks" not in predictions:
            raise ConfigError(
                "the COCO evaluator asks for 'segm' but predict gives no 'masks'; use iou_types=('bbox',)"
            )
        boxes, scores = np.asarray(predictions["boxes"]), np.asarray(predictions["scores"])
        labels = np.asarray(predictions["labels"])
        masks = np.asarray(predictions["masks"]) if "segm" in self.iou_types else None
        for row in real_rows(batch, len(scores)):
            self._image_ids.append(int(batch["image_id"][row]))
            keep = np.flatnonzero((scores[row] > 0) & (labels[row] >= 0))
            self._results.extend(
                self._row_results(
                    int(batch["image_id"][row]),
                    boxes[row, keep],
                    scores[row, keep],
                    labels[row, keep],
                    None if masks is None else masks[row, keep],
                    batch["orig_size"][row],
                    batch["scale"][row],
                )
            )

    def _row_results(self, image_id, boxes, scores, labels, masks, orig_size, scale) -> list[dict[str, Any]]:
        if labels.size and labels.max() >= self.category_ids.size:
            raise ValueError(f"label {labels.max()} has no COCO category id ({self.category_ids.size} given)")
        return coco_detections(
            image_id,
            boxes,
            scores,
            labels,
            masks,
            orig_size,
            scale,
            self.category_ids,
            self.mask_threshold,
            self.box_source,
        )

    def results(self) -> list[dict[str, Any]]:
        """This process's detections in COCO results format (source pixels, COCO category ids)."""
        return list(self._results)

    def write_results(self, path: str) -> None:
        """Writes `results()` as a COCO results json (what the official evaluation server takes)."""
        with open(path, "w") as f:
            json.dump(self._results, f)

    def _ground_truth(self):
        if self._gt is None:
            self._gt = _quiet(self._coco_cls, self.instances_json)
            unknown = sorted(set(self.category_ids.tolist()) - set(self._gt.getCatIds()))
            if unknown:
                raise ConfigError(
                    f"category ids {unknown} are not in {self.instances_json}; check the dataset's classes"
                )
        return self._gt

    def compute(self) -> dict[str, float]:
        gathered = allgather_objects((self._results, self._image_ids))
        results = [r for part, _ in gathered for r in part]
        image_ids = sorted({i for _, ids in gathered for i in ids})
        num_examples = sum(len(ids) for _, ids in gathered)
        gt = self._ground_truth()
        out: dict[str, float] = {}
        for iou_type in self.iou_types:
            stats = self._evaluate(gt, results, image_ids, iou_type)
            out.update({f"{iou_type}_{name}": float(stats[i]) for i, name in enumerate(STAT_NAMES)})
        out["num_examples"] = num_examples
        out["num_detections"] = len(results)
        return out

    def _evaluate(self, gt, results, image_ids, iou_type) -> np.ndarray:
        if not image_ids:
            return np.full(len(STAT_NAMES), -1.0)
        # One field per type (detectron2): loadRes takes a detection's area from its box when a box is
        # present, and segm's small/medium/large ranges must use the mask area.
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dets = [{k: v for k, v in r.items() if k != drop} for r in results]  # loadRes adds keys
        if dets:
            dt = _quiet(gt.loadRes, dets)
        else:  # loadRes cannot take an empty list; no detections scores AP 0 where there is ground truth.
            dt = self._coco_cls()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": gt.dataset["categories"],
                "annotations": [],
            }
            _quiet(dt.createIndex)
        evaluator = self._eval_cls(gt, dt, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = [1, 10, self.max_detections]
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        return np.asarray(evaluator.stats[: len(STAT_NAMES)], np.float64)
