"""The quickstart classifier served two ways, side by side in one run: SavedModel size and CPU images/s of
``predict --export`` (TensorFlow only, JAX kept out of the process) beside ``predict --workdir`` (JAX).

  bash launch/python.sh benchmarks/serving.py [--workdir=RUN] [--batch_size=64] [--repeats=3]

Without ``--workdir`` it writes a run of configs/quickstart.py with freshly initialised weights (speed and
size do not depend on training). Both paths read the 360 digits test images as PNG files, decode, run the
eval preprocessing (JAX path: the trainer's Pillow transform; SavedModel: the graph's) and write the JSON
lines; the first pass warms up (compiles), the best of ``--repeats`` timed passes is reported. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SERVING_SIDE = r"""
import json, sys
from clusterformer_jax import predict
predict_batch, serving = predict.export_predictor(sys.argv[1])
files = predict.image_files(sys.argv[2])
runs = [predict.run_batches(predict_batch, serving, files, sys.argv[3], int(sys.argv[4]))
        for _ in range(1 + int(sys.argv[5]))]
assert "jax" not in sys.modules
print(json.dumps(min(r["seconds"] for r in runs[1:])))
"""


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _make_run(root: str) -> str:
    """A quickstart workdir with freshly initialised weights, as training leaves it (config + a checkpoint)."""
    from clusterformer_jax import checkpointing
    from clusterformer_jax.data import pipeline
    from clusterformer_jax.export import one_device_setup
    from tests import load_config

    config = load_config("quickstart.py")
    config.input.data_dir = os.path.join(root, "tfds")
    info = pipeline.get_dataset_info(config.input)
    workdir = os.path.join(root, "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    setup = one_device_setup(config, info)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), async_save=False)
    ckpt.save(0, setup.init_state(0), force=True)
    ckpt.close()
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from clusterformer_jax import export, predict
    from clusterformer_jax.data import pipeline

    root = tempfile.mkdtemp(prefix="cf_serving_bench_")
    workdir = args.workdir or _make_run(root)
    config, _ = export.load_run(workdir)
    images = os.path.join(root, "images")
    os.makedirs(images)
    source = pipeline._open_split(config.input, "test")
    for i in range(len(source)):
        Image.fromarray(np.asarray(source[i]["image"])).save(os.path.join(images, f"{i:03d}.png"))
    exports = {}
    for name, bf16 in (("f32", False), ("bf16", True)):
        exports[name] = os.path.join(root, f"saved_model_{name}")
        export.export(workdir, exports[name], bf16=bf16, format="saved_model")

    predictor = predict.RunPredictor(workdir)
    files = predict.image_files(images)
    runs = [
        predict.run_batches(predictor, predictor.serving, files, os.path.join(root, "jax"), args.batch_size)
        for _ in range(1 + args.repeats)
    ]
    jax_seconds = min(r["seconds"] for r in runs[1:])
    env = dict(os.environ, PYTHONPATH=REPO)
    rows = [("JAX predict (--workdir)", "-", len(files) / jax_seconds)]
    for name, path in exports.items():
        done = subprocess.run(
            [sys.executable, "-c", SERVING_SIDE, path, images, os.path.join(root, name), str(args.batch_size),
             str(args.repeats)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((f"SavedModel {name} (--export)", f"{_size(path) / 2**20:.2f} MiB", len(files) / seconds))
    print(f"{config.model.name}, {len(files)} digits PNGs, batch {args.batch_size}, {os.cpu_count()} CPUs\n")
    print("| path | size on disk | images/s |\n|---|---|---|")
    for label, size, rate in rows:
        print(f"| {label} | {size} | {rate:.1f} |")


if __name__ == "__main__":
    main()
