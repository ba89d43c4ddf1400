"""The released hard dispatch's two forms (models/dispatch.py, execution field ``dispatch_impl``) compiled for one
v5e chip from this CPU (libtpu, as clusterformer_jax.aot): bytes accessed, FLOPs and temporaries of the dispatch
with its gradient at CF-T's stage 1 (3 heads x 8x8 windows of 7x7 tokens, 10x10 centers, head dim 32).

  bash launch/python.sh benchmarks/dispatch_forms.py [--batches=16,32]

libtpu: in .venv/libtpu_aot, which launch/test.sh and launch/aot.sh install.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clusterformer_jax import aot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,32", help="images per chip")
    args = parser.parse_args()
    aot.use_compiler("tpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from clusterformer_jax import accelerators
    from clusterformer_jax.models.dispatch import DISPATCH_IMPLS, hard_dispatch

    devices = aot.topology_devices(accelerators.topology("v5e-1"))
    replicated = NamedSharding(Mesh(np.array(devices), ("x",)), PartitionSpec())
    print(
        "| form | images/chip | groups | GB accessed | GFLOP | temporaries GiB | compile s |\n|---|---|---|---|---|---|---|"
    )
    for impl in DISPATCH_IMPLS:
        for batch in map(int, args.batches.split(",")):
            g, n, k, e = batch * 3 * 64, 49, 100, 32
            shapes = [(g, e, n), (g, k, e), (1,), (1,), (g, n, e), (g, k, e)]
            abstract = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=replicated) for s in shapes]

            def loss(*a, impl=impl):
                return jnp.sum(hard_dispatch(*a, impl=impl) ** 2)

            start = time.time()
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 4, 5))).lower(*abstract).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
            print(
                f"| {impl} | {batch} | {g} | {cost.get('bytes accessed', 0) / 1e9:.2f} | {cost.get('flops', 0) / 1e9:.2f} "
                f"| {temp:.2f} | {time.time() - start:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
