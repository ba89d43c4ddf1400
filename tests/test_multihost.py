"""Multi-host: the training data do not depend on the process count, and a 2-process run equals a 1-process one.

The pipelines read one global training stream; process p of P takes rows [p * B/P, (p + 1) * B/P) of each
global batch (`common.LocalRows`). So 2 processes x 1 CPU device (jax.distributed on 127.0.0.1) train on
exactly the batches of 1 process x 2 devices, on the same 2-device mesh, and must end with the same losses,
parameters and (gathered) eval metrics.
"""

from __future__ import annotations

import json

import grain
import ml_collections
import numpy as np
import pytest

from clusterformer_jax import plot
from clusterformer_jax.data import common
from clusterformer_jax.data import dense_pipeline
from clusterformer_jax.data import digits as digits_lib
from clusterformer_jax.data import pipeline
from clusterformer_jax.data import shapes as shapes_lib
from tests import tiny_run


def _global_batches(create, cfg, process_count: int, num_batches: int, global_batch: int) -> list[dict]:
    """The first global batches as P processes read them, local batches concatenated in process order."""
    iterators = [
        create(cfg, seed=11, global_batch_size=global_batch, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    out = []
    for _ in range(num_batches):
        local = [next(it) for it in iterators]
        out.append({k: np.concatenate([b[k] for b in local]) for k in local[0]})
    return out


def _assert_batches_equal(got: list[dict], want: list[dict]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_classification_train_batches_do_not_depend_on_process_count(tmp_path):
    digits_lib.prepare_digits(str(tmp_path))
    cfg = ml_collections.ConfigDict(
        dict(dataset="digits", data_dir=str(tmp_path), image_size=16, train_augment="inception_crop", num_threads=0)
    )
    one = _global_batches(pipeline.create_train_iterator, cfg, 1, 3, 12)
    for count in (2, 3):
        _assert_batches_equal(_global_batches(pipeline.create_train_iterator, cfg, count, 3, 12), one)


def test_dense_train_batches_do_not_depend_on_process_count(tmp_path):
    shapes_lib.prepare_shapes(str(tmp_path), "small")
    cfg = dict(dataset="shapes", data_dir=str(tmp_path), shapes_variant="small", train_crop_size=32, num_threads=0)
    one = _global_batches(dense_pipeline.create_train_iterator, cfg, 1, 2, 4)
    _assert_batches_equal(_global_batches(dense_pipeline.create_train_iterator, cfg, 2, 2, 4), one)


def test_local_rows_replace_unreadable_elements_alike_for_every_process_count():
    stream = grain.MapDataset.source([None if i in (2, 7, 8) else i for i in range(24)])
    rows = {
        count: np.concatenate(
            [
                [common.LocalRows(stream, common.process_layout(6, p, count))[j] for j in range(b, b + 6 // count)]
                for b in range(0, 3 * (6 // count), 6 // count)
                for p in range(count)
            ]
        )
        for count in (1, 2, 3)
    }
    assert rows[1].tolist() == [0, 1, 3, 3, 4, 5, 6, 9, 9, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    for count in (2, 3):
        np.testing.assert_array_equal(rows[count], rows[1])


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # beside the other users of the session's reference runs
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_reference, tiny_reference_two_processes):
    """2 processes x 1 device vs 1 process x 2 devices: same mesh, same global batches, 20 steps + final eval
    (the session's two uninterrupted reference runs, tests/conftest.py; test_preemption resumes against them).

    Bitwise equal: the programs are the same and the only cross-device reduction (the gradient and metric
    all-reduce over the 2-device data axis, through the cross-process CPU collectives in one run and
    in-process in the other) adds two partial sums, which is commutative. With more devices on a reduced
    axis the reduction order could differ between the two and change the last bits.
    """
    single, multi = tiny_reference, tiny_reference_two_processes
    steps = tiny_run.TOTAL_STEPS
    losses = [[v for _, v in plot.read_scalars(str(w))["train_loss"]] for w in (multi, single)]
    assert len(losses[0]) == steps and losses[0] == losses[1]
    tiny_run.assert_states_equal(tiny_run.stored_state(multi, steps), tiny_run.stored_state(single, steps))
    results = [json.loads((w / "results.json").read_text()) for w in (multi, single)]
    assert results[0]["mesh"] == results[1]["mesh"] == {"data": 2, "fsdp": 1}
    assert results[0]["eval_num_examples"] == results[1]["eval_num_examples"] == 360  # gathered over processes
    assert [results[0][k] for k in ("top1", "top5", "loss")] == [results[1][k] for k in ("top1", "top5", "loss")]
