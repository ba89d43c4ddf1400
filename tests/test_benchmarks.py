"""benchmarks/model_throughput.py: it counts every EM iteration's and every group chunk's FLOPs, whether the EM
scan and the clustering run as loops or not, and without the forward that block rematerialisation recomputes;
a failing row is reported without losing the others; bf16 MFU on a listed accelerator is against its datasheet
peak."""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax import runtime
from clusterformer_jax.models.registry import create_model
from tests import load_benchmark, presets

# the cut nano (tests/presets.py, compiles ~3x faster): still a rolled EM scan whose body XLA counts once, and a
# stage 1 whose 4 KiB chunks (one group: 16 centers x 64 tokens x 4 bytes) make a loop, whatever the widths
SMALL_NANO = presets.NANO_CUT


@pytest.mark.slow
@pytest.mark.usefixtures("persistent_compilation_cache")  # the loop-free copies compile the flat model again
def test_flop_counts_include_every_em_iteration_and_no_recomputed_forward(monkeypatch):
    throughput = load_benchmark("model_throughput.py")
    # one GroupNorm form on both sides: flax's (the CPU's norm_impl) counts a few more elementwise FLOPs
    small = dict(SMALL_NANO, norm_impl="ungrouped")
    monkeypatch.setattr(throughput, "create_model", lambda name, **kw: create_model(name, **{**kw, **small}))
    bench = functools.partial(throughput.bench, "clusterformer_nano", 2, 32, "float32", 1)
    # an accelerator's execution fields: no loop, the FLOPs counted on the timed model
    flat = bench(machine=dict(backend="gpu", num_devices=1))
    # one CPU device with glibc: the EM scan rolled into a loop, and 4 KiB chunks make stage 1 a loop over its
    # groups; counted on a loop-free copy, the same FLOPs
    monkeypatch.setattr(runtime, "GROUP_CHUNK_BYTES", 4096)
    loops = bench(machine=dict(backend="cpu", num_devices=1, allocator="glibc"))
    for key in ("fwd_flops", "step_flops"):
        assert loops[key] == flat[key] > 0
    # block remat: counted on the same model without it, so the train step does not count every block's
    # forward twice
    counted = throughput._flop_count_model("clusterformer_nano", "float32", {"remat": True})
    assert counted is not None and not counted.backbone.get("remat", False)

    # what the count would be without the loop-free copy: XLA counts the loop body once
    model = create_model("clusterformer_nano", em_unroll=1, **SMALL_NANO)
    images = jnp.asarray(np.random.RandomState(0).rand(2, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])  # the count needs no values
    rolled = jax.jit(model.apply).lower(params, images).compile()
    assert "while" in rolled.as_text()
    assert rolled.cost_analysis()["flops"] < 0.99 * flat["fwd_flops"]


def test_a_failing_row_is_reported_and_the_others_kept(monkeypatch, capsys):
    throughput = load_benchmark("model_throughput.py")

    def bench(name, batch, size, dtype, repeats, remat, machine=None):
        if name == "coc_tiny" and not remat:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 29741585472 bytes.\n(more lines)")
        return dict(
            model=name + " +remat" * remat,
            batch=batch,
            size=size,
            dtype=dtype,
            params=10**6,
            gflop_fwd=1.0,
            fwd_s=0.5,
            step_s=2.5 if remat else 2.0,
            fwd_flops=8e9,
            step_flops=24e9,
            temp_mib=1.0 if remat else 3.0,
        )

    monkeypatch.setattr(throughput, "bench", bench)
    monkeypatch.setattr(throughput, "matmul_peak", lambda dtype, n: 1e11)
    argv = ["model_throughput.py", "--models", "coc_tiny", "clusterformer_nano", "--no-append", "--remat", "off", "on"]
    monkeypatch.setattr(sys, "argv", argv)
    throughput.main()
    out = capsys.readouterr().out
    oom = "RESOURCE_EXHAUSTED: Out of memory allocating 29741585472 bytes."
    assert f"- coc_tiny b8 224 failed: RuntimeError: {oom}\n" in out  # its first line, in the notes
    row = "| clusterformer_nano | this | 8 | 224 | 1.00M | 1.00 | 0.500 | 16.00 | 2.000 | 4.00 | 16.0% | 12.0% | 3 |"
    assert row in out
    assert "| coc_tiny +remat | this | 8 | 224 |" in out  # the same model with remat fits
    assert (
        "- clusterformer_nano +remat b8 224: train step x1.25 the time of clusterformer_nano's, "
        "temporaries 3 -> 1 MiB, peak RSS " in out
    )

    monkeypatch.setattr(sys, "argv", argv[:2] + ["coc_tinny"])
    with pytest.raises(SystemExit):
        throughput.main()
    assert "unknown model 'coc_tinny'; available: " in capsys.readouterr().err


def test_bf16_mfu_on_a_listed_accelerator_counts_against_its_datasheet_peak(monkeypatch, capsys):
    throughput = load_benchmark("model_throughput.py")
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert throughput.datasheet_peak(h100, "bfloat16") == pytest.approx(989.4e12)
    assert throughput.datasheet_peak(h100, "float32") is None  # f32 (TF32 on GPUs): the timed matmul
    assert throughput.datasheet_peak(types.SimpleNamespace(platform="gpu", device_kind="NVIDIA L4"), "bfloat16") is None
    assert throughput.datasheet_peak(jax.devices()[0], "bfloat16") is None  # CPU

    def bench(name, batch, size, dtype, repeats, remat, machine=None):
        return dict(
            model=name,
            batch=batch,
            size=size,
            dtype=dtype,
            params=10**6,
            gflop_fwd=1.0,
            fwd_s=1.0,
            step_s=1.0,
            fwd_flops=494.7e12,
            step_flops=3 * 494.7e12 / 4,
            temp_mib=1.0,
        )

    sides = []
    monkeypatch.setattr(throughput, "bench", bench)
    monkeypatch.setattr(throughput, "matmul_peak", lambda dtype, n: sides.append(n) or 700e12)
    monkeypatch.setattr(throughput.jax, "devices", lambda: [h100])
    monkeypatch.setattr(
        sys, "argv", ["model_throughput.py", "--models", "coc_tiny", "--dtype", "bfloat16", "--no-append"]
    )
    throughput.main()
    out = capsys.readouterr().out
    assert sides == [8192]
    assert "MFU against the datasheet's dense bf16 peak of 989.4 TFLOP/s (8192³ matmuls ran at 700.0" in out
    assert "| 50.0% | 37.5% | 1 |" in out  # fwd and train MFU against 989.4, not the 700 measured
