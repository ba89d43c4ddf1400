"""Paper-size steps on this CPU: two train steps of a recipe at its real input size (synthetic batch), the
loss after each, and the process's peak RSS beside what the CPU compile's ``memory_analysis()`` says the
step needs. Checks that the trainer's real-size programs run (finite loss) and that the compiler's memory
figures, which the TPU compile check relies on, describe what a step really takes.

  bash launch/python.sh benchmarks/real_size_steps.py --config=configs/clusterformer_tiny_imagenet.py --batch=8
  bash launch/python.sh benchmarks/real_size_steps.py --config=configs/clusterformer_tiny_coco_instance.py --batch=1
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clusterformer_jax import aot  # noqa: E402
from clusterformer_jax import sharding  # noqa: E402
from clusterformer_jax.tasks import registry as task_registry  # noqa: E402
from clusterformer_jax.trainers import setup as setup_lib  # noqa: E402
from clusterformer_jax.trainers import trainer  # noqa: E402

GIB = 1024**3


def _config(spec: str, batch: int):
    """``configs/NAME.py[:arg]`` -> the locked config with ``batch`` on one device."""
    path, _, arg = spec.partition(":")
    module = importlib.import_module("configs." + os.path.splitext(os.path.basename(path))[0])
    config = module.get_config(*([arg] if arg else []))
    with config.unlocked():
        config.batch_size = batch
        config.mesh = {"data": 1, "fsdp": 1}
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    config = _config(args.config, args.batch)
    mesh = sharding.create_mesh(config.mesh)
    module = task_registry.input_module(config)
    info = module.offline_dataset_info(config.input)
    total, per_epoch = trainer.resolve_run_lengths(config, int(info["num_train"]))
    setup = setup_lib.build(config, mesh, info, total_steps=total, steps_per_epoch=per_epoch)
    rng = np.random.default_rng(0)
    row = module.example_spec(config.input, eval_mode=False)
    batch = {}
    for key, value in row.items():
        value = np.asarray(value)
        shape = (args.batch, *value.shape)
        if key == "image":  # normalised pixels; every other field keeps the padding value of an empty row
            batch[key] = rng.normal(size=shape).astype(value.dtype)
        else:
            batch[key] = np.broadcast_to(value, shape).copy()
    if "label" in batch:
        batch["label"] = rng.integers(0, info["num_classes"], size=args.batch).astype(batch["label"].dtype)
    batch = sharding.shard_batch(batch, setup.batch_sharding)
    start = time.perf_counter()
    state = setup.init_state(0)
    acc = setup.empty_train_accumulator()
    compiled = setup.train_step.lower(state, batch, acc).compile()
    memory = aot._memory(compiled)  # pylint: disable=protected-access
    compile_s = time.perf_counter() - start
    losses, times = [], []
    for _ in range(2):
        start = time.perf_counter()
        state, acc = compiled(state, batch, setup.empty_train_accumulator())
        losses.append(float(acc[0].compute()["loss"]))
        times.append(time.perf_counter() - start)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print(f"{config.model.name} {config.task} batch {args.batch} at {info['image_size']}px on {jax.devices()[0]}")
    print(f"  init + compile {compile_s:.0f} s; steps {', '.join(f'{t:.1f}' for t in times)} s; losses {losses}")
    print(
        f"  compiler: arguments {memory['arguments_gib']:.2f} + temporaries {memory['temporaries_gib']:.2f} = "
        f"{memory['total_gib']:.2f} GiB; process peak RSS {peak_gib:.2f} GiB "
        f"(ratio {peak_gib / memory['total_gib']:.2f}; the RSS also holds the Python process, jax and XLA)"
    )
    if not all(np.isfinite(losses)):
        sys.exit("non-finite loss")


if __name__ == "__main__":
    main()
