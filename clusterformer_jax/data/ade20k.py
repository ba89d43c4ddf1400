"""ADE20K SceneParsing (150 classes) from a local ADEChallengeData2016 folder.

tfds' `scene_parse150` reads the 2017 challenge's *instance* annotations
(annotations_instance/), not the 150-class semantic labels every ADE20K
benchmark (and the paper, §4.1.3) uses, so this builder reads the original
ADEChallengeData2016 layout from a manual directory:

  ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_*.png

MANUAL_DIR may be that folder itself, its parent, or hold
ADEChallengeData2016.zip. Splits: 'train' (training, 20,210 images) and
'validation' (2,000). Images and label PNGs are stored byte for byte; an
image without a label PNG, or whose label PNG has another size, is skipped at preparation with a
warning naming the file, and the skipped images are counted.

Labels. The PNGs hold 0 = "other / unlabelled" and 1..150 for the classes.
The decoder applies mmsegmentation's `reduce_zero_label`: 0 becomes the
ignore label 255 and every class k becomes k - 1, so classes are 0..149 in
`ADE20K_CLASSES` order (values above 150 are also ignored). For mask-based
heads every class present in an image is one segment (its mask, its tight
box), none of them a "thing".

`SourceLabels` (`source_labels(manual_dir, split)`) reads a split's label
PNGs back by image id, reduced the same way, for scoring mIoU at the
original image size (mmseg) instead of the eval canvas.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from clusterformer_jax.data import transforms as T
from clusterformer_jax.data.coco import find_or_extract, manual_dir_of
from clusterformer_jax.data.dense_transforms import IGNORE_LABEL, DenseExample, segment_boxes

_log = logging.getLogger(__name__)

NUM_CLASSES = 150
FOLDER = "ADEChallengeData2016"
SPLITS = {"train": "training", "validation": "validation"}

ADE20K_CLASSES: tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
assert len(ADE20K_CLASSES) == NUM_CLASSES


def image_id(filename: str) -> int:
    """ADE_train_00000123.jpg -> 123 (0 when the name has no trailing number)."""
    match = re.search(r"(\d+)$", os.path.splitext(os.path.basename(filename))[0])
    return int(match.group(1)) if match else 0


def _dataset_root(dl_manager: tfds.download.DownloadManager) -> str:
    """The ADEChallengeData2016 folder inside (or equal to) the manual directory."""
    manual = manual_dir_of(dl_manager, "ade20k")
    if os.path.isdir(os.path.join(manual, "images")) and os.path.isdir(os.path.join(manual, "annotations")):
        return manual
    parent = find_or_extract(dl_manager, manual, FOLDER, f"{FOLDER}.zip")
    if parent is None:
        raise ValueError(f"ade20k: neither {FOLDER}/ nor {FOLDER}.zip found in {manual}")
    return os.path.join(parent, FOLDER)


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADE20K SceneParsing 150 (ADEChallengeData2016) with its semantic label PNGs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016 images and raw label PNGs (0 = other)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put ADEChallengeData2016/ (or ADEChallengeData2016.zip) from"
        " http://sceneparsing.csail.mit.edu in the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ADE20K SceneParsing: 150 classes; label PNG 0 = other, k = class k - 1.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "annotation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "image/filename": tfds.features.Text(),
                    "image/id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            homepage="http://sceneparsing.csail.mit.edu",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = _dataset_root(dl_manager)
        generators = {}
        for split, folder in SPLITS.items():
            images = os.path.join(root, "images", folder)
            labels = os.path.join(root, "annotations", folder)
            if os.path.isdir(images) and os.path.isdir(labels):
                generators[split] = self._generate_examples(images, labels)
            elif os.path.isdir(images) or os.path.isdir(labels):
                raise ValueError(f"ade20k split {split!r}: images/{folder} or annotations/{folder} missing in {root}")
        if not generators:
            raise ValueError(f"ade20k: no images/{{training,validation}} folders in {root}")
        return generators

    def _generate_examples(self, image_dir: str, label_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
        skipped = mismatched = 0
        for name in sorted(os.listdir(image_dir)):
            if not name.lower().endswith(".jpg"):
                continue
            stem = os.path.splitext(name)[0]
            label = os.path.join(label_dir, stem + ".png")
            if not os.path.isfile(label):
                skipped += 1
                _log.warning("ade20k: no label PNG for %s; skipped", os.path.join(image_dir, name))
                continue
            sizes = _image_size(os.path.join(image_dir, name)), _image_size(label)
            if sizes[0] != sizes[1]:
                mismatched += 1
                _log.warning(
                    "ade20k: label %s is %dx%d but its image %s is %dx%d; skipped",
                    label,
                    *sizes[1],
                    os.path.join(image_dir, name),
                    *sizes[0],
                )
                continue
            yield stem, {
                "image": os.path.join(image_dir, name),
                "annotation": label,
                "image/filename": name,
                "image/id": image_id(name),
            }
        if skipped:
            _log.warning("ade20k: %d images in %s had no label and were skipped", skipped, image_dir)
        if mismatched:
            _log.warning("ade20k: %d images in %s had a label of another size and were skipped", mismatched, image_dir)


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file's header (nothing decoded)."""
    with Image.open(path) as image:
        return image.height, image.width


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """Raw ADE label (0 = other, 1..150) -> uint8 class 0..149, 255 = ignore."""
    label = np.asarray(label)
    out = label.astype(np.int32) - 1
    out[(out < 0) | (out >= NUM_CLASSES)] = IGNORE_LABEL
    return out.astype(np.uint8)


def semantic_to_segments(semantic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes present in ascending order, segment map with k + 1 for class k's pixels)."""
    present = np.bincount(semantic.ravel(), minlength=256)[:IGNORE_LABEL] > 0
    classes = np.flatnonzero(present).astype(np.int32)
    lut = np.zeros(256, np.int32)
    lut[classes] = np.arange(1, len(classes) + 1)
    return classes, lut[semantic]


def decode(record: Mapping[str, Any]) -> DenseExample:
    """An `Ade20k` record -> dense example (semantic map + one segment per class)."""
    image = T.DecodeImage.to_rgb(record["image"])
    label = np.asarray(record["annotation"])
    if label.ndim == 3:
        label = label[..., 0]
    if label.shape != image.shape[:2]:
        raise ValueError(f"label of size {label.shape} on a {image.shape[0]}x{image.shape[1]} image")
    semantic = reduce_zero_label(label)
    classes, segments = semantic_to_segments(semantic)
    n = len(classes)
    return {
        "image": image,
        "image_id": int(record["image/id"]),
        "boxes": segment_boxes(segments, n),
        "classes": classes,
        "is_crowd": np.zeros((n,), bool),
        "is_thing": np.zeros((n,), bool),
        "segments": segments,
        "semantic": semantic,
    }


class SourceLabels:
    """image id -> (H, W) uint8 reduced label map (0..149, 255 = ignore) of one split at its original size.

    ``source`` is the split's annotation folder (annotations/validation) or an ``ADEChallengeData2016.zip``
    (then ``member`` is the folder inside it). Files are indexed by `image_id` of their names; a missing id
    is a one-line ValueError naming the folder.
    """

    def __init__(self, source: str, member: str | None = None):
        self.source, self.member = source, member
        self._zip: zipfile.ZipFile | None = None
        if member is None:
            names = [n for n in sorted(os.listdir(source)) if n.lower().endswith(".png")]
        else:
            prefix = member.rstrip("/") + "/"
            with zipfile.ZipFile(source) as archive:
                names = [n[len(prefix) :] for n in archive.namelist() if n.startswith(prefix) and n.endswith(".png")]
        self.files: dict[int, str] = {}
        for name in names:
            key = image_id(name)
            if key in self.files:
                raise ValueError(f"ade20k: {name} and {self.files[key]} in {self.where} have the same image id {key}")
            self.files[key] = name

    @property
    def where(self) -> str:
        return self.source if self.member is None else f"{self.source}:{self.member}"

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, key: int) -> np.ndarray:
        """The PNG's raw values (0 = other, 1..150) for image id ``key``."""
        name = self.files.get(int(key))
        if name is None:
            raise ValueError(f"ade20k: no annotation PNG for image id {key} in {self.where}")
        if self.member is None:
            with Image.open(os.path.join(self.source, name)) as image:
                label = np.asarray(image)
        else:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.source)
            with self._zip.open(f"{self.member.rstrip('/')}/{name}") as f, Image.open(f) as image:
                label = np.asarray(image)
        return label[..., 0] if label.ndim == 3 else label

    def __call__(self, key: int) -> np.ndarray:
        return reduce_zero_label(self.raw(key))


def source_labels(manual_dir: str, split: str) -> SourceLabels | None:
    """The split's ('train' / 'validation') label PNGs under a manual directory laid out as for preparation:
    the ADEChallengeData2016 folder itself, its parent, or a parent holding ADEChallengeData2016.zip; None
    when none of them has the split's annotations."""
    folder = os.path.join("annotations", SPLITS.get(split, split))
    for root in (manual_dir, os.path.join(manual_dir, FOLDER)):
        if os.path.isdir(os.path.join(root, folder)):
            return SourceLabels(os.path.join(root, folder))
    archive = os.path.join(manual_dir, f"{FOLDER}.zip")
    if os.path.isfile(archive):
        member = f"{FOLDER}/{folder}"
        with zipfile.ZipFile(archive) as zf:
            if any(n.startswith(member + "/") for n in zf.namelist()):
                return SourceLabels(archive, member)
    return None
