"""What the input pipeline costs the quickstart: train steps/s with the real pipeline against the same
training fed one repeated in-memory batch, side by side in one process.

  bash launch/python.sh benchmarks/quickstart_input.py [--steps=400] [--rounds=2]

Variants, each run --rounds times in turn (so drifts in machine speed hit all of them alike):
  defaults      configs/quickstart.py as shipped (digits: cached train examples, no reader threads).
  uncached      the same with input.cache_train=False and input.num_threads=2 (every example decoded
                and resized on every epoch by two reader threads).
  synthetic     the first batch of the real pipeline repeated: no input cost at all.

Each run trains --steps steps (no eval or checkpoint in between) and reports the trainer's own
train_steps_per_second, train_input_stall_fraction (device idle for lack of a batch) and
train_data_wait_fraction (time blocked in next(), mostly overlapping the asynchronously running step).
"Cost" is 1 - steps/s of the variant / steps/s of synthetic, from the medians over rounds. Prints a table
and appends it to benchmarks/RESULTS.md with date, machine and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from clusterformer_jax import runtime  # noqa: E402
from clusterformer_jax.data import pipeline  # noqa: E402
from clusterformer_jax.trainers import trainer  # noqa: E402


class _Repeated:
    """The first batch of a real iterator, forever (checkpoint state delegated to the real one)."""

    def __init__(self, inner):
        self._inner = inner
        self._batch = next(inner)

    def __iter__(self):
        return self

    def __next__(self):
        return self._batch

    def get_state(self) -> bytes:
        return json.dumps(self._inner.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._inner.set_state(json.loads(state))

    def close(self):
        self._inner.close()


def _config(steps: int, variant: str):
    from configs import quickstart

    config = quickstart.get_config()
    config.num_train_steps = steps
    config.eval_every_steps = 0
    config.checkpoint.every_steps = 10 * steps
    config.log_every_steps = 50
    if variant == "uncached":
        config.input.cache_train = False
        config.input.num_threads = 2
    return config


def run(steps: int, variant: str) -> dict:
    create = pipeline.create_train_iterator
    if variant == "synthetic":
        pipeline.create_train_iterator = lambda *a, **k: _Repeated(create(*a, **k))
    try:
        with tempfile.TemporaryDirectory() as workdir:
            results = trainer.train_and_evaluate(_config(steps, variant), workdir)
    finally:
        pipeline.create_train_iterator = create
    print(
        f'{variant:10s} {results["train_steps_per_second"]:6.2f} steps/s  stall '
        f'{100 * results["train_input_stall_fraction"]:4.1f}%  waited {100 * results["train_data_wait_fraction"]:4.1f}%',
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    variants = ("defaults", "uncached", "synthetic")
    runs = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            runs[variant].append(run(args.steps, variant))

    def median(variant, key):
        return statistics.median(r[key] for r in runs[variant])

    base = median("synthetic", "train_steps_per_second")
    lines = [
        "| input | steps/s (median) | each round | cost vs synthetic | input stall | waited in next() |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants:
        rate = median(variant, "train_steps_per_second")
        each = ", ".join(f'{r["train_steps_per_second"]:.2f}' for r in runs[variant])
        lines.append(
            f"| {variant} | {rate:.2f} | {each} | {100 * (1 - rate / base):.1f}% | "
            f'{100 * median(variant, "train_input_stall_fraction"):.1f}% | '
            f'{100 * median(variant, "train_data_wait_fraction"):.1f}% |'
        )
    header = (
        f"## Quickstart input cost, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), device {jax.devices()[0].platform}; "
        f"Python {platform.python_version()}; jax {jax.__version__}; host allocator {runtime.host_allocator()}; "
        f"{args.steps} steps x {args.rounds} rounds, "
        f"batch 64, clusterformer_nano on digits 32 px; `python benchmarks/quickstart_input.py "
        f"--steps={args.steps} --rounds={args.rounds}`.\n"
    )
    text = header + "\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
