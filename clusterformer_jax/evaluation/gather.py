"""Cross-process gathering for host-side evaluators.

`allgather_objects` moves any picklable object (a list of COCO results, a confusion matrix) from every
process to every process through `multihost_utils.process_allgather` of a zero-padded uint8 buffer plus the
true lengths, so it works on any backend the job runs on (TPU pods, multi-node GPU, multi-process CPU). With
one process nothing distributed is touched. Sums go through the same path so that float64 and int64 host
sums keep their precision (device arrays would be cast to 32 bits without jax_enable_x64).
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in process order (collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [obj]
    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
    buffer = np.zeros(int(lengths.max()), np.uint8)
    buffer[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(buffer))
    return [pickle.loads(gathered[i, : int(n)].tobytes()) for i, n in enumerate(lengths)]


def sum_across_processes(array: Any) -> np.ndarray:
    """Elementwise sum of a host array over processes, in its own dtype (collective)."""
    array = np.asarray(array)
    if jax.process_count() == 1:
        return array
    return np.sum(np.stack(allgather_objects(array)), axis=0).astype(array.dtype)
