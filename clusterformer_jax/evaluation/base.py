"""The evaluator interface the trainer drives after a jitted predict (big_vision's evaluators, host side).

The trainer runs the task's fixed-shape `predict` on every eval batch, fetches this process's rows with
`jax.device_get` and calls `update(predictions, batch)` with host numpy arrays; after the last batch it calls
`compute()` once. Padding rows (batch['mask'] == 0, added so every process runs the same number of equal
batches) reach `update` too and must be ignored there. `compute` gathers what each process accumulated
(`evaluation.gather`), so every process returns the same dict, with 'num_examples' counting real rows over
all processes. Evaluators are leaves: they import nothing of trainers/ or tasks/.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Evaluator(Protocol):
    """Host-side accumulation of one eval pass; one instance per pass."""

    def update(self, predictions: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> None:
        """Adds this process's rows of one eval batch (numpy); rows with batch['mask'] == 0 are padding."""

    def compute(self) -> dict[str, float]:
        """Gathers across processes and returns the metrics (same dict everywhere, incl. 'num_examples')."""


def real_rows(batch: Mapping[str, np.ndarray], num_rows: int) -> np.ndarray:
    """Indices of the real (non-padding) rows of a host batch of `num_rows`; all when it has no 'mask'."""
    if "mask" not in batch:
        return np.arange(num_rows)
    return np.flatnonzero(np.asarray(batch["mask"]) > 0)
