"""Backbone throughput: forward and train-step images/s, XLA FLOPs, MFU against a measured matmul peak.

  python benchmarks/model_throughput.py                       # ClusterFormer presets, batch 8, 224
  python benchmarks/model_throughput.py --models coc_tiny --batch 8 32 --sizes 224 448

The peak is a float32 (or --dtype) 4096^3 matmul timed in the same process just before the models, so the
MFU column is comparable across rows of one run. Each timing is the median of --repeats runs after a
warm-up call. Prints a table and appends it to benchmarks/RESULTS.md with date, machine and versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusterformer_jax.models.registry import create_model  # noqa: E402

DEFAULT_MODELS = ("clusterformer_tiny_official", "clusterformer_tiny", "clusterformer_small_official",
                  "clusterformer_small")


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype, n: int = 4096, repeats: int = 3) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return 2 * n**3 / _median_seconds(lambda: f(a), repeats)


def bench(name: str, batch: int, size: int, dtype: str, repeats: int) -> dict:
    kwargs = {}
    if name.startswith("clusterformer") and size % 224 == 0 and size != 224:
        # keep 7x7-token windows (what "cost linear in pixels" assumes): window counts grow with the input
        kwargs["window_counts"] = tuple(c * size // 224 for c in (8, 4, 2, 1))
    model = create_model(name, dtype=dtype, **kwargs)
    images = jnp.asarray(np.random.RandomState(0).rand(batch, size, size, 3), jnp.float32)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, images[:1])
    params = variables["params"]
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    labels = jnp.zeros((batch,), jnp.int32)

    def loss_fn(p):
        logits = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(p, o):
        grads = jax.grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    fwd = jax.jit(lambda p: model.apply({"params": p}, images)).lower(params).compile()
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state).compile()
    fwd_flops = fwd.cost_analysis()["flops"]
    step_flops = step.cost_analysis()["flops"]
    memory = step.memory_analysis()
    fwd_s = _median_seconds(lambda: fwd(params), repeats)
    state = [params, opt_state]

    def run_step():
        state[0], state[1] = step(state[0], state[1])
        return state[0]

    step_s = _median_seconds(run_step, repeats)
    return dict(
        model=name, batch=batch, size=size, dtype=dtype,
        params=sum(x.size for x in jax.tree_util.tree_leaves(params)),
        gflop_fwd=fwd_flops / batch / 1e9, fwd_s=fwd_s, fwd_ips=batch / fwd_s,
        step_s=step_s, step_ips=batch / step_s,
        fwd_flops_s=fwd_flops / fwd_s, step_flops_s=step_flops / step_s,
        temp_mib=getattr(memory, "temp_size_in_bytes", 0) / 2**20,
    )


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    peak = matmul_peak(jnp.dtype(args.dtype))
    rows = []
    for name in args.models:
        for batch in args.batch:
            for size in args.sizes:
                r = bench(name, batch, size, args.dtype, args.repeats)
                rows.append(r)
                print(f"{name} b{batch} {size}: fwd {r['fwd_ips']:.2f} img/s, train {r['step_ips']:.2f} img/s",
                      flush=True)

    device = jax.devices()[0]
    header = ("| model | batch | size | params | GFLOP/img fwd | fwd s/batch | fwd img/s | train s/step | "
              "train img/s | fwd MFU | train MFU | step temp MiB |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['size']} | {r['params'] / 1e6:.2f}M | {r['gflop_fwd']:.2f} | "
            f"{r['fwd_s']:.3f} | {r['fwd_ips']:.2f} | {r['step_s']:.3f} | {r['step_ips']:.2f} | "
            f"{r['fwd_flops_s'] / peak:.1%} | {r['step_flops_s'] / peak:.1%} | {r['temp_mib']:.0f} |"
        )
    scaling = []
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"]
                     and b["size"] == 224), None)
        if base and r["size"] != 224:
            pixels = (r["size"] / 224) ** 2
            scaling.append(f"{r['model']} b{r['batch']} {r['size']}²/224²: time per image x"
                           f"{(r['fwd_s'] / base['fwd_s']):.2f} forward, x{(r['step_s'] / base['step_s']):.2f} "
                           f"train, pixels x{pixels:.1f}")
    versions = f"jax {jax.__version__}, numpy {np.__version__}"
    title = (f"## Backbone throughput, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
             f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), device {device.platform}:"
             f"{device.device_kind}; Python {platform.python_version()}; {versions}; dtype {args.dtype}; "
             f"matmul peak {peak / 1e9:.0f} GFLOP/s (4096³, same run); load average {os.getloadavg()[0]:.1f} "
             f"at the end; peak RSS {rss_mib():.0f} MiB; `python benchmarks/model_throughput.py "
             f"{' '.join(sys.argv[1:])}`.\n")
    text = title + "\n" + "\n".join(lines) + ("\n\n" + "\n".join(f"- {s}" for s in scaling) if scaling else "") + "\n"
    print("\n" + text)
    if not args.no_append:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
