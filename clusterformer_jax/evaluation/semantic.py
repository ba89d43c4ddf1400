"""Semantic segmentation mIoU from a confusion matrix summed over the split and across processes (mmseg).

`update` maps each real row's prediction onto the ground truth it is scored against and adds to a
num_classes x num_classes confusion matrix (rows: ground truth, columns: prediction; np.bincount):

  * with ``ground_truth`` (a callable image_id -> (H, W) label map at the source size, e.g. ADE20K's
    annotation PNGs through data/ade20k.SourceLabels, which the semantic task passes), predictions are
    mapped to the source size ``batch['orig_size']`` (mmseg: logits resized to the original image before
    scoring);
  * without it, the batch's own ``batch['semantic']`` is the ground truth, cropped to the valid canvas
    region round(orig_size * scale) (the eval image sits at the canvas' top-left), and predictions are
    mapped to that region. With scale 1 (the shapes dataset) the two agree.

A prediction covers the eval canvas at any resolution (canvas pixels or a stride-s grid): label maps are
sampled by nearest neighbour at the target pixel centres, logits bilinearly (half-pixel centres, edges
replicated) before the argmax. A list of per-row maps is taken as already at the source size.
`compute` follows mmseg: IoU_c = TP / (GT_c + Pred_c - TP) and Acc_c = TP / GT_c, NaN for a class with a zero
denominator, mIoU / mAcc the NaN-skipping means, aAcc = sum TP / sum GT. Values are fractions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clusterformer_jax.evaluation.base import real_rows
from clusterformer_jax.evaluation.gather import sum_across_processes

IGNORE_LABEL = 255


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int = IGNORE_LABEL):
    """int64 (C, C + 1) counts of (ground truth, prediction) over pixels whose label is not `ignore_label`.

    Column C counts pixels predicted as no class (pred < 0 or >= C: void in a panoptic map). A ground-truth
    label other than `ignore_label` outside [0, C) raises ValueError (never scored as a wrong class).
    """
    gt = np.asarray(gt, np.int64).ravel()
    pred = np.asarray(pred, np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} pixels and the prediction {pred.size}")
    valid = gt != ignore_label
    gt, pred = gt[valid], pred[valid]
    bad = (gt < 0) | (gt >= num_classes)
    if bad.any():
        raise ValueError(f"ground-truth labels {sorted(set(gt[bad].tolist()))[:5]} outside [0, {num_classes})")
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)
    counts = np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def semantic_metrics(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """mIoU, mAcc, aAcc and per-class IoU / Acc from a (C, C) or (C, C + 1) confusion matrix (mmseg).

    A last column C + 1 counts pixels predicted as no class: they lower the recall of their ground-truth
    class and belong to no class's prediction area. Classes with a zero denominator are NaN and skipped.
    """
    confusion = np.asarray(confusion, np.float64)
    num_classes = confusion.shape[0]
    tp = np.diag(confusion[:, :num_classes])
    gt_area = confusion.sum(axis=1)
    pred_area = confusion[:, :num_classes].sum(axis=0)
    union = gt_area + pred_area - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_area > 0, tp / gt_area, np.nan)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    scored = ~np.isnan(iou)
    out = {
        "mIoU": float(np.mean(iou[scored])) if scored.any() else float("nan"),
        "mAcc": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else float("nan"),
        "aAcc": float(tp.sum() / gt_area.sum()) if gt_area.sum() > 0 else float("nan"),
        "num_classes_scored": int(scored.sum()),
    }
    out.update({f"IoU/{names[c]}": float(iou[c]) for c in range(num_classes)})
    out.update({f"Acc/{names[c]}": float(acc[c]) for c in range(num_classes)})
    return out


# ---------------------------------------------------------------------------- resampling


def _nearest_index(out_size: int, region: float, cells: int) -> np.ndarray:
    """Cell sampled by each output pixel: its centre (p + 0.5) * region / out_size, floored, clipped."""
    g = (np.arange(out_size, dtype=np.float64) + 0.5) * (region / out_size)
    return np.clip(np.floor(g), 0, cells - 1).astype(np.intp)


def _bilinear_weights(out_size: int, region: float, cells: int) -> np.ndarray:
    """float32 (out_size, cells) bilinear weights (half-pixel centres, edges replicated)."""
    g = np.clip((np.arange(out_size, dtype=np.float64) + 0.5) * (region / out_size) - 0.5, 0.0, cells - 1)
    lo = np.floor(g).astype(np.intp)
    hi = np.minimum(lo + 1, cells - 1)
    weights = np.zeros((out_size, cells), np.float64)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1.0 - g + lo)
    np.add.at(weights, (rows, hi), g - lo)
    return weights.astype(np.float32)


def resample(
    values: np.ndarray, region: Sequence[float], out_size: Sequence[int], bilinear: bool = False
) -> np.ndarray:
    """Samples the top-left `region` (rows, cols; fractional allowed) of `values` (h, w[, C]) at `out_size`.

    Output pixel p reads position (p + 0.5) * region / out_size of the map: nearest cell for labels (ids,
    classes), bilinear for scores or logits. `region` equal to `out_size` is a plain crop.
    """
    values = np.asarray(values)
    cells = [max(1, min(values.shape[a], int(np.ceil(region[a] - 1e-9)))) for a in (0, 1)]
    if not bilinear:
        rows = _nearest_index(int(out_size[0]), float(region[0]), cells[0])
        cols = _nearest_index(int(out_size[1]), float(region[1]), cells[1])
        return values[np.ix_(rows, cols)]
    wy = _bilinear_weights(int(out_size[0]), float(region[0]), cells[0])
    wx = _bilinear_weights(int(out_size[1]), float(region[1]), cells[1])
    block = values[: cells[0], : cells[1]].astype(np.float32)
    if block.ndim == 2:
        return wy @ block @ wx.T
    return np.einsum("ai,ijc,bj->abc", wy, block, wx, optimize=True)


def canvas_shape(batch: Mapping[str, Any], fallback: Sequence[int]) -> tuple[int, int]:
    """(H, W) of the eval canvas: from image_mask, semantic, panoptic_ids or image; else `fallback`."""
    for key in ("image_mask", "semantic", "panoptic_ids", "image"):
        if key in batch:
            shape = np.shape(batch[key])
            return int(shape[1]), int(shape[2])
    return int(fallback[0]), int(fallback[1])


def valid_shape(batch: Mapping[str, Any], row: int, canvas: Sequence[int]) -> tuple[int, int]:
    """(h, w) canvas pixels the row's image covers: round(orig_size * scale), else image_mask's extent."""
    if "orig_size" in batch and "scale" in batch:
        orig, scale = np.asarray(batch["orig_size"][row], np.float64), np.asarray(batch["scale"][row], np.float64)
        valid = np.floor(orig * scale + 0.5).astype(int)
        return min(int(valid[0]), int(canvas[0])), min(int(valid[1]), int(canvas[1]))
    if "image_mask" in batch:
        mask = np.asarray(batch["image_mask"][row], bool)
        return int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum())
    return int(canvas[0]), int(canvas[1])


def map_prediction(
    pred: np.ndarray,
    batch: Mapping[str, Any],
    row: int,
    out_size: Sequence[int],
    on_canvas: bool,
    bilinear: bool = False,
) -> np.ndarray:
    """A row's prediction sampled at `out_size` (source size, or the valid canvas region).

    `on_canvas`: the map covers the whole eval canvas (any resolution); otherwise it is at the source size
    ``batch['orig_size'][row]`` already.
    """
    pred = np.asarray(pred)
    if on_canvas:
        canvas = canvas_shape(batch, pred.shape[:2])
        valid = valid_shape(batch, row, canvas)
        region = (valid[0] * pred.shape[0] / canvas[0], valid[1] * pred.shape[1] / canvas[1])
    else:
        region = pred.shape[:2]
    if tuple(region) == tuple(out_size) and pred.shape[:2] == tuple(out_size):
        return pred
    return resample(pred, region, out_size, bilinear)


def row_predictions(predictions: Mapping[str, Any], key: str, row: int) -> tuple[np.ndarray, bool]:
    """(row's map, whether it covers the canvas): a stacked array covers the canvas, a list is per source."""
    value = predictions[key]
    if isinstance(value, (list, tuple)):
        return np.asarray(value[row]), False
    return np.asarray(value)[row], True


class SemanticEvaluator:
    """mIoU / mAcc / aAcc over the eval split (see the module docstring).

    predictions: 'semantic' int (B, h, w) class per pixel, or 'semantic_logits' float (B, h, w, C); either
    covering the eval canvas at any resolution, or a list of per-row source-size maps. batch: 'mask'
    (padding rows), 'image_id', 'orig_size', 'scale' (or 'image_mask'), and 'semantic' (B, S, S) when no
    `ground_truth` callable is given.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = IGNORE_LABEL,
        class_names: Sequence[str] | None = None,
        ground_truth: Callable[[int], np.ndarray] | None = None,
    ):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.ground_truth = ground_truth
        self.reset()

    def reset(self) -> None:
        self._confusion = np.zeros((self.num_classes, self.num_classes + 1), np.int64)
        self._count = 0

    def _target(self, batch: Mapping[str, Any], row: int, canvas: Sequence[int]) -> np.ndarray:
        if self.ground_truth is not None:
            image_id = int(batch["image_id"][row])
            gt = np.asarray(self.ground_truth(image_id))
            expected = tuple(int(v) for v in batch["orig_size"][row])
            if gt.shape[:2] != expected:
                raise ValueError(f"ground truth of image {image_id} is {gt.shape[:2]}, its image is {expected}")
            return gt
        if "semantic" not in batch:
            raise ValueError("SemanticEvaluator needs batch['semantic'] or a ground_truth callable")
        vh, vw = valid_shape(batch, row, canvas)
        return np.asarray(batch["semantic"][row])[:vh, :vw]

    def update(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        key = "semantic" if "semantic" in predictions else "semantic_logits"
        logits = key == "semantic_logits"
        for row in real_rows(batch, len(predictions[key])):
            pred, on_canvas = row_predictions(predictions, key, row)
            canvas = canvas_shape(batch, pred.shape[:2])
            gt = self._target(batch, row, canvas)
            mapped = map_prediction(pred, batch, row, gt.shape[:2], on_canvas, bilinear=logits)
            labels = np.argmax(mapped, axis=-1) if logits else mapped
            try:
                self._confusion += confusion_matrix(gt, labels, self.num_classes, self.ignore_label)
            except ValueError as e:
                raise ValueError(f"image {int(batch['image_id'][row]) if 'image_id' in batch else row}: {e}") from e
            self._count += 1

    def confusion(self) -> np.ndarray:
        """This process's (C, C + 1) confusion matrix so far (last column: predictions of no class)."""
        return self._confusion.copy()

    def compute(self) -> dict[str, float]:
        totals = sum_across_processes(np.append(self._confusion.ravel(), self._count))
        confusion = totals[:-1].reshape(self._confusion.shape)
        out = semantic_metrics(confusion, self.class_names)
        out["num_examples"] = int(totals[-1])
        return out
