"""A procedurally generated dense dataset: shapes on textured landscapes.

Each image is a landscape of stuff bands (sky on top, optionally a water band
below a wavy horizon, grass at the bottom), each with its own texture, and
1..max_objects things (circle, square, triangle; random size, rotation and
colour) painted on top. Objects may occlude each other, but a new object is
only placed if it covers at most 30% of any earlier object's visible pixels.

Classes are numbered like COCO panoptic, things first:
  0 circle, 1 square, 2 triangle (things), 3 sky, 4 grass, 5 water (stuff);
COCO-format exports use category id = class + 1.

Every pixel belongs to exactly one segment (visible part of an object, or a
stuff band), so a single segment-id map describes instances, semantic labels
and panoptic segments at once; it is stored as a COCO-style RGB-encoded PNG
(id = R + 256 G + 256^2 B; thing k of an image has id k + 1, stuff class c
has id 100 + c). Images are PNGs, so decoded pixels equal the generated ones.

Generation is a pure function of (variant, split, index): example i of a
split uses `np.random.default_rng([20231, split_code, i])`, so every machine
builds identical data. `export_coco` writes a split as COCO instances json
(compressed RLE masks), COCO panoptic json + PNGs and the images, for COCO
evaluators.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from clusterformer_jax.data.coco_format import id_to_rgb, png_bytes, rgb_to_id, rle_encode, segments_from_ids
from clusterformer_jax.data.dense_transforms import IGNORE_LABEL, DenseExample

THING_CLASSES = ("circle", "square", "triangle")
STUFF_CLASSES = ("sky", "grass", "water")
CLASSES = THING_CLASSES + STUFF_CLASSES
SKY, GRASS, WATER = (CLASSES.index(n) for n in STUFF_CLASSES)
NUM_THING_CLASSES = len(THING_CLASSES)
STUFF_ID_OFFSET = 100
_SEED = 20231
_SPLIT_CODES = {"train": 0, "validation": 1}
_THING_COLOURS = np.array(
    [
        (220, 40, 40),
        (240, 140, 20),
        (240, 220, 40),
        (150, 50, 200),
        (220, 50, 170),
        (240, 240, 240),
        (30, 30, 30),
        (120, 70, 30),
    ],
    np.float64,
)
# Display colours for the COCO panoptic categories.
_CATEGORY_COLOURS = ((220, 20, 60), (0, 0, 142), (250, 170, 30), (70, 130, 180), (152, 251, 152), (60, 143, 255))


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Image side, split sizes and the most objects per image."""

    image_size: int = 128
    num_train: int = 2000
    num_validation: int = 200
    max_objects: int = 5


VARIANTS = {
    "default": ShapesConfig(
        name="default",
        description="128x128, 2000 train / 200 validation.",
        image_size=128,
        num_train=2000,
        num_validation=200,
        max_objects=5,
    ),
    "small": ShapesConfig(
        name="small",
        description="64x64, 48 train / 16 validation (tests).",
        image_size=64,
        num_train=48,
        num_validation=16,
        max_objects=4,
    ),
}


# ---------------------------------------------------------------------------- generation


def _object_mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Pixels whose centre lies inside the shape (exact, no antialiasing)."""
    y, x = np.mgrid[:size, :size].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    if kind == 0:  # circle of radius r
        return dx * dx + dy * dy <= r * r
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 1:  # square of half-side r, rotated
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    # Equilateral triangle with circumradius r, rotated: inside all three edges.
    inside = np.ones((size, size), bool)
    for k in range(3):
        theta = 2 * math.pi * k / 3
        inside &= (math.cos(theta) * u + math.sin(theta) * v) <= r / 2
    return inside


def _textures(rng: np.random.Generator, size: int) -> dict[int, np.ndarray]:
    """One float (size, size, 3) texture per stuff class."""
    y, x = np.mgrid[:size, :size].astype(np.float64) / size
    noise = lambda amp: rng.normal(0.0, amp, (size, size, 1))  # noqa: E731
    sky = np.array([100, 150, 225]) + rng.uniform(-15, 15, 3)
    sky = sky + (y[..., None] * np.array([60, 50, 20])) + noise(3)
    grass = np.array([60, 145, 55]) + rng.uniform(-15, 15, 3)
    blades = 18 * np.sin(2 * math.pi * (x * rng.uniform(20, 40) + 0.3 * np.sin(6 * y)))
    grass = grass + blades[..., None] * np.array([0.4, 1.0, 0.3]) + noise(12)
    water = np.array([35, 85, 170]) + rng.uniform(-15, 15, 3)
    waves = 20 * np.sin(2 * math.pi * (y * rng.uniform(12, 24) + 0.15 * np.sin(2 * math.pi * 3 * x)))
    water = water + waves[..., None] * np.array([0.5, 0.7, 1.0]) + noise(4)
    return {SKY: sky, GRASS: grass, WATER: water}


def generate(size: int, max_objects: int, split: str, index: int) -> dict[str, Any]:
    """Example `index` of `split`: image uint8 (S, S, 3), ids int32 (S, S), segments list."""
    rng = np.random.default_rng([_SEED, _SPLIT_CODES[split], index])
    y, x = np.mgrid[:size, :size].astype(np.float64) + 0.5
    horizon = size * rng.uniform(0.25, 0.5) + size * rng.uniform(0, 0.04) * np.sin(
        2 * math.pi * x / (size * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * math.pi)
    )
    stuff = np.full((size, size), GRASS, np.int32)
    stuff[y < horizon] = SKY
    if rng.random() < 0.6:
        shore = (
            horizon
            + size * rng.uniform(0.15, 0.3)
            + size
            * rng.uniform(0, 0.03)
            * np.sin(2 * math.pi * x / (size * rng.uniform(0.3, 1.0)) + rng.uniform(0, 2 * math.pi))
        )
        stuff[(y >= horizon) & (y < shore)] = WATER
    textures = _textures(rng, size)
    image = np.zeros((size, size, 3), np.float64)
    for cls, texture in textures.items():
        image[stuff == cls] = texture[stuff == cls]
    ids = STUFF_ID_OFFSET + stuff

    things: list[tuple[int, int]] = []  # (segment id, class)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            kind = int(rng.integers(0, NUM_THING_CLASSES))
            r = size * rng.uniform(0.07, 0.18)
            cx, cy = rng.uniform(r, size - r, 2)
            mask = _object_mask(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), size)
            if not mask.any():
                continue
            covered = [np.count_nonzero(mask & (ids == sid)) / np.count_nonzero(ids == sid) for sid, _ in things]
            if all(c <= 0.3 for c in covered):
                break
        else:
            continue
        sid = len(things) + 1
        colour = _THING_COLOURS[rng.integers(0, len(_THING_COLOURS))] + rng.uniform(-20, 20, 3)
        shade = 1.0 - 0.25 * (y - cy + x - cx) / (4 * r)  # A soft light from the top left.
        image[mask] = (colour[None] * shade[mask][:, None]) + rng.normal(0, 4, (int(mask.sum()), 3))
        ids[mask] = sid
        things.append((sid, kind))

    segments = []
    for sid, cls in things + [(STUFF_ID_OFFSET + c, c) for c in (SKY, GRASS, WATER)]:
        rows, cols = np.nonzero(ids == sid)
        if not len(rows):
            continue
        segments.append(
            {
                "id": sid,
                "label": cls,
                "is_thing": cls < NUM_THING_CLASSES,
                "is_crowd": False,
                "area": len(rows),
                "bbox": np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32),
            }
        )
    return {
        "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
        "ids": ids.astype(np.int32),
        "segments": segments,
        "image_id": index + 1,
    }


# ---------------------------------------------------------------------------- builder


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes-on-landscapes dataset with boxes, masks, semantic and panoptic labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = list(VARIANTS.values())

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="Circles, squares and triangles on sky/grass/water landscapes.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "image/id": tfds.features.Scalar(dtype=np.int64),
                    "panoptic": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "segments": tfds.features.Sequence(
                        {
                            "id": tfds.features.Scalar(dtype=np.int64),
                            "label": tfds.features.ClassLabel(names=CLASSES),
                            "is_thing": tfds.features.Scalar(dtype=np.bool_),
                            "is_crowd": tfds.features.Scalar(dtype=np.bool_),
                            "area": tfds.features.Scalar(dtype=np.int64),
                            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is generated.
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        for index in range(count):
            ex = generate(cfg.image_size, cfg.max_objects, split, index)
            yield index, {
                "image": png_bytes(ex["image"]),
                "image/id": ex["image_id"],
                "panoptic": png_bytes(id_to_rgb(ex["ids"])),
                "segments": ex["segments"],
            }


def prepare_shapes(data_dir: str | None = None, variant: str = "default") -> Shapes:
    """Builds the `variant` of shapes (array_record) under `data_dir` once; returns the builder."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown shapes variant {variant!r}; expected one of {sorted(VARIANTS)}.")
    builder = Shapes(
        config=variant, data_dir=os.path.expanduser(data_dir) if data_dir else None, file_format="array_record"
    )
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    return builder


def decode(record: Mapping[str, Any]) -> DenseExample:
    """A `Shapes` record -> dense example (segment map + semantic map)."""
    image = np.asarray(record["image"])
    segs = record["segments"]
    n = len(segs["label"])
    classes = np.asarray(segs["label"], np.int32).reshape(n)
    segments = segments_from_ids(rgb_to_id(record["panoptic"]), np.asarray(segs["id"]).reshape(n))
    lut = np.concatenate([[IGNORE_LABEL], classes]).astype(np.uint8)
    boxes = np.stack(segs["bbox"]).astype(np.float32) if n else np.zeros((0, 4), np.float32)
    return {
        "image": image,
        "image_id": int(record["image/id"]),
        "boxes": boxes,
        "classes": classes,
        "is_crowd": np.asarray(segs["is_crowd"], bool).reshape(n),
        "is_thing": np.asarray(segs["is_thing"], bool).reshape(n),
        "segments": segments,
        "semantic": lut[segments],
    }


# ---------------------------------------------------------------------------- COCO export


def coco_categories() -> list[dict[str, Any]]:
    """COCO panoptic-style categories (id = class + 1)."""
    return [
        {
            "id": c + 1,
            "name": name,
            "supercategory": "shape" if c < NUM_THING_CLASSES else "stuff",
            "isthing": int(c < NUM_THING_CLASSES),
            "color": list(_CATEGORY_COLOURS[c]),
        }
        for c, name in enumerate(CLASSES)
    ]


def export_paths(out_dir: str, split: str) -> dict[str, str]:
    """Where `export_coco` writes `split`."""
    return {
        "image_dir": os.path.join(out_dir, split),
        "instances_json": os.path.join(out_dir, "annotations", f"instances_{split}.json"),
        "panoptic_json": os.path.join(out_dir, "annotations", f"panoptic_{split}.json"),
        "panoptic_png_dir": os.path.join(out_dir, "annotations", f"panoptic_{split}"),
    }


def export_coco(builder: tfds.core.DatasetBuilder, split: str, out_dir: str | None = None) -> dict[str, str]:
    """Writes `split` in COCO format (once); returns the paths from `export_paths`.

    Instances json: things only, masks as compressed RLE, bbox [x, y, w, h],
    area = pixel count. Panoptic json + PNGs: every segment, PNGs named like
    the images ({image_id:06d}.png). Images are written as PNG too. The
    default `out_dir` is `<builder data dir>/coco_format`.
    """
    out_dir = out_dir or os.path.join(os.fspath(builder.data_dir), "coco_format")
    paths = export_paths(out_dir, split)
    done = os.path.join(out_dir, f".{split}_complete")
    if os.path.exists(done):
        return paths
    for key in ("image_dir", "panoptic_png_dir"):
        os.makedirs(paths[key], exist_ok=True)
    images, instances, panoptic = [], [], []
    for record in builder.as_data_source(split):
        image_id = int(record["image/id"])
        image = np.asarray(record["image"])
        height, width = image.shape[:2]
        name = f"{image_id:06d}.png"
        with open(os.path.join(paths["image_dir"], name), "wb") as f:
            f.write(png_bytes(image))
        with open(os.path.join(paths["panoptic_png_dir"], name), "wb") as f:
            f.write(png_bytes(np.asarray(record["panoptic"])))
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        ids = rgb_to_id(record["panoptic"])
        segs = record["segments"]
        infos = []
        for k in range(len(segs["label"])):
            ymin, xmin, ymax, xmax = (float(v) for v in segs["bbox"][k])
            bbox = [xmin, ymin, xmax - xmin, ymax - ymin]
            sid, cls = int(segs["id"][k]), int(segs["label"][k])
            info = {"id": sid, "category_id": cls + 1, "iscrowd": 0, "bbox": bbox, "area": int(segs["area"][k])}
            infos.append(info)
            if bool(segs["is_thing"][k]):
                instances.append(
                    {**info, "id": image_id * 1000 + sid, "image_id": image_id, "segmentation": rle_encode(ids == sid)}
                )
        panoptic.append({"image_id": image_id, "file_name": name, "segments_info": infos})
    categories = coco_categories()
    with open(paths["instances_json"], "w") as f:
        json.dump(
            {"images": images, "annotations": instances, "categories": [c for c in categories if c["isthing"]]}, f
        )
    with open(paths["panoptic_json"], "w") as f:
        json.dump({"images": images, "annotations": panoptic, "categories": categories}, f)
    open(done, "w").close()
    return paths
