"""Top-1 / top-5 / loss over an eval split behind the `Evaluator` interface.

The task computes per-example values on device ('loss', 'top1', 'top5' as 0/1 floats); this evaluator sums
them over real rows in float64 on the host and adds the sums of all processes in `compute`. Given raw
'logits' and 'labels' instead, it computes top-1 / top-`top_k` itself (ties counted against the label, as
the task's on-device metric does).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from clusterformer_jax.evaluation.base import real_rows
from clusterformer_jax.evaluation.gather import sum_across_processes

_KEYS = ("loss", "top1", "top5")


def _topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    label_logit = np.take_along_axis(logits, labels[:, None].astype(np.intp), axis=-1)
    return (np.sum(logits > label_logit, axis=-1) < k).astype(np.float64)


class ClassificationEvaluator:
    """Mean loss, top-1 and top-`top_k` accuracy ('top5' is top-min(5, num_classes) by the task's choice)."""

    def __init__(self, top_k: int = 5):
        self.top_k = int(top_k)
        self.reset()

    def reset(self) -> None:
        self._sums = np.zeros(len(_KEYS), np.float64)
        self._count = 0

    def update(self, predictions: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> None:
        rows = real_rows(batch, len(predictions["loss"]))
        if "top1" not in predictions and "logits" in predictions:
            logits = np.asarray(predictions["logits"], np.float64)
            labels = np.asarray(predictions.get("labels", batch.get("label")))
            predictions = {
                "loss": predictions["loss"],
                "top1": _topk_correct(logits, labels, 1),
                "top5": _topk_correct(logits, labels, self.top_k),
            }
        for i, key in enumerate(_KEYS):
            self._sums[i] += float(np.sum(np.asarray(predictions[key], np.float64)[rows]))
        self._count += int(rows.size)

    def compute(self) -> dict[str, float]:
        totals = sum_across_processes(np.append(self._sums, self._count))
        count = int(totals[-1])
        out = {key: float(totals[i] / count) if count else float("nan") for i, key in enumerate(_KEYS)}
        out["num_examples"] = count
        return out
