"""Panoptic quality (PQ / SQ / RQ for all, things, stuff), mAP^Th_pan and mIoU_pan from one panoptic output.

`pq_image` is the project's own numpy PQ with COCO panopticapi's semantics (`pq_compute_single_core`): a
prediction and a ground-truth segment of the same category match when IoU > 0.5, where the union leaves
out the prediction's pixels on ground-truth VOID (id 0); crowd ground truth is never matched and not a
false negative; an unmatched prediction lying more than half on VOID plus its category's crowd region is
no false positive; ground-truth areas come from the json. Per-category TP / FP / FN / IoU sums are additive
over images, so processes sum them (no masks are gathered). `package_pq` runs a kept package (hotcoco, or
panopticapi-lite) on COCO panoptic files; the tests check the two agree.

`PanopticEvaluator.update` maps each real row's segment-id map to the source size (nearest), reads the
ground-truth PNG named by the panoptic json and adds PQ statistics, a semantic confusion matrix (mIoU_pan:
each pixel labelled with its segment's class, void predictions count as no class) and the thing segments as
COCO instance results (mAP^Th_pan: pycocotools segm AP; score = the segment's score, 1 without scores;
ground truth = an instances json, or the panoptic json's thing segments). Predictions are kept as COCO
panoptic PNG bytes (id = R + 256 G + 256^2 B) plus segments_info when a package backend or an output_dir
asks for them; process 0 writes them as `<output_dir>/panoptic_pred.json` + `panoptic_pred/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from clusterformer_jax.data.coco_format import id_to_rgb, png_bytes, rgb_to_id
from clusterformer_jax.evaluation.base import real_rows
from clusterformer_jax.evaluation.gather import allgather_objects, sum_across_processes
from clusterformer_jax.evaluation.semantic import (
    IGNORE_LABEL,
    confusion_matrix,
    map_prediction,
    row_predictions,
    semantic_metrics,
)

VOID = 0
OFFSET = 256 * 256 * 256
BACKENDS = ("numpy", "hotcoco", "panopticapi")
GROUPS = (("All", None, ""), ("Things", True, "_th"), ("Stuff", False, "_st"))


def pq_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
    category_index: Mapping[int, int],
) -> np.ndarray:
    """float64 (4, K) [TP, FP, FN, IoU sum] per category index of one image (panopticapi semantics).

    Segments are COCO segments_info dicts (id, category_id, iscrowd; ground truth also area). A prediction
    id in the map without a segment, or a segment without pixels, raises KeyError as in panopticapi.
    """
    stats = np.zeros((4, len(category_index)), np.float64)
    gt_segs = {int(s["id"]): s for s in gt_segments}
    pred_segs = {int(s["id"]): s for s in pred_segments}
    labels, counts = np.unique(np.asarray(pred_ids, np.int64), return_counts=True)
    pred_area = {}
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segs:
            if label == VOID:
                continue
            raise KeyError(f"predicted segment {label} is in the PNG but not in segments_info")
        pred_area[label] = count
    missing = sorted(set(pred_segs) - set(pred_area))
    if missing:
        raise KeyError(f"predicted segments {missing} are in segments_info but not in the PNG")
    joint = np.asarray(gt_ids, np.uint64) * np.uint64(OFFSET) + np.asarray(pred_ids, np.uint64)
    pairs, inter = np.unique(joint, return_counts=True)
    overlap = {(int(p // OFFSET), int(p % OFFSET)): int(n) for p, n in zip(pairs.tolist(), inter.tolist())}
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in overlap.items():
        if gt_label not in gt_segs or pred_label not in pred_segs:
            continue
        gt, pred = gt_segs[gt_label], pred_segs[pred_label]
        if int(gt.get("iscrowd", 0)) == 1 or int(gt["category_id"]) != int(pred["category_id"]):
            continue
        gt_area = int(gt["area"]) if "area" in gt else int(np.count_nonzero(gt_ids == gt_label))
        union = pred_area[pred_label] + gt_area - intersection - overlap.get((VOID, pred_label), 0)
        iou = intersection / union
        if iou > 0.5:
            k = category_index[int(gt["category_id"])]
            stats[0, k] += 1
            stats[3, k] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd = {}
    for gt_label, gt in gt_segs.items():
        if gt_label in gt_matched:
            continue
        if int(gt.get("iscrowd", 0)) == 1:
            crowd[int(gt["category_id"])] = gt_label
            continue
        stats[2, category_index[int(gt["category_id"])]] += 1
    for pred_label, pred in pred_segs.items():
        if pred_label in pred_matched:
            continue
        ignored = overlap.get((VOID, pred_label), 0)
        if int(pred["category_id"]) in crowd:
            ignored += overlap.get((crowd[int(pred["category_id"])], pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue
        stats[1, category_index[int(pred["category_id"])]] += 1
    return stats


def pq_from_stats(stats: np.ndarray, category_ids: Sequence[int], is_thing: Sequence[bool]) -> dict[str, Any]:
    """panopticapi's result layout from (4, K) stats: {'All'|'Things'|'Stuff': {pq, sq, rq, n}, 'per_class'}.

    A category with no TP, FP or FN is skipped (per-class 0); a group with none scored is NaN.
    """
    tp, fp, fn, iou = np.asarray(stats, np.float64)
    per_class, out = {}, {}
    for k, cat in enumerate(category_ids):
        denominator = tp[k] + 0.5 * fp[k] + 0.5 * fn[k]
        if denominator == 0:
            per_class[int(cat)] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        sq = iou[k] / tp[k] if tp[k] else 0.0
        per_class[int(cat)] = {"pq": iou[k] / denominator, "sq": sq, "rq": tp[k] / denominator}
    for name, thing, _ in GROUPS:
        scored = [
            k
            for k in range(len(category_ids))
            if (thing is None or bool(is_thing[k]) == thing) and tp[k] + fp[k] + fn[k] > 0
        ]
        values = {m: [per_class[int(category_ids[k])][m] for k in scored] for m in ("pq", "sq", "rq")}
        out[name] = {m: float(np.mean(v)) if v else float("nan") for m, v in values.items()}
        out[name]["n"] = len(scored)
    out["per_class"] = per_class
    return out


def flatten_pq(results: Mapping[str, Any], names: Mapping[int, str] | None = None) -> dict[str, float]:
    """{'PQ', 'SQ', 'RQ', 'PQ_th', ..., 'RQ_st', 'PQ/<class>'} from panopticapi's result layout."""
    out = {}
    for name, _, suffix in GROUPS:
        for metric in ("pq", "sq", "rq"):
            out[f"{metric.upper()}{suffix}"] = float(results[name][metric])
    for cat, values in results.get("per_class", {}).items():
        label = names.get(int(cat), str(cat)) if names else str(cat)
        out[f"PQ/{label}"] = float(values["pq"])
    return out


def read_panoptic_png(path: str) -> np.ndarray:
    """Segment ids (H, W) int32 of a COCO panoptic PNG."""
    with Image.open(path) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def package_pq(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str, backend: str = "hotcoco"):
    """PQ of COCO panoptic files by a kept package, in panopticapi's result layout (stdout captured).

    panopticapi runs its per-image core in this process (its `pq_compute` forks a worker pool, which is
    unsafe in a process that has started JAX's threads); hotcoco runs its own `pq_compute`.
    """
    if backend not in BACKENDS[1:]:
        raise ValueError(f"package backend must be one of {BACKENDS[1:]}, got {backend!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if backend == "hotcoco":
            from hotcoco.panoptic import pq_compute

            results = pq_compute(gt_json, pred_json, gt_folder=gt_folder, pred_folder=pred_folder)
        else:
            results = _panopticapi_pq(gt_json, gt_folder, pred_json, pred_folder)
    logging.debug("%s", out.getvalue().rstrip())
    return results


def _panopticapi_pq(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str) -> dict[str, Any]:
    """panopticapi's `pq_compute` without its process pool: `pq_compute_single_core` over every image."""
    from panopticapi.evaluation import pq_compute_single_core

    with open(gt_json) as f:
        gt = json.load(f)
    with open(pred_json) as f:
        preds = {a["image_id"]: a for a in json.load(f)["annotations"]}
    missing = [a["image_id"] for a in gt["annotations"] if a["image_id"] not in preds]
    if missing:
        raise ValueError(f"no prediction for images {missing[:5]} of {gt_json}")
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, preds[a["image_id"]]) for a in gt["annotations"]]
    stat = pq_compute_single_core(0, pairs, gt_folder, pred_folder, categories)
    results: dict[str, Any] = {}
    for name, thing, _ in GROUPS:
        results[name], per_class = stat.pq_average(categories, isthing=thing)
        if thing is None:
            results["per_class"] = per_class
    return results


def _quiet(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        return fn(*args)


class PanopticEvaluator:
    """PQ / SQ / RQ (all, things, stuff), mAP^Th_pan and mIoU_pan against COCO panoptic ground truth.

    predictions per row: 'panoptic' int (B, h, w) segment ids covering the eval canvas (any resolution;
    0 = void) or a list of per-row source-size maps; 'segment_classes' int (B, K) contiguous class of segment
    id k + 1 (-1: none); optional 'segment_scores' float (B, K). batch: 'mask', 'image_id', 'orig_size',
    'scale' (or 'image_mask'). `category_ids[c]` is the json category id of contiguous class c.
    """

    def __init__(
        self,
        panoptic_json: str,
        panoptic_png_dir: str,
        category_ids: Sequence[int],
        backend: str = "numpy",
        output_dir: str | None = None,
        instances_json: str | None = None,
        compute_ap: bool = True,
        max_detections: int = 100,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"panoptic backend must be one of {BACKENDS}, got {backend!r}")
        for path in (panoptic_json, panoptic_png_dir):
            if not path or not os.path.exists(os.path.expanduser(path)):
                raise ValueError(f"panoptic ground truth {path!r} does not exist; prepare the dataset first")
        self.panoptic_json = os.path.expanduser(panoptic_json)
        self.panoptic_png_dir = os.path.expanduser(panoptic_png_dir)
        with open(self.panoptic_json) as f:
            gt = json.load(f)
        self.categories = gt["categories"]
        self.category_ids = [int(c) for c in category_ids]
        by_id = {int(c["id"]): c for c in self.categories}
        if sorted(by_id) != sorted(self.category_ids):
            raise ValueError(f"category ids {self.category_ids} differ from {self.panoptic_json}'s {sorted(by_id)}")
        self.is_thing = [bool(by_id[c].get("isthing", 0)) for c in self.category_ids]
        self.names = {c: str(by_id[c].get("name", c)) for c in self.category_ids}
        self.index = {c: k for k, c in enumerate(self.category_ids)}
        self._images = {int(im["id"]): im for im in gt.get("images", [])}
        self._annotations = {int(a["image_id"]): a for a in gt["annotations"]}
        self.backend = backend
        self.output_dir = output_dir
        self.instances_json = instances_json
        self.compute_ap = bool(compute_ap)
        self.max_detections = int(max_detections)
        self.reset()

    def reset(self) -> None:
        num = len(self.category_ids)
        self._stats = np.zeros((4, num), np.float64)
        self._confusion = np.zeros((num, num + 1), np.int64)
        self._results: list[dict[str, Any]] = []
        self._gt_instances: list[dict[str, Any]] = []
        self._kept: list[tuple[dict[str, Any], bytes]] = []
        self._image_ids: list[int] = []
        self._unlisted = 0

    def _ground_truth(self, image_id: int, orig_size: Sequence[int]) -> tuple[np.ndarray, list, str]:
        if image_id not in self._annotations:
            raise ValueError(f"image {image_id} has no annotation in {self.panoptic_json}")
        ann = self._annotations[image_id]
        name = os.path.splitext(ann["file_name"])[0] + ".png"
        path = os.path.join(self.panoptic_png_dir, name)
        ids = read_panoptic_png(path)
        image = self._images.get(image_id, {})
        expected = (int(image.get("height", orig_size[0])), int(image.get("width", orig_size[1])))
        if ids.shape != expected or ids.shape != tuple(int(v) for v in orig_size):
            raise ValueError(f"{path}: annotation PNG is {ids.shape}, image {image_id} is {expected}")
        listed = {int(s["id"]) for s in ann["segments_info"]}
        unlisted = sorted(set(np.unique(ids).tolist()) - listed - {VOID})
        if unlisted:
            self._unlisted += len(unlisted)
            logging.warning("%s: segments %s are not in %s; ignored", path, unlisted[:5], self.panoptic_json)
        return ids, ann["segments_info"], name

    def _prediction(self, predictions: Mapping[str, Any], row: int, orig_size: Sequence[int], batch):
        """Source-size id map with unowned ids set to void, and its segments [(id, class, score)]."""
        ids, on_canvas = row_predictions(predictions, "panoptic", row)
        ids = map_prediction(ids.astype(np.int64), batch, row, orig_size, on_canvas)
        classes = np.asarray(predictions["segment_classes"][row], np.int64)
        scores = predictions.get("segment_scores")
        scores = np.ones(classes.shape, np.float64) if scores is None else np.asarray(scores[row], np.float64)
        if classes.size and classes.max() >= len(self.category_ids):
            raise ValueError(f"segment class {classes.max()} has no category ({len(self.category_ids)} given)")
        owned = np.concatenate([[False], classes >= 0])
        ids = np.where((ids > 0) & (ids <= classes.size), ids, 0)
        ids = np.where(owned[ids], ids, 0)
        present = [int(i) for i in np.unique(ids) if i != VOID]
        return ids, [(i, int(classes[i - 1]), float(scores[i - 1])) for i in present]

    def update(self, predictions: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        for row in real_rows(batch, len(predictions["segment_classes"])):
            image_id = int(batch["image_id"][row])
            orig_size = tuple(int(v) for v in batch["orig_size"][row])
            gt_ids, gt_segments, name = self._ground_truth(image_id, orig_size)
            pred_ids, segments = self._prediction(predictions, row, orig_size, batch)
            pred_info = [{"id": i, "category_id": self.category_ids[c], "iscrowd": 0} for i, c, _ in segments]
            try:
                self._stats += pq_image(gt_ids, gt_segments, pred_ids, pred_info, self.index)
            except KeyError as e:
                raise ValueError(f"image {image_id} ({name}): {e}") from e
            self._add_semantic(gt_ids, gt_segments, pred_ids, segments)
            if self.compute_ap:
                self._add_instances(image_id, gt_ids, gt_segments, pred_ids, segments)
            if self.backend != "numpy" or self.output_dir:
                for info in pred_info:
                    info["area"] = int(np.count_nonzero(pred_ids == info["id"]))
                record = {"image_id": image_id, "file_name": name, "segments_info": pred_info}
                self._kept.append((record, png_bytes(id_to_rgb(pred_ids))))
            self._image_ids.append(image_id)

    def _add_semantic(self, gt_ids, gt_segments, pred_ids, segments) -> None:
        gt_lut = {int(s["id"]): self.index[int(s["category_id"])] for s in gt_segments}
        gt_sem = np.full(gt_ids.shape, IGNORE_LABEL, np.int64)
        for sid, k in gt_lut.items():
            gt_sem[gt_ids == sid] = k
        pred_lut = np.full(int(pred_ids.max()) + 1, -1, np.int64)
        for i, c, _ in segments:
            pred_lut[i] = c
        self._confusion += confusion_matrix(gt_sem, pred_lut[pred_ids], len(self.category_ids), IGNORE_LABEL)

    def _add_instances(self, image_id, gt_ids, gt_segments, pred_ids, segments) -> None:
        from pycocotools import mask as mask_util

        def rle(binary):
            encoded = mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))
            return {"size": list(binary.shape), "counts": encoded["counts"].decode("ascii")}

        for i, c, score in segments:
            if self.is_thing[c]:
                self._results.append(
                    {
                        "image_id": image_id,
                        "category_id": self.category_ids[c],
                        "score": score,
                        "segmentation": rle(pred_ids == i),
                    }
                )
        if self.instances_json is None:
            for s in gt_segments:
                if self.is_thing[self.index[int(s["category_id"])]]:
                    binary = gt_ids == int(s["id"])
                    self._gt_instances.append(
                        {
                            "image_id": image_id,
                            "category_id": int(s["category_id"]),
                            "iscrowd": int(s.get("iscrowd", 0)),
                            "segmentation": rle(binary),
                            "area": float(np.count_nonzero(binary)),
                            "bbox": list(s.get("bbox", [0, 0, 0, 0])),
                        }
                    )

    def compute(self) -> dict[str, float]:
        totals = sum_across_processes(np.concatenate([self._stats.ravel(), self._confusion.ravel().astype(np.float64)]))
        stats = totals[: self._stats.size].reshape(self._stats.shape)
        confusion = totals[self._stats.size :].reshape(self._confusion.shape)
        gathered = allgather_objects(
            (self._image_ids, self._results, self._gt_instances, self._kept, self._unlisted)
            if self.backend != "numpy" or self.output_dir
            else (self._image_ids, self._results, self._gt_instances, [], self._unlisted)
        )
        image_ids = sorted({i for part in gathered for i in part[0]})
        kept = [k for part in gathered for k in part[3]]
        own = pq_from_stats(stats, self.category_ids, self.is_thing)
        out = flatten_pq(own, self.names)
        if self.output_dir or self.backend != "numpy":
            out.update(self._package_and_write(image_ids, kept))
        names = [self.names[c] for c in self.category_ids]
        semantic = semantic_metrics(confusion, names)
        out["mIoU_pan"] = semantic["mIoU"]
        if self.compute_ap:
            results = [r for part in gathered for r in part[1]]
            gt_instances = [a for part in gathered for a in part[2]]
            out.update(self._thing_ap(image_ids, results, gt_instances))
        out["num_examples"] = sum(len(part[0]) for part in gathered)
        out["gt_unlisted_segments"] = sum(part[4] for part in gathered)
        return out

    def _package_and_write(self, image_ids: list[int], kept: list) -> dict[str, float]:
        """Process 0 writes the predictions (output_dir or a temporary folder) and runs the package."""
        import jax

        result: dict[str, float] = {}
        if jax.process_index() == 0:
            with tempfile.TemporaryDirectory() as scratch:
                folder = self.output_dir or scratch
                pred_dir = os.path.join(folder, "panoptic_pred")
                os.makedirs(pred_dir, exist_ok=True)
                for record, data in kept:
                    with open(os.path.join(pred_dir, record["file_name"]), "wb") as f:
                        f.write(data)
                pred_json = os.path.join(folder, "panoptic_pred.json")
                with open(pred_json, "w") as f:
                    json.dump({"annotations": [r for r, _ in kept], "categories": self.categories}, f)
                if self.backend != "numpy":
                    seen = set(image_ids)
                    gt_json = os.path.join(scratch, "panoptic_gt.json")
                    with open(gt_json, "w") as f:
                        json.dump(
                            {
                                "images": [im for i, im in self._images.items() if i in seen],
                                "annotations": [a for i, a in self._annotations.items() if i in seen],
                                "categories": self.categories,
                            },
                            f,
                        )
                    results = package_pq(gt_json, self.panoptic_png_dir, pred_json, pred_dir, self.backend)
                    result = {f"{self.backend}/{k}": v for k, v in flatten_pq(results, self.names).items()}
        return allgather_objects(result)[0]

    def _thing_ap(self, image_ids, results, gt_instances) -> dict[str, float]:
        """pycocotools segm AP / AP50 of the thing segments (-1 without thing ground truth)."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        things = [c for c in self.categories if c.get("isthing", 0)]
        if self.instances_json is not None:
            gt = _quiet(COCO, os.path.expanduser(self.instances_json))
        else:
            gt = COCO()
            images = [self._images.get(i, {"id": i}) for i in image_ids]
            annotations = [dict(a, id=n + 1) for n, a in enumerate(gt_instances)]
            gt.dataset = {"images": images, "annotations": annotations, "categories": things}
            _quiet(gt.createIndex)
        if results:
            dt = _quiet(gt.loadRes, [dict(r) for r in results])
        else:
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [], "categories": things}
            _quiet(dt.createIndex)
        evaluator = COCOeval(gt, dt, "segm")
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = [1, 10, self.max_detections]
        for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
            _quiet(step)
        return {"mAP_th_pan": float(evaluator.stats[0]), "AP50_th_pan": float(evaluator.stats[1])}
