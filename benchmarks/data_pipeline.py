"""Input-pipeline throughput: examples/s of every train and eval pipeline on this machine.

  python benchmarks/data_pipeline.py [--num_threads=2] [--num_workers=0] [--seconds=8]

Pipelines measured, each through its public `create_*_iterator` with the
default (paper) sizes unless noted:
  digits          classification pipeline (pipeline.py) on the real digits set, 32 px.
  shapes          dense pipeline on the procedural shapes set ('default', 128 px).
  coco_instances  COCO recipe: LSJ 1024 crop / 800 shorter side, 100 slots, masks at 1/4.
  coco_panoptic   same sizes, panoptic targets.
  ade20k          ADE recipe: 640 crop / 640 shorter side.

The three real datasets are not on this machine, so the script writes
stand-ins in their original on-disk formats (COCO-sized 640x480 JPEGs with 8
polygon instances, panoptic PNGs with 12 segments; ADE-sized 683x512 JPEGs
with 10 classes) and prepares them with the real builders in a temporary
directory. Decoding and augmentation costs scale with these sizes, so the
numbers carry over to the real data; file reading from a slow disk does not
show here. The table is printed and appended to benchmarks/RESULTS.md with the
date, CPU count and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clusterformer_jax.data import coco as coco_lib  # noqa: E402
from clusterformer_jax.data import coco_format  # noqa: E402
from clusterformer_jax.data import dense_pipeline as dp  # noqa: E402
from clusterformer_jax.data import pipeline as cls_pipeline  # noqa: E402
from clusterformer_jax.data import shapes as shapes_lib  # noqa: E402


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _scene(rng: np.random.Generator, index: int, height: int, width: int) -> np.ndarray:
    """A photo-sized image: an upscaled shapes landscape plus sensor-like noise."""
    small = shapes_lib.generate(128, 5, "train", index)["image"]
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR), np.float64)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_coco(root: str, count: int) -> None:
    """val2017 + train2017 JPEGs, instances and panoptic jsons and PNGs in the original layout."""
    rng = np.random.default_rng(0)
    things = coco_lib.COCO_THING_CATEGORIES
    categories = [
        {"id": i, "name": n, "isthing": int(t), "supercategory": "x"} for i, n, t in coco_lib.COCO_PANOPTIC_CATEGORIES
    ]
    for split in ("train2017", "val2017"):
        images, instances, panoptic = [], [], []
        for k in range(count):
            image_id = k + 1
            h, w = 480, 640
            _write(f"{root}/{split}/{image_id:012d}.jpg", _jpeg(_scene(rng, k, h, w)))
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w})
            ids = np.zeros((h, w), np.int64)
            infos = []
            for j in range(12):
                y0, x0 = int(rng.integers(0, h - 60)), int(rng.integers(0, w - 80))
                bh, bw = int(rng.integers(30, 200)), int(rng.integers(30, 250))
                y1, x1 = min(h, y0 + bh), min(w, x0 + bw)
                cid, name = (
                    things[rng.integers(0, 80)] if j < 8 else (coco_lib.COCO_STUFF_CATEGORIES[rng.integers(0, 53)])
                )
                if j < 8:  # An 8-vertex polygon inside the box.
                    t = np.linspace(0, 2 * np.pi, 9)[:-1]
                    poly = (
                        np.stack(
                            [(x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(t), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(t)], -1
                        )
                        .ravel()
                        .tolist()
                    )
                    instances.append(
                        {
                            "id": image_id * 100 + j,
                            "image_id": image_id,
                            "category_id": cid,
                            "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float((y1 - y0) * (x1 - x0)),
                            "segmentation": [poly],
                        }
                    )
                sid = int(rng.integers(1, 1 << 24))
                ids[y0:y1, x0:x1] = sid
                infos.append((sid, cid))
            segments = []
            for sid, cid in infos:
                rows, cols = np.nonzero(ids == sid)
                if len(rows):
                    segments.append(
                        {
                            "id": sid,
                            "category_id": cid,
                            "iscrowd": 0,
                            "area": len(rows),
                            "bbox": [
                                int(cols.min()),
                                int(rows.min()),
                                int(cols.max() - cols.min() + 1),
                                int(rows.max() - rows.min() + 1),
                            ],
                        }
                    )
            _write(f"{root}/annotations/panoptic_{split}/{image_id:012d}.png", _png(coco_format.id_to_rgb(ids)))
            panoptic.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": segments})
        _write(
            f"{root}/annotations/instances_{split}.json",
            json.dumps(
                {"images": images, "annotations": instances, "categories": [{"id": i, "name": n} for i, n in things]}
            ).encode(),
        )
        _write(
            f"{root}/annotations/panoptic_{split}.json",
            json.dumps({"images": images, "annotations": panoptic, "categories": categories}).encode(),
        )


def make_ade(root: str, count: int) -> None:
    """ADEChallengeData2016.zip with 683x512 JPEGs and 10-class label PNGs."""
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(os.path.join(root, "ADEChallengeData2016.zip"), "w") as zf:
        for split, prefix in (("training", "train"), ("validation", "val")):
            for k in range(count):
                h, w = (512, 683) if k % 2 else (683, 512)
                label = np.zeros((h, w), np.uint8)
                for value in rng.choice(np.arange(1, 151), 10, replace=False):
                    y0, x0 = rng.integers(0, h - 50), rng.integers(0, w - 50)
                    label[y0 : y0 + rng.integers(50, 300), x0 : x0 + rng.integers(50, 300)] = value
                stem = f"ADE_{prefix}_{k + 1:08d}"
                zf.writestr(f"ADEChallengeData2016/images/{split}/{stem}.jpg", _jpeg(_scene(rng, k, h, w)))
                zf.writestr(f"ADEChallengeData2016/annotations/{split}/{stem}.png", _png(label))


def rate(make_iter: Callable[[], Iterator], batch_size: int, seconds: float, warmup: int = 2) -> float:
    """Examples/s of an iterator after `warmup` batches, over at least `seconds`."""
    it = make_iter()
    for _ in range(warmup):
        next(it)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(it)
        count += batch_size
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return count / elapsed


def repeat_eval(make_ds: Callable[[], object]) -> Callable[[], Iterator]:
    """An endless iterator over repeated eval passes."""

    def make() -> Iterator:
        while True:
            yield from make_ds()

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--count", type=int, default=24, help="stand-in images per split")
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="cf_data_bench_")
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: str) -> None:
    """Writes the stand-in files under `tmp`, measures every pipeline, appends the table."""
    settings = dict(num_threads=args.num_threads, num_workers=args.num_workers)
    data_dir = os.path.join(tmp, "tfds")
    coco_dir, ade_dir = os.path.join(tmp, "coco"), os.path.join(tmp, "ade")
    os.makedirs(ade_dir)
    make_coco(coco_dir, args.count)
    make_ade(ade_dir, args.count)

    cases = [
        ("digits", dict(dataset="digits", image_size=32, num_threads=args.num_threads), 256, cls_pipeline),
        ("shapes", dict(dataset="shapes", **settings), 32, dp),
        ("coco_instances", dict(dataset="coco_instances", manual_dir=coco_dir, **settings), 8, dp),
        ("coco_panoptic", dict(dataset="coco_panoptic", manual_dir=coco_dir, **settings), 8, dp),
        ("ade20k", dict(dataset="ade20k", manual_dir=ade_dir, **settings), 8, dp),
    ]
    rows = []
    for name, cfg, batch, module in cases:
        cfg = dict(cfg, data_dir=data_dir)
        module.get_dataset_info(cfg)  # Prepares the dataset outside the timed part.
        kwargs = dict(global_batch_size=batch, process_index=0, process_count=1)
        train = rate(lambda: module.create_train_iterator(cfg, seed=0, **kwargs), batch, args.seconds)
        evaluation = rate(repeat_eval(lambda: module.create_eval_iterator(cfg, **kwargs)), batch, args.seconds)
        rows.append((name, batch, train, evaluation))
        print(f"{name:15s} batch {batch:4d}  train {train:9.1f} ex/s  eval {evaluation:9.1f} ex/s", flush=True)

    from importlib.metadata import version

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    versions = ", ".join(f"{p} {version(p)}" for p in ("jax", "grain", "tensorflow-datasets", "numpy", "pillow"))
    lines = [
        f"\n## Input pipelines, {stamp}\n",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}), Python"
        f" {platform.python_version()}; {versions}; load average {os.getloadavg()[0]:.1f} at the end"
        f" (other jobs on the machine slow every row). Settings: num_threads={args.num_threads},"
        f" num_workers={args.num_workers} (dense only), prefetch 2 x batch, {args.seconds:g} s per"
        " measurement after 2 warm-up batches; `python benchmarks/data_pipeline.py`. COCO/ADE rows use"
        " stand-in files of the real image sizes.\n",
        "| pipeline | batch | train examples/s | eval examples/s |",
        "| --- | ---: | ---: | ---: |",
    ] + [f"| {n} | {b} | {t:.1f} | {e:.1f} |" for n, b, t, e in rows]
    if args.num_workers:
        lines.append(
            f"\nEach eval pass (over {args.count} stand-in images) starts its worker processes anew,"
            " so the dense eval rates here are dominated by process start-up."
        )
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
