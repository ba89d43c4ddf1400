r"""Runs a trained dense-task run (detection, instance / semantic / panoptic segmentation) on images and writes
what it sees.

  python -m clusterformer_jax.predict --workdir=RUN --out=DIR [--images=a.jpg,b.png] [--num_images=8]

Reads RUN/config.json and the latest checkpoint's parameters. With ``--images`` it predicts those files
(resized and padded as the eval pipeline does); without, it takes the first ``--num_images`` images of the
run's eval split and draws the ground truth beside each prediction. Writes one PNG per image (boxes,
masks, class names and scores above ``--score_threshold``) and ``predictions.json``: COCO-format results
(image_id, category_id, bbox [x, y, w, h] in source pixels, score, RLE segmentation) for every kept
detection, with ``images.json`` naming the image behind each image_id. Semantic runs draw the class map
(beside the ground truth) and write ``<id>_semantic.png`` label maps (class index per pixel at the source
size, 255 none); panoptic runs draw the segments and write COCO panoptic output: ``panoptic/<id>.png`` (id =
R + 256 G + 256^2 B) and ``panoptic.json`` (segments_info with category ids), readable by any COCO tool.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from clusterformer_jax import render, sharding
from clusterformer_jax.data import dense_pipeline
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.data.coco_format import id_to_rgb
from clusterformer_jax.evaluation.coco import coco_detections, largest_component_boxes
from clusterformer_jax.evaluation.semantic import map_prediction
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.trainers.restore import init_params_from
from clusterformer_jax.trainers.setup import build


def define_flags() -> None:
    """The command line (defined only when run as a script, so the module imports beside main and export)."""
    flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
    flags.DEFINE_string("out", None, "Directory for the PNGs and predictions.json.")
    flags.DEFINE_list("images", [], "Image files to predict; empty: the run's eval split.")
    flags.DEFINE_integer("num_images", 8, "Eval-split images to draw when --images is empty.")
    flags.DEFINE_float("score_threshold", 0.3, "Detections drawn and written score at least this.")


SUPPORTED_TASKS = ("detection", "instance_segmentation", "semantic_segmentation", "panoptic_segmentation")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{workdir!r} holds no config.json; pass the workdir of a training run")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.task not in SUPPORTED_TASKS:
        raise ConfigError(f"predict draws {', '.join(SUPPORTED_TASKS)} runs; {workdir!r} is a {config.task!r} run")
    return config


def file_example(path: str, index: int) -> dict[str, Any]:
    """An image file as an unannotated dense example (the eval transform then resizes and pads it)."""
    if not os.path.exists(path):
        raise ConfigError(f"image {path!r} does not exist")
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return {
        "image": rgb,
        "image_id": index + 1,
        "boxes": np.zeros((0, 4), np.float32),
        "classes": np.zeros((0,), np.int32),
        "is_crowd": np.zeros((0,), bool),
        "is_thing": np.zeros((0,), bool),
    }


def visible_image(batch: Mapping[str, np.ndarray], row: int, input_cfg: Mapping[str, Any]) -> np.ndarray:
    """The canvas image of ``row`` back in uint8 RGB, cropped to its real pixels."""
    h, w = np.asarray(batch["image_mask"][row]).nonzero()
    image = batch["image"][row] * np.asarray(input_cfg["std"]) + np.asarray(input_cfg["mean"])
    return np.clip(np.round(image), 0, 255).astype(np.uint8)[: h.max() + 1, : w.max() + 1]


def _canvas_masks(grid: np.ndarray, shape: tuple[int, int], threshold: float) -> np.ndarray:
    """uint8 (K, g, g) stride-4 probabilities -> bool (K, H, W) on the visible canvas (nearest upsampling)."""
    stride = 4
    up = np.repeat(np.repeat(grid, stride, axis=1), stride, axis=2)
    return up[:, : shape[0], : shape[1]] >= threshold * 255


def coco_results(
    predictions: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], row: int, category_ids: Sequence[int], task
) -> list[dict[str, Any]]:
    """The kept detections of ``row`` in COCO results format (source-image pixels), with the task's mask
    threshold and box source, as its evaluator writes them."""
    keep = np.flatnonzero(predictions["scores"][row] >= flags.FLAGS.score_threshold)
    masks = predictions["masks"][row][keep] if "masks" in predictions else None
    return coco_detections(
        int(batch["image_id"][row]),
        predictions["boxes"][row][keep],
        predictions["scores"][row][keep],
        predictions["labels"][row][keep],
        masks,
        batch["orig_size"][row],
        batch["scale"][row],
        category_ids,
        task.mask_threshold,
        task.box_source,
    )


def _batches(config: ml_collections.ConfigDict) -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
    """(batch of one, names) for every requested image."""
    if flags.FLAGS.images:
        transform = dense_pipeline.eval_transform(config.input)
        for index, path in enumerate(flags.FLAGS.images):
            element = transform.map(file_example(path, index))
            yield {k: np.asarray(v)[None] for k, v in element.items()} | {"mask": np.ones((1,), np.float32)}, [path]
        return
    seen = 0
    for batch in dense_pipeline.create_eval_iterator(config.input, global_batch_size=1):
        if seen >= flags.FLAGS.num_images:
            return
        if batch["mask"][0] > 0:
            seen += 1
            yield batch, [f"eval image_id {int(batch['image_id'][0])}"]


def _colours(num: int) -> np.ndarray:
    return np.asarray([render.palette(i) for i in range(num)], np.uint8)


def _semantic_maps(predictions, batch, shape) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, ground-truth) class maps of row 0 on the visible canvas (-1: ignore)."""
    logits = map_prediction(predictions["semantic_logits"][0], batch, 0, shape, True, bilinear=True)
    truth = np.asarray(batch["semantic"][0])[: shape[0], : shape[1]].astype(np.int64)
    return np.argmax(logits, axis=-1), np.where(truth == 255, -1, truth)


def _panoptic_maps(predictions, batch, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(predicted segment ids, their colour index per pixel, ground-truth colour index) on the visible canvas,
    and the predicted segments' classes; colour index = class, -1 void (segments of one class share it)."""
    ids = map_prediction(predictions["panoptic"][0], batch, 0, shape, True)
    classes = np.asarray(predictions["segment_classes"][0])
    colour = np.where(ids > 0, classes[np.clip(ids - 1, 0, len(classes) - 1)], -1)
    gt_ids = np.asarray(batch["panoptic_ids"][0])[: shape[0], : shape[1]]
    gt_classes = np.asarray(batch["classes"][0])
    gt_colour = np.where(gt_ids > 0, gt_classes[np.clip(gt_ids - 1, 0, len(gt_classes) - 1)], -1)
    return ids, colour, gt_colour, classes


def _outline(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Darkens pixels on the border between two segments, so instances of one class stay apart."""
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    out = image.copy()
    out[edge] = out[edge] // 3
    return out


def predict(workdir: str, out_dir: str) -> list[str]:
    """Writes the PNGs and json for ``workdir``'s model into ``out_dir``; returns the PNG paths."""
    config = load_run_config(workdir)
    mesh = sharding.create_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    info = task_registry.input_module(config).get_dataset_info(config.input)
    setup = build(config, mesh, info, total_steps=1, steps_per_epoch=1.0)
    state = init_params_from(workdir, setup, setup.init_state(0))
    names = tuple(info["class_names"])
    category_ids = tuple(info["category_ids"])
    colours = _colours(len(names))
    os.makedirs(out_dir, exist_ok=True)
    written, results, images, panoptic = [], [], [], []
    for batch, (name,) in _batches(config):
        predictions = jax.device_get(setup.predict_step(state, sharding.shard_batch(batch, setup.batch_sharding)))
        image = visible_image(batch, 0, config.input)
        image_id = int(batch["image_id"][0])
        height, width = (int(v) for v in batch["orig_size"][0])
        if config.task == "semantic_segmentation":
            labels, truth = _semantic_maps(predictions, batch, image.shape[:2])
            drawn = render.draw_label_map(image, labels, colours)
            if not flags.FLAGS.images:
                drawn = render.side_by_side(drawn, render.draw_label_map(image, truth, colours))
            source = map_prediction(predictions["semantic_logits"][0], batch, 0, (height, width), True, bilinear=True)
            Image.fromarray(np.argmax(source, -1).astype(np.uint8)).save(
                os.path.join(out_dir, f"{image_id:06d}_semantic.png")
            )
        elif config.task == "panoptic_segmentation":
            ids, colour, gt_colour, classes = _panoptic_maps(predictions, batch, image.shape[:2])
            drawn = _outline(render.draw_label_map(image, colour, colours), ids)
            if not flags.FLAGS.images:
                gt_ids = np.asarray(batch["panoptic_ids"][0])[: image.shape[0], : image.shape[1]]
                drawn = render.side_by_side(drawn, _outline(render.draw_label_map(image, gt_colour, colours), gt_ids))
            source_ids = map_prediction(predictions["panoptic"][0], batch, 0, (height, width), True)
            os.makedirs(os.path.join(out_dir, "panoptic"), exist_ok=True)
            Image.fromarray(id_to_rgb(source_ids)).save(os.path.join(out_dir, "panoptic", f"{image_id:06d}.png"))
            segments = [
                {"id": int(k), "category_id": int(category_ids[classes[k - 1]]), "area": int((source_ids == k).sum())}
                for k in np.unique(source_ids)
                if k > 0 and classes[k - 1] >= 0
            ]
            panoptic.append({"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": segments})
        else:
            drawn = _draw_detections(predictions, batch, image, names, setup.task)
            results += coco_results(predictions, batch, 0, category_ids, setup.task)
        path = os.path.join(out_dir, f"{image_id:06d}.png")
        Image.fromarray(drawn).save(path)
        written.append(path)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    if config.task in ("detection", "instance_segmentation"):
        with open(os.path.join(out_dir, "predictions.json"), "w") as f:
            json.dump(results, f)
    if panoptic:
        categories = [
            {"id": int(c), "name": n, "isthing": int(t)} for c, n, t in zip(category_ids, names, info["is_thing"])
        ]
        with open(os.path.join(out_dir, "panoptic.json"), "w") as f:
            json.dump({"annotations": panoptic, "categories": categories, "images": images}, f)
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump(images, f, indent=1)
    return written


def _draw_detections(predictions, batch, image, names, task) -> np.ndarray:
    """Boxes (and masks) with names and scores, beside the ground truth when it is known; the boxes come from
    where the task's evaluator takes them (``box_source``)."""
    masks, boxes = None, predictions["boxes"][0]
    if "masks" in predictions:
        masks = _canvas_masks(predictions["masks"][0], image.shape[:2], task.mask_threshold)
        if task.box_source == "mask":
            from_masks = largest_component_boxes(masks)
            boxes = np.where(np.isnan(from_masks), boxes, from_masks)
    drawn = render.draw_instances(
        image, boxes, predictions["labels"][0], predictions["scores"][0], names, masks,
        score_threshold=flags.FLAGS.score_threshold,
    )  # fmt: skip
    if flags.FLAGS.images:
        return drawn
    valid = batch["instance_valid"][0]
    gt_masks = None
    if "instance_masks" in batch and masks is not None:
        grid = batch["instance_masks"][0]
        stride = batch["image"].shape[1] // grid.shape[-1]
        full = np.repeat(np.repeat(grid, stride, axis=1), stride, axis=2)
        gt_masks = full[:, : image.shape[0], : image.shape[1]] > 0
    truth = render.draw_instances(
        image, batch["boxes"][0], np.where(valid, batch["classes"][0], -1), valid.astype(np.float32), names,
        gt_masks, score_threshold=0.5,
    )  # fmt: skip
    return render.side_by_side(drawn, truth)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    try:
        written = predict(flags.FLAGS.workdir, flags.FLAGS.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"wrote {len(written)} PNGs and their json to {flags.FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
