"""Pieces shared by the classification (`pipeline.py`) and dense (`dense_pipeline.py`) input pipelines.

Both pipelines read a tfds array_record split through grain the same way: a source that decodes on access
and skips unreadable records, one global training stream (shuffle and augmentation seeded from the run's
seed alone) of which process p of P reads rows [p * B/P, (p + 1) * B/P) of each global batch of B, and an
eval pass (process p taking examples p, p + P, ...) padded to whole batches with a 'mask' column. Keeping
these here gives the two pipelines one definition of each, so their sharding, seeding and padding cannot
drift apart.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

_log = logging.getLogger(__name__)

# Consecutive unreadable records after which the split is declared broken.
MAX_CONSECUTIVE_FAILURES = 1000

_skip_lock = threading.Lock()
_skipped = 0


def skipped_examples() -> int:
    """Number of records skipped in this process (by either pipeline) because they failed to load."""
    return _skipped


class DecodedSource:
    """Random-access source yielding `decode(record)`, or None for a record that fails to read or decode.

    tfds data sources decode on `__getitem__`; grain drops the Nones in training and the eval pass masks
    them out. Failures are counted in `skipped_examples()` and logged; many in a row mean the split itself
    is unreadable, which is raised. `decode` must pickle (grain may run it in worker processes).
    """

    def __init__(self, source: Any, description: str, decode: Callable[[Any], dict[str, Any]]):
        self._source = source
        self._description = description
        self._decode = decode
        self._consecutive_failures = 0

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        global _skipped
        try:
            element = self._decode(self._source[index])
        except Exception as e:  # pylint: disable=broad-except
            with _skip_lock:
                _skipped += 1
                self._consecutive_failures += 1
                count, consecutive = _skipped, self._consecutive_failures
            if consecutive >= MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{consecutive} consecutive records of {self._description} failed to load") from e
            if count <= 20 or count % 1000 == 0:
                _log.warning(
                    "Skipping record %d of %s (%d skipped so far): %s: %s",
                    index,
                    self._description,
                    count,
                    type(e).__name__,
                    e,
                )
            return None
        self._consecutive_failures = 0
        return element


class ProcessLayout(NamedTuple):
    """This process's place in the job: it reads examples index, index + count, ... in batches of local_batch."""

    index: int
    count: int
    local_batch: int


def process_layout(global_batch_size: int, process_index: int | None, process_count: int | None) -> ProcessLayout:
    """Checks the layout and splits the global batch; index / count default to JAX's when None."""
    if process_index is None or process_count is None:
        import jax  # Only needed when the caller does not say.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of process_count {process_count}"
        )
    return ProcessLayout(process_index, process_count, global_batch_size // process_count)


def derive_seeds(seed: int) -> tuple[int, int]:
    """Independent 32-bit (shuffle, augmentation) seeds of the global training stream, from `seed`.

    The same in every process (the stream is global); derived as process 0's seeds were when each process
    had its own stream, so a one-process run reads the batches it always did.
    """
    state = np.random.SeedSequence([seed, 0]).generate_state(2)
    return int(state[0]), int(state[1])


class LocalRows(grain.MapDataset):
    """This process's rows of a global stream: of global batch b, the rows at b * B + p * L + r, r < L.

    (B = layout.count * L.) Concatenated in process order, the processes' local batches are the global
    stream's batches, whatever the process count: a run's data does not depend on how many hosts read it.
    An unreadable element (None) is replaced by the next readable one of the stream (which then appears
    twice), a function of the position only, so every process count replaces it alike.
    """

    def __init__(self, parent: grain.MapDataset, layout: ProcessLayout):
        super().__init__(parent)
        self._layout = layout

    def __len__(self) -> int:
        return len(self._parent) // (self._layout.count * self._layout.local_batch) * self._layout.local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._layout.local_batch)
        position = (batch * self._layout.count + self._layout.index) * self._layout.local_batch + row
        for offset in range(MAX_CONSECUTIVE_FAILURES):
            element = self._parent[position + offset]
            if element is not None:
                return element
        raise RuntimeError(f"{MAX_CONSECUTIVE_FAILURES} consecutive training elements from {position} failed to load")

    def __str__(self) -> str:
        return f"LocalRows(process {self._layout.index} of {self._layout.count}, {self._layout.local_batch} rows)"


def read_options(num_threads: int, prefetch_buffer_size: int | None, local_batch: int) -> grain.ReadOptions:
    """grain reader options; the prefetch buffer defaults to two local batches."""
    return grain.ReadOptions(
        num_threads=int(num_threads),
        prefetch_buffer_size=int(2 * local_batch if prefetch_buffer_size is None else prefetch_buffer_size),
    )


class SelectKeys(grain.transforms.Map):
    """Keeps only the requested keys of each element."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: element[k] for k in self.keys}


def batch_local(ds: grain.IterDataset, local_batch: int, num_workers: int = 0) -> grain.IterDataset:
    """Full batches of `local_batch`, optionally computed by `num_workers` grain worker processes.

    Each worker takes every W-th element and grain interleaves their outputs back in order, so the
    batches are the same as without workers.
    """
    if num_workers > 0:
        from absl import flags  # grain's worker processes read absl flags; outside absl.app they are unparsed.

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=num_workers))
    return ds.batch(local_batch, drop_remainder=True)


class EvalElement(grain.transforms.Map):
    """Maps local eval position i of process p to example p + i*P, transformed, with mask 1.

    Past the split's end, or for a record that failed to load, the element is `padding()` with mask 0.
    `transform` and `padding` must pickle (grain may run them in worker processes).
    """

    def __init__(
        self,
        source: DecodedSource,
        process_index: int,
        process_count: int,
        transform: Callable[[dict[str, Any]], dict[str, np.ndarray]],
        padding: Callable[[], dict[str, np.ndarray]],
    ):
        self._source = source
        self._num = len(source)
        self._pi = process_index
        self._pc = process_count
        self._transform = transform
        self._padding = padding

    def map(self, position: int) -> dict[str, np.ndarray]:
        index = self._pi + position * self._pc
        element = self._source[index] if index < self._num else None
        if element is None:
            return {**self._padding(), "mask": np.float32(0.0)}
        return {**self._transform(element), "mask": np.float32(1.0)}


def padded_eval_dataset(
    source: DecodedSource,
    layout: ProcessLayout,
    *,
    transform: Callable[[dict[str, Any]], dict[str, np.ndarray]],
    padding: Callable[[], dict[str, np.ndarray]],
    options: grain.ReadOptions,
    outputs: Sequence[str] | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """One pass over `source` for this process, as full batches with a float32 'mask' (1 real, 0 padding).

    Process p takes examples p, p + P, ...; every process yields ceil(ceil(N / P) / local_batch) batches,
    the last one filled with `padding()` rows, so all processes run the same number of eval steps and the
    masks of all processes sum to N minus unreadable records. `outputs` keeps only those keys (plus
    'mask'). Each `iter()` of the result starts a fresh pass.
    """
    num_batches = math.ceil(math.ceil(len(source) / layout.count) / layout.local_batch)
    element = EvalElement(source, layout.index, layout.count, transform, padding)
    ds = grain.MapDataset.range(num_batches * layout.local_batch).map(element)
    if outputs:
        keys = tuple(outputs) + (() if "mask" in outputs else ("mask",))
        ds = ds.map(SelectKeys(keys))
    return batch_local(ds.to_iter_dataset(options), layout.local_batch, num_workers)
