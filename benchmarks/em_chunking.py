"""Microbenchmark: T=3 EM steps (conv_c, released scramble, E-step + M-step) forward + backward over all
G groups at once, against the same work mapped over G-chunks with ``jax.lax.map``.

The EM ops run one at a time over all groups, so every (G, K, N) tensor (30 MB for ClusterFormer-T's stage
1 at batch 8 and 224, 120 MB at 448) streams through memory between ops; chunks keep it in cache. The model
does this (``MixerConfig.group_chunk``/``group_chunk_bytes``; ``runtime.GROUP_CHUNK_BYTES`` on one CPU
device); this isolates the EM steps to choose a chunk size for other shapes or machines. Stage-1 shapes: G = batch * heads * windows².

  bash launch/python.sh benchmarks/em_chunking.py --groups 1536 --chunks 1 24 48 96
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clusterformer_jax.models.kernels import soft_assign_sum  # noqa: E402


def em_steps(centers, keys, values, kernel, steps: int):
    """``steps`` EM iterations with the released raw layout: (G, K, e) centers -> (G, K, e)."""
    g, k, e = centers.shape
    for _ in range(steps):
        q = (centers.reshape(-1, e) @ kernel).reshape(g, k, e)
        q = jnp.swapaxes(q, 1, 2).reshape(g, k, e)  # the released raw reshape
        new = soft_assign_sum(q, keys, values, True, 1.0)
        centers = jnp.swapaxes(new.reshape(g, e, k), 1, 2)
    return centers


def chunked_grad(chunks: int, steps: int):
    def loss(centers, keys, values, kernel):
        if chunks == 1:
            out = em_steps(centers, keys, values, kernel, steps)
        else:
            split = lambda t: t.reshape(chunks, -1, *t.shape[1:])  # noqa: E731
            out = jax.lax.map(lambda a: em_steps(*a, kernel, steps), (split(centers), split(keys), split(values)))
        return jnp.sum(jnp.sin(out))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1536)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 24, 48, 96])
    parser.add_argument("--centers", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=49)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for chunks in args.chunks:
        if args.groups % chunks:
            parser.error(f"--chunks {chunks} does not divide --groups {args.groups}")

    rng = np.random.RandomState(0)
    g, k, n, e = args.groups, args.centers, args.tokens, args.head_dim
    inputs = (
        jnp.asarray(rng.randn(g, k, e), jnp.float32),
        jnp.asarray(0.2 * rng.randn(g, n, e), jnp.float32),
        jnp.asarray(rng.randn(g, n, e), jnp.float32),
        jnp.asarray(0.2 * rng.randn(e, e), jnp.float32),
    )
    compiled = {c: chunked_grad(c, args.steps).lower(*inputs).compile() for c in args.chunks}
    reference = compiled[args.chunks[0]](*inputs)
    times = {c: [] for c in args.chunks}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for c, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[c].append(time.perf_counter() - start)
    base = statistics.median(times[args.chunks[0]])
    print(f"G={g} K={k} N={n} e={e} T={args.steps}, forward + backward, median of {args.repeats}")
    print("| chunks | groups per chunk | ms | speed vs first | max abs diff of grads vs first |")
    print("|---|---|---|---|---|")
    for c, fn in compiled.items():
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(fn(*inputs), reference))
        m = statistics.median(times[c])
        print(f"| {c} | {g // c} | {m * 1e3:.1f} | {base / m:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
