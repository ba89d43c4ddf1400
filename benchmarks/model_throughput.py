"""Backbone throughput: forward and train-step images/s, XLA FLOPs, MFU against a matmul peak.

  bash launch/python.sh benchmarks/model_throughput.py        # ClusterFormer-T presets, batch 8, 224
  bash launch/python.sh benchmarks/model_throughput.py --models coc_tiny gmf_miny --batch 8 32 --sizes 224 448
  bash launch/python.sh benchmarks/model_throughput.py --baseline 66645e6   # an older commit, side by side
  bash launch/python.sh benchmarks/model_throughput.py --models clusterformer_small --remat off on  # memory vs time
  bash launch/python.sh benchmarks/model_throughput.py --torch clusterformer_tiny_official swin_tiny_patch4_window7_224
  python benchmarks/model_throughput.py --dtype bfloat16 --batch 32 128 --remat off on   # on a GPU or TPU

launch/python.sh runs it in the project venv with tcmalloc preloaded when the system has it (the header of
each result names the host allocator; PyTorch rows run in the same process, so with the same allocator).

The peak is a float32 (or --dtype) 4096^3 matmul timed in the same process just before the models, so the
MFU column is comparable across rows of one run; on a GPU or TPU listed in BF16_DATASHEET_TFLOPS, bf16 rows
count against the datasheet's dense bf16 peak instead (an 8192^3 matmul is still timed and printed). The
benchmark needs only jax, flax, optax and numpy (torch and timm for --torch). Each timing is the median of
--repeats runs after a warm-up call. A train step is forward + backward + AdamW update with donated
buffers. ``--baseline REV`` checks REV out into a temporary git worktree and times the same models with that
code in a subprocess, then this code in another, and prints the speed ratios (on a shared 2-core VM two
processes of the same code have differed by up to 15%: repeat the pair). ``--torch NAME`` times NAME in
PyTorch (random init, CPU, all cores; needs benchmarks/requirements.txt) in the same process and reports its
MFU against the same peak: clusterformer_{tiny,small}_official is the released model (torch_clusterformer.py,
the issue's anchor, checked against ours by tests/test_torch_anchor.py), anything else a timm model.
Each row starts from a clean slate (the previous row's executables dropped, the allocator's free pages handed
back) and reports XLA's temporary buffers for the train step and the process's peak RSS while its steps ran.
Prints a table and appends it to benchmarks/RESULTS.md with date, machine and versions.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = ("clusterformer_tiny_official", "clusterformer_tiny")


def _code_root() -> str:
    """The tree whose ``clusterformer_jax`` is benchmarked (a baseline worktree when --code-root is given)."""
    if "--code-root" in sys.argv:
        return os.path.abspath(sys.argv[sys.argv.index("--code-root") + 1])
    return REPO


sys.path.insert(0, _code_root())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from clusterformer_jax.models.registry import create_model, list_models  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Dense (no sparsity) bf16 FLOP/s of one JAX device, from the vendors' datasheets, by ``device_kind``: on an
# accelerator the bf16 MFU is against this figure, not a timed matmul (which reaches 60-80% of it on an H100).
BF16_DATASHEET_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H200": 989.4,  # SXM
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "TPU v4": 275.0,  # one chip (JAX device) of two TensorCores
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5": 459.0,  # v5p
    "TPU v6 lite": 918.0,  # v6e (Trillium)
}


def datasheet_peak(device, dtype: str) -> float | None:
    """FLOP/s to count bf16 MFU against on ``device``; None on CPU, for float32 and for unlisted devices."""
    if device.platform == "cpu" or dtype != "bfloat16":
        return None
    tflops = BF16_DATASHEET_TFLOPS.get(device.device_kind)
    return None if tflops is None else tflops * 1e12


def matmul_peak(dtype, n: int = 4096, repeats: int = 3) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return 2 * n**3 / _median_seconds(lambda: jax.block_until_ready(f(a)), repeats)


def _with_execution_settings(name: str, kwargs: dict, machine: dict | None) -> dict:
    """``kwargs`` plus the execution fields the trainer would resolve for this machine (``runtime.py``);
    ``machine`` (backend, num_devices, allocator) overrides what is read from the process."""
    try:
        from clusterformer_jax.runtime import with_execution_settings
    except ImportError:  # code from before execution settings (--baseline): its model read the machine itself
        return kwargs
    from clusterformer_jax.models.registry import model_fields

    return with_execution_settings(model_fields(name), kwargs, **(machine or {}))


def bench(
    name: str, batch: int, size: int, dtype: str, repeats: int, remat: bool = False, machine: dict | None = None
) -> dict:
    kwargs = {"remat": True} if remat else {}
    if name.startswith("clusterformer") and size % 224 == 0 and size != 224:
        kwargs["window_counts"] = _window_counts(size)
    kwargs = _with_execution_settings(name, kwargs, machine)
    model = create_model(name, dtype=dtype, **kwargs)
    images = jnp.asarray(np.random.RandomState(0).rand(batch, size, size, 3), jnp.float32)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, images[:1])
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    labels = jnp.zeros((batch,), jnp.int32)
    mutable = list(extra)  # BatchNorm statistics update in training

    def loss_fn(p, m):
        logits = m.apply(
            {"params": p, **extra},
            images,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(1)},
            mutable=mutable or False,
        )
        logits = logits[0] if mutable else logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(p, o, m):
        grads = jax.grad(loss_fn)(p, m)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    def compile_pair(m):
        fwd = jax.jit(lambda p: m.apply({"params": p, **extra}, images)).lower(params).compile()
        step = jax.jit(functools.partial(train_step, m=m), donate_argnums=(0, 1))
        return fwd, step.lower(params, opt_state).compile()

    counted = _flop_count_model(name, dtype, kwargs)
    if counted is not None:  # counted first and dropped: only one model's executables in memory at a time
        fwd_flops, step_flops = (c.cost_analysis()["flops"] for c in compile_pair(counted))
        jax.clear_caches()
    fwd, step = compile_pair(model)
    if counted is None:
        fwd_flops, step_flops = (c.cost_analysis()["flops"] for c in (fwd, step))
    memory = step.memory_analysis()
    reset_peak_rss()  # compiling (the loop-free copy above all) peaks higher than running
    fwd_s = _median_seconds(lambda: jax.block_until_ready(fwd(params)), repeats)
    time.sleep(0.1)  # XLA frees a call's temporaries up to ~50 ms after its outputs are ready (RESULTS.md)
    release_free_memory()  # what the forward passes freed, so the peak is theirs or the train steps', not both
    state = [params, opt_state]

    def run_step():
        state[0], state[1] = step(state[0], state[1])
        jax.block_until_ready(state[0])

    step_s = _median_seconds(run_step, repeats)
    return dict(
        model=name + (" +remat" if remat else ""),
        batch=batch,
        size=size,
        dtype=dtype,
        params=sum(x.size for x in jax.tree_util.tree_leaves(params)),
        gflop_fwd=fwd_flops / batch / 1e9,
        fwd_s=fwd_s,
        step_s=step_s,
        fwd_flops=fwd_flops,
        step_flops=step_flops,
        temp_mib=getattr(memory, "temp_size_in_bytes", 0) / 2**20,
    )


def _flop_count_model(name: str, dtype: str, kwargs: dict):
    """A copy of the model to count FLOPs on, when the timed one would count wrong; else None.

    XLA's cost analysis counts a while loop's body once, so a ClusterFormer's rolled EM scan (``em_unroll``)
    would hide T-1 of its T iterations, and the group-chunk loop all chunks but one; the copy runs neither
    loop and has the same FLOPs. Block rematerialisation
    (``remat``) adds the recomputed forward to the train step's count; the copy leaves it out, so that MFU
    counts the model's FLOPs only (compiling it allocates none of its buffers).
    """
    count = {k: v for k, v in kwargs.items() if k != "remat"}
    if name.startswith("clusterformer"):
        count.update(_loop_free_overrides())
    return None if count == kwargs else create_model(name, dtype=dtype, **count)


def _loop_free_overrides() -> dict:
    """ClusterFormer fields that run neither the EM scan nor the clustering as a loop."""
    try:
        from clusterformer_jax.models.clustering import MixerConfig  # noqa: F401
    except ImportError:  # code from before MixerConfig (--baseline): the model resolved its loops itself
        return _old_loop_free_overrides()
    return dict(em_unroll=None, group_chunk=None, group_chunk_bytes=None)


def _old_loop_free_overrides() -> dict:
    try:
        from clusterformer_jax.models.clustering import resolve_em_unroll
    except ImportError:  # code older than em_unroll (--baseline): its loop was always rolled
        return {}
    overrides = dict(em_unroll=1 << 16)  # capped at T
    try:
        from clusterformer_jax.models.clustering import resolve_group_chunk
    except ImportError:  # code older than group chunks (--baseline)
        chunked = False
    else:
        chunked = resolve_group_chunk(None, 1 << 30, 1, 1) < 1 << 30
        overrides["group_chunk"] = 1 << 30  # one chunk: every group at once
    return overrides if resolve_em_unroll(None, 2) != 2 or chunked else {}


def _window_counts(size: int) -> tuple[int, ...]:
    """ClusterFormer window counts that keep 7x7-token windows (what "cost linear in pixels" assumes)."""
    return tuple(c * size // 224 for c in (8, 4, 2, 1))


def _torch_model(name: str, size: int):
    """(model, label): the released ClusterFormer transcription (benchmarks/torch_clusterformer.py) for its
    registry names, else timm's ``name``."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_clusterformer

    if name in torch_clusterformer.CONFIGS:
        overrides = {"window_counts": _window_counts(size)} if size != 224 else {}
        return torch_clusterformer.create(name, **overrides), f"{name} (PyTorch {torch.__version__}, released code)"
    # timm imports torchvision, whose CPU wheel pinned with torch 2.13 lacks these two operator schemas
    # (benchmarks/requirements.txt); defining them lets torchvision import. timm models never call them.
    if not hasattr(torch.ops, "torchvision") or not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torch_model.keep = lib
    import timm

    model = timm.create_model(name, pretrained=False, img_size=size) if size != 224 else timm.create_model(name)
    return model, f"{name} (PyTorch {torch.__version__}, timm {timm.__version__})"


def bench_torch(name: str, batch: int, size: int, repeats: int) -> dict:
    """``name`` in PyTorch (random init, float32, all cores): forward and AdamW train step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(os.cpu_count())
    model, label = _torch_model(name, size)
    images = torch.rand(batch, 3, size, size)
    labels = torch.zeros(batch, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.inference_mode():
            model(images)

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()

    model.eval()
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(images)
    fwd_flops = counter.get_total_flops()
    fwd_s = _median_seconds(forward, repeats)
    model.train()
    step_s = _median_seconds(train_step, repeats)
    return dict(
        model=label,
        batch=batch,
        size=size,
        dtype="float32",
        params=sum(p.numel() for p in model.parameters()),
        gflop_fwd=fwd_flops / batch / 1e9,
        fwd_s=fwd_s,
        step_s=step_s,
        fwd_flops=fwd_flops,
        step_flops=3 * fwd_flops,
        temp_mib=float("nan"),
    )


def release_free_memory() -> None:
    """Hands the host allocator's free pages back to the kernel (between rows).

    tcmalloc keeps what the process freed, cut into the sizes the last program used; the next row's program
    (448 after 224) cannot reuse all of it, and the paper preset's 224 + 448 rows went past 24 GiB in one process.
    """
    process = ctypes.CDLL(None)
    if hasattr(process, "MallocExtension_ReleaseFreeMemory"):  # tcmalloc preloaded
        process.MallocExtension_ReleaseFreeMemory()
    elif hasattr(process, "malloc_trim"):  # glibc
        process.malloc_trim(ctypes.c_size_t(0))


def _proc_status_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):  # not Linux
        return float("nan")


def reset_peak_rss() -> None:
    """Returns the allocator's free pages, then sets the kernel's RSS high-water mark to what is left."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def measure_row(run) -> dict:
    """``run()``'s row plus the process's peak RSS while it ran, from a clean slate: the previous row's
    executables dropped, the allocator's free pages returned and the kernel's high-water mark reset (``bench``
    resets it again after compiling, so a JAX row's peak is that of running its steps)."""
    jax.clear_caches()
    reset_peak_rss()
    row = run()
    row["rss_mib"] = _proc_status_mib("VmHWM")
    return row


def run_in_subprocess(tree: str, argv: list[str]) -> tuple[list[dict], float]:
    """Times the rows of ``argv`` with the package of ``tree`` in a fresh process: (rows, matmul peak)."""
    with tempfile.TemporaryDirectory(prefix="cf_rows_") as tmp:
        out = os.path.join(tmp, "rows.json")
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--no-append", "--code-root", tree, "--json-out", out],
            check=True,
        )
        with open(out) as f:
            result = json.load(f)
    return result["rows"], result["peak"]


def run_baseline(rev: str, argv: list[str]) -> tuple[list[dict], float]:
    """Times the same rows with the code of git revision ``rev`` (temporary worktree, subprocess)."""
    tmp = tempfile.mkdtemp(prefix="cf_baseline_")
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    try:
        return run_in_subprocess(tree, argv)
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def table(rows: list[dict], peak: float) -> list[str]:
    lines = [
        "| model | code | batch | size | params | GFLOP/img fwd | fwd s/batch | fwd img/s | train s/step | "
        "train img/s | fwd MFU | train MFU | step temp MiB | peak RSS MiB |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('code', 'this')} | {r['batch']} | {r['size']} | {r['params'] / 1e6:.2f}M | "
            f"{r['gflop_fwd']:.2f} | {r['fwd_s']:.3f} | {r['batch'] / r['fwd_s']:.2f} | {r['step_s']:.3f} | "
            f"{r['batch'] / r['step_s']:.2f} | {r['fwd_flops'] / r['fwd_s'] / peak:.1%} | "
            f"{r['step_flops'] / r['step_s'] / peak:.1%} | {r['temp_mib']:.0f} | {r['rss_mib']:.0f} |"
        )
    return lines


def notes(rows: list[dict], baseline: list[dict], peak: float, base_peak: float = 0.0) -> list[str]:
    out = []
    if baseline and abs(base_peak / peak - 1) > 0.1:
        out.append(
            f"the baseline's process measured a matmul peak of {base_peak / 1e9:.0f} GFLOP/s against "
            f"{peak / 1e9:.0f} here: the machine's speed changed between the two processes, so the ratios "
            "against the baseline below do not measure the code"
        )
    for r in rows:  # resolution scaling
        base = next(
            (
                b
                for b in rows
                if b["model"] == r["model"]
                and b["batch"] == r["batch"]
                and b["size"] == 224
                and b.get("code") == r.get("code")
            ),
            None,
        )
        if base and r["size"] != 224:
            out.append(
                f"{r['model']} b{r['batch']} {r['size']}²/224²: time per image x{r['fwd_s'] / base['fwd_s']:.2f} "
                f"forward, x{r['step_s'] / base['step_s']:.2f} train; pixels x{(r['size'] / 224) ** 2:.1f}"
            )
    for r in rows:  # speedup over the baseline revision
        old = next(
            (b for b in baseline if (b["model"], b["batch"], b["size"]) == (r["model"], r["batch"], r["size"])), None
        )
        if old:
            out.append(
                f"{r['model']} b{r['batch']} {r['size']}: this code is x{old['fwd_s'] / r['fwd_s']:.2f} "
                f"forward, x{old['step_s'] / r['step_s']:.2f} train against {old['code']}"
            )
    for r in rows:  # what block rematerialisation costs and saves
        key = (r["model"], r["batch"], r["size"], r.get("code"))
        plain = next((b for b in rows if (b["model"] + " +remat", b["batch"], b["size"], b.get("code")) == key), None)
        if plain:
            out.append(
                f"{r['model']} b{r['batch']} {r['size']}: train step x{r['step_s'] / plain['step_s']:.2f} the "
                f"time of {plain['model']}'s, temporaries {plain['temp_mib']:.0f} -> {r['temp_mib']:.0f} MiB, "
                f"peak RSS {plain['rss_mib']:.0f} -> {r['rss_mib']:.0f} MiB"
            )
    torch_rows = [r for r in rows if "PyTorch" in r["model"]]
    for t in torch_rows:  # MFU ratio against the PyTorch reference at the same batch and size
        for r in rows:
            if (
                r is not t
                and "PyTorch" not in r["model"]
                and (r["batch"], r["size"]) == (t["batch"], t["size"])
                and r.get("code", "this") == "this"
            ):
                ratio = lambda key, s: (r[key] / r[s]) / (t[key] / t[s])  # noqa: E731
                out.append(
                    f"{r['model']} / {t['model'].split(' ')[0]} (PyTorch) b{r['batch']}: images/s x"
                    f"{t['fwd_s'] / r['fwd_s']:.2f} forward, x{t['step_s'] / r['step_s']:.2f} train; "
                    f"MFU x{ratio('fwd_flops', 'fwd_s'):.2f} forward, x{ratio('step_flops', 'step_s'):.2f} train"
                )
    return out


def measure(args, side: int) -> tuple[list[dict], list[str], float]:
    """Times the requested rows in this process: (rows, failure lines, matmul peak)."""
    measured = matmul_peak(jnp.dtype(args.dtype), n=side)
    peak = datasheet_peak(jax.devices()[0], args.dtype) or measured
    rows, failed = [], []
    remats = [setting == "on" for setting in dict.fromkeys(args.remat)]
    tasks = [
        (
            f"{name}{' +remat' * remat} b{batch} {size}",
            functools.partial(bench, name, batch, size, args.dtype, args.repeats, remat=remat),
        )
        for name in args.models
        for remat in remats
        for batch in args.batch
        for size in args.sizes
    ]
    tasks += [
        (f"{name} b{batch} {size}", functools.partial(bench_torch, name, batch, size, repeats=args.repeats))
        for name in args.torch
        for batch in args.batch
        for size in args.sizes
    ]
    for label, run in tasks:
        try:
            rows.append(measure_row(run))
        except Exception as e:  # e.g. XLA out of memory: report it, keep the other rows
            failed.append(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            print(failed[-1], flush=True)
            continue
        # the full table row now, so a run the kernel kills for memory loses nothing measured
        print(table(rows[-1:], peak)[-1], flush=True)
    return rows, failed, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torch",
        nargs="*",
        default=[],
        metavar="NAME",
        help="PyTorch models to time in the same run: clusterformer_{tiny,small}_official (the "
        "released code) or timm names (e.g. swin_tiny_patch4_window7_224)",
    )
    parser.add_argument(
        "--remat",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="'on' rematerialises every block in the backward (the models' remat field: less "
        "memory for more compute; MFU still counts the model's FLOPs only); 'off on' times both",
    )
    parser.add_argument("--baseline", metavar="GIT_REV", help="also time the models with this revision's code")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--code-root", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(list_models()))
    if unknown:  # before anything is timed, not as a failed row after minutes of others
        parser.error(f"unknown model {unknown[0]!r}; available: {', '.join(list_models())}")

    device = jax.devices()[0]
    side = 4096 if device.platform == "cpu" else 8192
    datasheet = datasheet_peak(device, args.dtype)
    baseline, base_peak, failed = [], 0.0, []
    if args.baseline:
        # both sides in fresh processes, baseline first: a row timed in the process that launched the other
        # ran 5-9% slower than the same code in a subprocess, whichever code was where (CF-T official, b8)
        argv = [a for a in sys.argv[1:] if a not in ("--baseline", args.baseline)]
        baseline, base_peak = run_baseline(args.baseline, argv)
        for r in baseline:
            r["code"] = args.baseline
        print(f"baseline matmul peak {base_peak / 1e9:.0f} GFLOP/s")
        rows, measured = run_in_subprocess(REPO, argv)
    else:
        rows, failed, measured = measure(args, side)
    peak = datasheet or measured
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "peak": measured}, f)
        return

    # imported here: a --baseline subprocess runs an older tree's package, which may predate this module
    from clusterformer_jax.runtime import host_allocator

    versions = f"jax {jax.__version__}, numpy {np.__version__}"
    peak_text = (
        f"matmul peak {measured / 1e9:.0f} GFLOP/s ({side}³, same run; MFU of every row is against it)"
        if datasheet is None
        else f"MFU against the datasheet's dense bf16 peak of {peak / 1e12:.1f} TFLOP/s ({side}³ matmuls ran "
        f"at {measured / 1e12:.1f} in this run)"
    )
    title = (
        f"## Backbone throughput, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), device {device.platform}:"
        f"{device.device_kind}; Python {platform.python_version()}; {versions}; host allocator "
        f"{host_allocator()}; dtype {args.dtype}; {peak_text}; load "
        f"average {os.getloadavg()[0]:.1f} at the end; "
        f"`python benchmarks/model_throughput.py {' '.join(sys.argv[1:])}`.\n"
    )
    body = table(rows + [r for r in baseline if "PyTorch" not in r["model"]], peak)
    extra = failed + notes(rows, baseline, measured, base_peak)
    text = title + "\n" + "\n".join(body) + ("\n\n" + "\n".join(f"- {s}" for s in extra) if extra else "") + "\n"
    print("\n" + text)
    if not args.no_append:
        with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
