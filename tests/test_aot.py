"""The ahead-of-time compile check: slice and node table, offline dataset facts, and real cross-compiles of the
quickstart for a TPU slice (libtpu) and a node of absent H100s (jax's CUDA plugin), both installed by
launch/test.sh, with their reports and the one-line "does not fit" exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from clusterformer_jax import accelerators
from clusterformer_jax import aot
from clusterformer_jax.aot import batch_bound, compiler_installed
from clusterformer_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topology_table():
    v5e = accelerators.topology("v5e-8")
    assert (v5e.topology_name, v5e.chip_config_name, v5e.num_chips, v5e.chips_per_host_bounds) == (
        "v5e:2x4",
        "default",
        8,
        (2, 4, 1),
    )
    v4 = accelerators.topology("v4-8")  # 8 TensorCores = 4 megacore chips on one host
    assert (v4.topology_name, v4.chip_config_name, v4.num_chips) == ("v4:2x2x1", "megacore", 4)
    assert accelerators.topology("v5p-16").topology_name == "v5:2x2x2"
    assert accelerators.topology("v5e-16").chips_per_host_bounds == (2, 2, 1)
    h100 = accelerators.topology("h100-16")  # two hosts of 8 GPUs
    assert (h100.platform, h100.chip, h100.topology_name, h100.num_chips) == ("cuda", "h100", "1x2x8", 16)
    assert accelerators.topology("a100-4").topology_name == "1x1x4"
    for unknown in ("v5e-7", "h100-3"):
        with pytest.raises(ValueError, match=f"unknown topology '{unknown}'; known: v4-8"):
            accelerators.topology(unknown)


def test_gpu_target_configs_carry_the_datasheet_figures():
    h100, a100 = accelerators.gpu_target_config("h100"), accelerators.gpu_target_config("a100")
    assert "core_count: 132" in h100 and "cuda_compute_capability { major: 9 minor: 0 }" in h100
    assert "memory_bandwidth: 3350000000000" in h100 and f"device_memory_size: {80 * 2**30}" in h100
    assert "core_count: 108" in a100 and "major: 8 minor: 0" in a100 and "l2_cache_size: 41943040" in a100


def test_roofline_takes_the_binding_resource():
    chip = accelerators.CHIPS["v5e"]
    assert accelerators.roofline_seconds(197e12, 0.0, chip) == pytest.approx(1.0)
    assert accelerators.roofline_seconds(1.0, 819e9 * 2, chip) == pytest.approx(2.0)


def test_one_compile_bounds_the_largest_batch():
    """A step that fits: on memory affine in the batch with a fixed part >= 0, the bound lies at or below the
    largest batch that fits, and is that batch when the temporaries have no fixed part. One that does not fit
    (the TPU compiler may have rematerialised to get there): the batch below it."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        args, fixed_temp, per_image = rng.uniform(0.1, 4.0), rng.uniform(0.0, 3.0), rng.uniform(0.01, 1.0)
        largest = int((16.0 - args - fixed_temp) // per_image)
        batch = int(rng.integers(1, largest + 1))
        temp = fixed_temp + per_image * batch
        step = dict(per_chip_batch=batch, total_gib=args + temp, temporaries_gib=temp, fits=True)
        assert batch <= batch_bound(step, 16.0) <= largest
    # 1 GiB fixed, 0.5 GiB per image
    assert batch_bound(dict(per_chip_batch=8, total_gib=5.0, temporaries_gib=4.0, fits=True), 16.0) == 30
    assert batch_bound(dict(per_chip_batch=128, total_gib=17.05, fits=False), 15.75) == 127


def test_nothing_to_compile_is_an_error():
    with pytest.raises(ValueError, match="nothing to compile: --train=false needs --predict=true"):
        aot.run(None, "v5e-8", 0, 0.0, predict=False, max_batch=False, train=False)


def test_offline_facts_equal_the_prepared_dataset(tmp_path):
    cfg = ml_collections.ConfigDict({"dataset": "digits", "data_dir": str(tmp_path)})
    assert pipeline.offline_dataset_info(cfg) == pipeline.get_dataset_info(cfg)
    row = pipeline.example_spec(cfg, eval_mode=False)
    batch = next(pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((4, *np.shape(v)), np.asarray(v).dtype) for k, v in row.items()
    }
    eval_batch = next(iter(pipeline.create_eval_iterator(cfg, global_batch_size=4)))
    eval_row = pipeline.example_spec(cfg, eval_mode=True)
    assert {k: (v.shape[1:], v.dtype) for k, v in eval_batch.items()} == {
        k: (np.shape(v), np.asarray(v).dtype) for k, v in eval_row.items()
    }


@pytest.mark.skipif(not compiler_installed("tpu"), reason="libtpu not installed (launch/test.sh installs it)")
def test_quickstart_cross_compiles_for_v5e_and_a_small_chip_exits_with_one_line(tmp_path):
    """One real compile for an 8-chip v5e slice: the report's numbers are the compiler's, and checked against
    a memory cap between the predict and the train step's needs, the run exits 1 with one line."""
    report_file = tmp_path / "aot.json"
    command = [
        sys.executable,
        "-m",
        "clusterformer_jax.aot",
        "--config=configs/quickstart.py",
        "--topology=v5e-8",
        f"--json={report_file}",
        "--hbm_gib=0.03",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads(report_file.read_text())
    train, predict = report["train"], report["predict"]
    assert (report["chips"], report["chip"], report["topology"]) == (8, "TPU v5e", "v5e-8")
    assert (train["per_chip_batch"], train["global_batch"], predict["per_chip_batch"]) == (8, 64, 8)
    for step in (train, predict):
        parts = step["arguments_gib"] + step["outputs_gib"] - step["aliased_gib"] + step["temporaries_gib"]
        assert 0 < parts and step["total_gib"] == pytest.approx(parts + step["code_gib"], rel=1e-9)
        assert step["tflop"] > 0 and step["gb_accessed"] > 0 and step["compile_s"] > 0
    # data parallel with replicated parameters: gradients are all-reduced, no activation is ever all-gathered
    assert train["collectives_gib"]["all-reduce"] > 0 and "all-gather" not in train["collectives_gib"]
    # donation: the train state is written in place, so most of the arguments alias the outputs
    assert train["aliased_gib"] > 0.5 * train["arguments_gib"]
    expected_step = max(train["tflop"] / 197.0, train["gb_accessed"] / 819.0)
    assert train["roofline_step_s"] == pytest.approx(expected_step, rel=1e-6)
    assert train["schedule_chip_hours"] == pytest.approx(expected_step * train["total_steps"] * 8 / 3600, rel=1e-6)
    assert predict["total_gib"] < 0.03 < train["total_gib"]  # the cap sits between the two
    assert (predict["fits"], train["fits"]) == (True, False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: the train step does not fit on v5e-8: needs 0.")
    assert "0.03 GiB available" in errors[0]


@pytest.mark.skipif(not compiler_installed("cuda"), reason="jax's CUDA plugin not installed (launch/test.sh)")
def test_quickstart_cross_compiles_for_an_h100_node_without_a_gpu(tmp_path):
    """XLA's GPU compiler, given only the H100's description, compiles the quickstart's predict step for 8 GPUs
    (``--train=false``: the train step's GPU compile takes ~35 s here, the predict step's 5; the train step's
    collectives and donation are checked on the TPU compile above): memory per GPU from its analysis (no cost
    analysis without a device), and the same one-line exit under a memory cap."""
    report_file = tmp_path / "aot.json"
    command = [sys.executable, "-m", "clusterformer_jax.aot", "--config=configs/quickstart.py", "--topology=h100-8"]
    command += ["--train=false", f"--json={report_file}", "--hbm_gib=0.004"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads(report_file.read_text())
    predict = report["predict"]
    assert (report["chips"], report["chip"], report["topology"]) == (8, "NVIDIA H100 SXM", "h100-8")
    assert "train" not in report and (predict["per_chip_batch"], predict["global_batch"]) == (8, 64)
    parts = predict["arguments_gib"] + predict["outputs_gib"] - predict["aliased_gib"] + predict["temporaries_gib"]
    assert 0.004 < parts <= predict["total_gib"] and predict["compile_s"] > 0 and not predict["fits"]
    assert "tflop" not in predict and "roofline_step_s" not in predict
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: the predict step does not fit on h100-8: needs 0.01")
