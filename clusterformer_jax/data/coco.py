"""COCO 2017 instances (own tfds builder) and COCO panoptic (tfds `coco/2017_panoptic`).

Instances. tfds' built-in `coco/2017` keeps boxes but no segmentation, so
`CocoInstances` reads the original layout from a manual directory:

  MANUAL_DIR/train2017/*.jpg   MANUAL_DIR/annotations/instances_train2017.json
  MANUAL_DIR/val2017/*.jpg     MANUAL_DIR/annotations/instances_val2017.json

(the original zips train2017.zip, val2017.zip, annotations_trainval2017.zip in
MANUAL_DIR are extracted instead when the folders are absent). A split whose
images and json are both absent is not built. Every annotation's polygons or
RLE are rasterised at build time and stored as one 1-bit PNG per instance:
instances overlap (crowd regions, occlusion), so a single id map would lose
pixels, while 1-bit PNGs of a binary mask are small (about 1 KB). Polygons
are filled and RLE decoded as coco_format.py describes. Boxes are stored in pixels as
[ymin, xmin, ymax, xmax] = [y, x, y + h, x + w] of the COCO `bbox`, clipped
to the image; classes are the 80 categories in ascending COCO id order.

Panoptic. tfds' built-in `coco/2017_panoptic` is used unchanged: it stores
the image, the RGB-encoded segment-id PNG (id = R + 256 G + 256^2 B) and per
segment its id, class (133, in the json's category order, i.e. ascending id:
80 things then 53 stuff), box and is_crowd. Whether a class is a thing is
recovered from its name with `COCO_PANOPTIC_CATEGORIES`. With a manual
directory holding the original files (extracted as
MANUAL_DIR/{train2017,val2017}/, MANUAL_DIR/annotations/panoptic_{train,val}2017.json
and MANUAL_DIR/annotations/panoptic_{train,val}2017/*.png, or the zips
train2017.zip, val2017.zip, panoptic_annotations_trainval2017.zip),
`prepare_coco_panoptic` points tfds' download manager at those files instead
of the network; without one, tfds downloads them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds

from clusterformer_jax.data import coco_format
from clusterformer_jax.data import transforms as T
from clusterformer_jax.data.dense_transforms import IGNORE_LABEL, DenseExample

_log = logging.getLogger(__name__)

# (COCO category id, name): the 80 thing categories, then the 53 panoptic stuff categories.
COCO_THING_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)
COCO_STUFF_CATEGORIES: tuple[tuple[int, str], ...] = (
    (92, "banner"),
    (93, "blanket"),
    (95, "bridge"),
    (100, "cardboard"),
    (107, "counter"),
    (109, "curtain"),
    (112, "door-stuff"),
    (118, "floor-wood"),
    (119, "flower"),
    (122, "fruit"),
    (125, "gravel"),
    (128, "house"),
    (130, "light"),
    (133, "mirror-stuff"),
    (138, "net"),
    (141, "pillow"),
    (144, "platform"),
    (145, "playingfield"),
    (147, "railroad"),
    (148, "river"),
    (149, "road"),
    (151, "roof"),
    (154, "sand"),
    (155, "sea"),
    (156, "shelf"),
    (159, "snow"),
    (161, "stairs"),
    (166, "tent"),
    (168, "towel"),
    (171, "wall-brick"),
    (175, "wall-stone"),
    (176, "wall-tile"),
    (177, "wall-wood"),
    (178, "water-other"),
    (180, "window-blind"),
    (181, "window-other"),
    (184, "tree-merged"),
    (185, "fence-merged"),
    (186, "ceiling-merged"),
    (187, "sky-other-merged"),
    (188, "cabinet-merged"),
    (189, "table-merged"),
    (190, "floor-other-merged"),
    (191, "pavement-merged"),
    (192, "mountain-merged"),
    (193, "grass-merged"),
    (194, "dirt-merged"),
    (195, "paper-merged"),
    (196, "food-other-merged"),
    (197, "building-other-merged"),
    (198, "rock-merged"),
    (199, "wall-other-merged"),
    (200, "rug-merged"),
)
# (id, name, isthing) in ascending id order: the 133 classes of COCO panoptic.
COCO_PANOPTIC_CATEGORIES: tuple[tuple[int, str, bool], ...] = tuple(
    [(i, n, True) for i, n in COCO_THING_CATEGORIES] + [(i, n, False) for i, n in COCO_STUFF_CATEGORIES]
)
assert len(COCO_THING_CATEGORIES) == 80 and len(COCO_PANOPTIC_CATEGORIES) == 133

INSTANCE_SPLITS = {"train": "train2017", "validation": "val2017"}
PANOPTIC_BUILDER = "coco/2017_panoptic"


# ---------------------------------------------------------------------------- local files


def find_or_extract(dl_manager: tfds.download.DownloadManager, root: str, expected: str, archive: str) -> str | None:
    """`root` if `root/expected` exists, else the extraction of `root/archive`, else None."""
    if os.path.exists(os.path.join(root, expected)):
        return root
    if os.path.isfile(os.path.join(root, archive)):
        extracted = os.fspath(dl_manager.extract(os.path.join(root, archive)))
        if os.path.exists(os.path.join(extracted, expected)):
            return extracted
        raise ValueError(f"{os.path.join(root, archive)} does not contain {expected}")
    return None


def manual_dir_of(dl_manager: tfds.download.DownloadManager, dataset: str) -> str:
    """The manual directory, with a one-line error when it is unset, missing or empty."""
    try:
        return os.fspath(dl_manager.manual_dir)
    except (AssertionError, ValueError):
        raise ValueError(
            f"Dataset {dataset!r} needs a manual directory with the original files; it is unset,"
            f' missing or empty ({getattr(dl_manager, "_manual_dir", None)}).'
        ) from None


# ---------------------------------------------------------------------------- instances builder


class CocoInstances(tfds.core.GeneratorBasedBuilder):
    """COCO 2017 detection + instance segmentation from the original files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, boxes, classes, crowd flags, areas and per-instance PNG masks."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train2017/ and val2017/ (JPEGs) and annotations/instances_{train,val}2017.json from"
        " https://cocodataset.org/#download in the manual directory (or the zips train2017.zip,"
        " val2017.zip and annotations_trainval2017.zip)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="COCO 2017 instances: boxes, 80 classes, crowd flags and instance masks.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image/id": tfds.features.Scalar(dtype=np.int64),
                    "image/filename": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "id": tfds.features.Scalar(dtype=np.int64),
                            "area": tfds.features.Scalar(dtype=np.float32),
                            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                            "label": tfds.features.ClassLabel(names=[n for _, n in COCO_THING_CATEGORIES]),
                            "is_crowd": tfds.features.Scalar(dtype=np.bool_),
                            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                        }
                    ),
                }
            ),
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = manual_dir_of(dl_manager, "coco_instances")
        generators = {}
        for split, folder in INSTANCE_SPLITS.items():
            json_name = os.path.join("annotations", f"instances_{folder}.json")
            images_root = find_or_extract(dl_manager, root, folder, f"{folder}.zip")
            annotations_root = find_or_extract(dl_manager, root, json_name, "annotations_trainval2017.zip")
            if images_root is None and annotations_root is None:
                continue
            if images_root is None or annotations_root is None:
                missing = folder if images_root is None else json_name
                raise ValueError(f"coco_instances split {split!r}: {missing} is missing in {root}")
            generators[split] = self._generate_examples(
                os.path.join(images_root, folder), os.path.join(annotations_root, json_name)
            )
        if not generators:
            raise ValueError(
                f"coco_instances: no split found in {root}; expected train2017/ or val2017/ and"
                " annotations/instances_{train,val}2017.json"
            )
        return generators

    def _generate_examples(self, image_dir: str, json_path: str) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(json_path) as f:
            data = json.load(f)
        known = dict(COCO_THING_CATEGORIES)
        for category in data["categories"]:
            if known.get(category["id"]) != category["name"]:
                raise ValueError(
                    f'{json_path}: category {category["id"]} {category["name"]!r} is not a COCO 2017 category'
                )
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(ann)
        missing = 0
        for info in sorted(data["images"], key=lambda x: x["id"]):
            path = os.path.join(image_dir, info["file_name"])
            if not os.path.isfile(path):
                missing += 1
                _log.warning("coco_instances: %s is listed in %s but missing; skipped", path, json_path)
                continue
            height, width = int(info["height"]), int(info["width"])
            objects = []
            for ann in sorted(by_image.get(info["id"], []), key=lambda a: a["id"]):
                x, y, w, h = (float(v) for v in ann["bbox"])
                objects.append(
                    {
                        "id": int(ann["id"]),
                        "area": float(ann.get("area", 0.0)),
                        "bbox": np.array(
                            [
                                min(max(y, 0), height),
                                min(max(x, 0), width),
                                min(max(y + h, 0), height),
                                min(max(x + w, 0), width),
                            ],
                            np.float32,
                        ),
                        "label": known[ann["category_id"]],
                        "is_crowd": bool(ann.get("iscrowd", 0)),
                        "mask": coco_format.mask_png(coco_format.annotation_mask(ann["segmentation"], height, width)),
                    }
                )
            yield int(info["id"]), {
                "image": path,
                "image/id": int(info["id"]),
                "image/filename": info["file_name"],
                "objects": objects,
            }
        if missing:
            _log.warning("coco_instances: %d images of %s were missing and skipped", missing, json_path)


def _stack(values: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Stacks a decoded tfds Sequence field (list or array), empty -> zeros(shape)."""
    if len(values) == 0:
        return np.zeros(shape, dtype)
    return np.stack([np.asarray(v) for v in values]).astype(dtype, copy=False)


def decode_instances(record: Mapping[str, Any]) -> DenseExample:
    """A `CocoInstances` record -> dense example (per-instance masks)."""
    image = T.DecodeImage.to_rgb(record["image"])
    height, width = image.shape[:2]
    objects = record["objects"]
    n = len(objects["label"])
    masks = _stack([m[..., 0] if np.ndim(m) == 3 else m for m in objects["mask"]], (0, height, width), np.uint8)
    if masks.shape[1:] != (height, width):
        raise ValueError(f"instance masks of size {masks.shape[1:]} on a {height}x{width} image")
    return {
        "image": image,
        "image_id": int(record["image/id"]),
        "boxes": _stack(objects["bbox"], (0, 4), np.float32),
        "classes": np.asarray(objects["label"], np.int32).reshape(n),
        "is_crowd": np.asarray(objects["is_crowd"], bool).reshape(n),
        "is_thing": np.ones((n,), bool),
        "masks": masks,
    }


# ---------------------------------------------------------------------------- panoptic


@contextlib.contextmanager
def local_downloads(manual_dir: str) -> Iterator[None]:
    """Makes tfds' download manager read COCO's files from `manual_dir` instead of the network.

    A URL resolves to the extraction of `manual_dir/<its file name>` when that
    archive exists, else to `manual_dir` itself (the extracted layout).
    `extract` of a missing `annotations/panoptic_*.zip` returns its folder's
    parent when the PNG folder is already extracted.
    """
    original_extract = tfds.download.DownloadManager.extract

    def resolve(self, url: str) -> str:
        archive = os.path.join(manual_dir, os.path.basename(str(url)))
        return os.fspath(original_extract(self, archive)) if os.path.isfile(archive) else manual_dir

    def download_and_extract(self, urls):
        if isinstance(urls, Mapping):
            return {key: resolve(self, url) for key, url in urls.items()}
        if isinstance(urls, (list, tuple)):
            return [resolve(self, url) for url in urls]
        return resolve(self, urls)

    def extract(self, path):
        path = os.fspath(path)
        folder = path[: -len(".zip")] if path.endswith(".zip") else path
        if not os.path.exists(path) and os.path.isdir(folder):
            return os.path.dirname(folder)
        return original_extract(self, path)

    with (
        mock.patch.object(tfds.download.DownloadManager, "download_and_extract", download_and_extract),
        mock.patch.object(tfds.download.DownloadManager, "extract", extract),
    ):
        yield


def panoptic_builder_dir(data_dir: str | None) -> str | None:
    """The prepared coco/2017_panoptic version folder under `data_dir`, or None."""
    root = os.path.join(data_dir or tfds.core.constants.DATA_DIR, *PANOPTIC_BUILDER.split("/"))
    found = [os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "dataset_info.json"))]
    if not found:
        return None
    return max(found, key=lambda p: tuple(int(v) for v in os.path.basename(p).split(".")))


def canonical_panoptic_categories(categories: Sequence[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """The 133 COCO panoptic categories in ascending id order, for a json listing all of them or a subset
    (e.g. only the categories its annotations use), in any order; tfds' builder needs exactly 133 names.
    A category that is not a COCO panoptic one (id and name) is a one-line ValueError naming `source`."""
    known = {cid: name for cid, name, _ in COCO_PANOPTIC_CATEGORIES}
    for category in categories:
        if known.get(category.get("id")) != category.get("name"):
            raise ValueError(
                f'{source}: category {category.get("id")} {category.get("name")!r} is not a COCO panoptic'
                " category; the builder reads the 133 categories of panoptic_{train,val}2017.json"
            )
    given = {c["id"]: c for c in categories}
    return [
        dict(given.get(cid, {}), id=cid, name=name, isthing=int(thing)) for cid, name, thing in COCO_PANOPTIC_CATEGORIES
    ]


@contextlib.contextmanager
def _canonical_categories() -> Iterator[None]:
    """Makes tfds' COCO json reader see the canonical 133 panoptic categories whatever subset the json lists."""
    from tensorflow_datasets.object_detection import coco as tfds_coco  # pylint: disable=g-import-not-at-top

    original_init = tfds_coco.CocoAnnotation.__init__

    def init(annotation: Any, annotation_path: Any) -> None:
        original_init(annotation, annotation_path)
        data = annotation._data  # pylint: disable=protected-access
        data["categories"] = canonical_panoptic_categories(data["categories"], os.fspath(annotation_path))

    with mock.patch.object(tfds_coco.CocoAnnotation, "__init__", init):
        yield


def prepare_coco_panoptic(data_dir: str | None, manual_dir: str | None) -> tfds.core.DatasetBuilder:
    """Builds tfds' coco/2017_panoptic as array_record (from `manual_dir` when given)."""
    builder = tfds.builder(PANOPTIC_BUILDER, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with contextlib.ExitStack() as stack:
        stack.enter_context(_canonical_categories())
        if manual_dir:
            stack.enter_context(local_downloads(os.path.expanduser(manual_dir)))
        builder.download_and_prepare(file_format="array_record")
    return builder


def panoptic_class_table(label_names: Sequence[str]) -> tuple[list[int], list[bool]]:
    """(COCO category ids, is-thing flags) for the builder's label names."""
    table = {name: (cid, thing) for cid, name, thing in COCO_PANOPTIC_CATEGORIES}
    unknown = [n for n in label_names if n not in table]
    if unknown:
        raise ValueError(f"coco_panoptic: unknown category names {unknown[:5]} in the prepared dataset")
    return [table[n][0] for n in label_names], [table[n][1] for n in label_names]


class PanopticDecoder:
    """A coco/2017_panoptic record -> dense example (segment map + semantic map)."""

    def __init__(self, label_names: Sequence[str]):
        _, thing = panoptic_class_table(label_names)
        self.is_thing = np.asarray(thing, bool)

    def map(self, record: Mapping[str, Any]) -> DenseExample:
        image = T.DecodeImage.to_rgb(record["image"])
        height, width = image.shape[:2]
        panoptic = np.asarray(record["panoptic_image"])
        if panoptic.shape[:2] != (height, width):
            raise ValueError(f"panoptic PNG of size {panoptic.shape[:2]} on a {height}x{width} image")
        objects = record["panoptic_objects"]
        n = len(objects["label"])
        classes = np.asarray(objects["label"], np.int32).reshape(n)
        segments = coco_format.segments_from_ids(coco_format.rgb_to_id(panoptic), np.asarray(objects["id"]).reshape(n))
        boxes = _stack(objects["bbox"], (0, 4), np.float32) * np.array([height, width, height, width], np.float32)
        semantic_lut = np.concatenate([[IGNORE_LABEL], classes]).astype(np.uint8)
        return {
            "image": image,
            "image_id": int(record["image/id"]),
            "boxes": boxes,
            "classes": classes,
            "is_crowd": np.asarray(objects["is_crowd"], bool).reshape(n),
            "is_thing": self.is_thing[classes],
            "segments": segments,
            "semantic": semantic_lut[segments],
        }
