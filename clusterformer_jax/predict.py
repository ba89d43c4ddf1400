r"""Batch prediction for every task: a training run (JAX) or a SavedModel export (TensorFlow only, no JAX).

  python -m clusterformer_jax.predict --workdir=RUN --images=DIR_OR_GLOB --out=OUT [--batch_size=32]
  python -m clusterformer_jax.predict --export=DIR --images=DIR_OR_GLOB --out=OUT
  python -m clusterformer_jax.predict --workdir=RUN --out=OUT [--num_images=8]   # eval split, with truth

Writes ``OUT/predictions.jsonl``: one JSON line per image ({"file", "image_id", "height", "width"} and the
task's fields: classification the top 5 with class names and scores; detection / instance segmentation the
detections above ``--score_threshold`` with COCO category ids, names, [x, y, w, h] boxes in source pixels and
COCO RLE masks; semantic / panoptic the names of the PNGs written beside it), plus the task's files over all
images (``predictions.json`` COCO results; ``panoptic.json``). Images go through the eval preprocessing in
batches (the last one padded); a file that does not decode is skipped with one line naming it and counted.
Without ``--images`` the run's eval split is drawn: each image's predictions beside its ground truth (PNG).
The task's serving side (``task.serving``, serving/) writes and draws everything: no task branches here.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESULTS_FILE = "predictions.jsonl"


def define_flags() -> None:
    """The command line (defined only when run as a script, so the module imports beside main and export)."""
    flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
    flags.DEFINE_string("export", None, "A SavedModel export directory (predicts with TensorFlow, no JAX).")
    flags.DEFINE_string("out", None, "Directory for predictions.jsonl and the task's PNGs / json.")
    flags.DEFINE_string("images", None, "A directory, a glob or a comma-separated list of image files.")
    flags.DEFINE_integer("batch_size", 32, "Images per batch (the last batch is padded).")
    flags.DEFINE_integer("num_images", 8, "Eval-split images to draw when --images is not given.")
    flags.DEFINE_float("score_threshold", 0.3, "Detections written and drawn score at least this.")


def image_files(spec: str) -> list[str]:
    """The image files a directory (its images, sorted), a glob or a comma-separated list names."""
    from clusterformer_jax.errors import ConfigError

    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.lower().endswith(IMAGE_SUFFIXES))
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec))
    else:
        files = [p for p in spec.split(",") if p]
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"image {missing[0]!r} does not exist")
    if not files:
        raise ConfigError(f"--images={spec!r} names no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image_bytes(data: bytes) -> Any:
    """Encoded image -> uint8 RGB array, as the trainer reads files (Pillow, ``convert('RGB')``); raises
    OSError / ValueError for bytes Pillow cannot decode."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def read_image(path: str) -> tuple[bytes, Any]:
    """(file bytes, uint8 RGB array); raises OSError / ValueError for a file Pillow cannot decode."""
    with open(path, "rb") as f:
        data = f.read()
    return data, read_image_bytes(data)


def _progress(done: int, total: int, start: float) -> None:
    rate = done / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\rpredict: {done}/{total} images, {rate:.1f} images/s")
    sys.stderr.flush()


def run_batches(
    predict_batch: Callable[[list[tuple[bytes, Any]]], dict[str, Any]],
    serving: Any,
    files: Sequence[str],
    out_dir: str,
    batch_size: int,
) -> dict[str, Any]:
    """Predicts ``files`` in batches of ``batch_size`` (the last padded by repeating its last image) and writes
    the JSON lines and the task's files; returns {'predicted', 'skipped', 'seconds'}."""
    os.makedirs(out_dir, exist_ok=True)
    records, skipped, start, done = [], 0, time.perf_counter(), 0
    pending: list[tuple[str, bytes, Any]] = []
    with open(os.path.join(out_dir, RESULTS_FILE), "w") as out:

        def flush():
            nonlocal done
            batch = [(data, rgb) for _, data, rgb in pending]
            outputs = predict_batch(batch + [batch[-1]] * (batch_size - len(batch)))
            for i, (path, _, rgb) in enumerate(pending):
                row = {k: v[i] for k, v in outputs.items()}
                stem = f"{len(records) + 1:06d}"
                record = {"file": path, "image_id": len(records) + 1, "height": int(rgb.shape[0]),
                          "width": int(rgb.shape[1])}  # fmt: skip
                record |= serving.record(row, out_dir, stem)
                out.write(json.dumps(record) + "\n")
                records.append(record)
            done += len(pending)
            pending.clear()
            _progress(done + skipped, len(files), start)

        for path in files:
            try:
                data, rgb = read_image(path)
            except (OSError, ValueError) as e:
                skipped += 1
                newline = "\n" if done + skipped > 1 else ""  # after the progress line
                sys.stderr.write(f"{newline}skipped {path}: not a readable image ({type(e).__name__})\n")
                continue
            pending.append((path, data, rgb))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    sys.stderr.write("\n")
    serving.finish(out_dir, records)
    return {"predicted": len(records), "skipped": skipped, "seconds": time.perf_counter() - start}


def export_predictor(directory: str) -> tuple[Callable, Any]:
    """(batch -> outputs, serving side) of a SavedModel export, with JAX kept out of the process."""
    from clusterformer_jax.serving import client

    client.block_jax()
    model = client.ExportedModel(directory)
    return (lambda batch: model([data for data, _ in batch])), model.serving


class RunPredictor:
    """A training run's latest checkpoint with the trainer's eval preprocessing and the exported function
    (``serving_apply``) jitted in JAX; outputs through the task's TF postprocessing, as in the SavedModel."""

    def __init__(self, workdir: str, score_threshold: float = 0.3):
        import jax

        from clusterformer_jax import export
        from clusterformer_jax.serving.inference import serving_apply

        self.config, self.dataset_info, self.setup, self.variables = export.restore_run(workdir)
        self.serving = self.setup.task.serving(self.config, self.dataset_info)
        self.serving.score_threshold = score_threshold
        self.transform = self.serving.preprocess.host_transform(self.config.input)
        self._apply = jax.jit(serving_apply(self.setup))

    def outputs(self, inputs: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Model inputs (numpy, batch-major) -> the task's named outputs (``meta`` overrides placement)."""
        import jax
        import tensorflow as tf

        raw = jax.device_get(self._apply(self.variables, inputs)) | (meta or {})
        post = self.serving.postprocess({k: tf.constant(v) for k, v in raw.items()})
        return {k: v.numpy() for k, v in post.items()}

    def __call__(self, batch: list[tuple[bytes, Any]]) -> dict[str, Any]:
        import numpy as np

        rows = [self.serving.preprocess.host(rgb, self.transform) for _, rgb in batch]
        return self.outputs({k: np.stack([r[k] for r in rows]) for k in rows[0]})


def _eval_split(predictor: RunPredictor, out_dir: str, num_images: int) -> list[str]:
    """Draws ``num_images`` eval-split images: predictions beside the ground truth, plus the JSON lines."""
    import numpy as np
    from PIL import Image

    from clusterformer_jax import render
    from clusterformer_jax.tasks import registry as task_registry

    config, serving, task = predictor.config, predictor.serving, predictor.setup.task
    os.makedirs(out_dir, exist_ok=True)
    keys = tuple(serving.preprocess.input_specs())
    written, records, images = [], [], []
    iterator = task_registry.input_module(config).create_eval_iterator(config.input, global_batch_size=1)
    with open(os.path.join(out_dir, RESULTS_FILE), "w") as out:
        for batch in iterator:
            if len(records) >= num_images:
                break
            if batch["mask"][0] <= 0:
                continue
            inputs = {k: v for k, v in task.model_inputs(batch).items()}
            inputs |= {k: np.asarray(batch[k]) for k in keys if k not in inputs}
            image_id = int(batch["image_id"][0]) if "image_id" in batch else len(records) + 1
            image = np.asarray(batch["image"][0]) * np.asarray(config.input.std) + np.asarray(config.input.mean)
            image = np.clip(np.round(image), 0, 255).astype(np.uint8)
            if "image_mask" in batch:
                rows, cols = np.asarray(batch["image_mask"][0]).nonzero()
                image = image[: rows.max() + 1, : cols.max() + 1]
            row = {k: v[0] for k, v in predictor.outputs(inputs).items()}
            height, width = (int(v) for v in batch["orig_size"][0]) if "orig_size" in batch else image.shape[:2]
            record = {"file": f"eval image_id {image_id}", "image_id": image_id, "height": height, "width": width}
            record |= serving.record(row, out_dir, f"{image_id:06d}")
            out.write(json.dumps(record) + "\n")
            records.append(record)
            images.append({"id": image_id, "file_name": record["file"], "height": height, "width": width})
            meta = {"orig_size": np.asarray([image.shape[:2]], np.int32), "scale": np.ones((1, 2), np.float32)}
            on_canvas = {k: v[0] for k, v in predictor.outputs(inputs, meta if "orig_size" in keys else None).items()}
            drawn = serving.draw(image, on_canvas)
            if drawn is None:
                continue
            drawn = render.side_by_side(drawn, serving.draw(image, serving.truth(batch, 0, image.shape[:2])))
            path = os.path.join(out_dir, f"{image_id:06d}.png")
            Image.fromarray(drawn).save(path)
            written.append(path)
    serving.finish(out_dir, records)
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump(images, f, indent=1)
    return written


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    if not FLAGS.out or bool(FLAGS.workdir) == bool(FLAGS.export) or (FLAGS.export and not FLAGS.images):
        raise app.UsageError("pass --out and one of --workdir=RUN or --export=DIR (--export needs --images)")
    from clusterformer_jax.errors import ConfigError

    try:
        if FLAGS.export:
            predict_batch, serving = export_predictor(FLAGS.export)
            serving.score_threshold = FLAGS.score_threshold
        else:
            predict_batch = RunPredictor(FLAGS.workdir, FLAGS.score_threshold)
            serving = predict_batch.serving
            if not FLAGS.images:
                written = _eval_split(predict_batch, FLAGS.out, FLAGS.num_images)
                print(f"wrote {len(written)} PNGs and {RESULTS_FILE} to {FLAGS.out}")
                return
        summary = run_batches(predict_batch, serving, image_files(FLAGS.images), FLAGS.out, FLAGS.batch_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    rate = summary["predicted"] / max(summary["seconds"], 1e-9)
    print(
        f"wrote {summary['predicted']} predictions to {os.path.join(FLAGS.out, RESULTS_FILE)} ({rate:.1f} images/s); "
        f"skipped {summary['skipped']} unreadable images"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
