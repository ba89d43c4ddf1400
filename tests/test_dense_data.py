"""Dense input pipelines: real builders on tiny files in the original formats, transforms, grain iterators.

Each dataset fixture writes a few files in the on-disk layout the real dataset ships with (COCO instances
json + JPEGs, COCO panoptic json + PNGs, an ADEChallengeData2016 zip), runs the real builder on them with
no network, and the tests read the result back through the grain iterators and compare with what was
written. Eval configs use a shorter side equal to the images' so the eval scale is exactly 1.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from clusterformer_jax.data import ade20k as ade20k_lib
from clusterformer_jax.data import coco as coco_lib
from clusterformer_jax.data import coco_format
from clusterformer_jax.data import dense_pipeline as dp
from clusterformer_jax.data import dense_transforms as DT
from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.data import transforms as T

# one worker runs this file: its module fixtures are built once
pytestmark = pytest.mark.xdist_group("dense_data")

MEAN = np.asarray(T.IMAGENET_MEAN, np.float32)
STD = np.asarray(T.IMAGENET_STD, np.float32)
ONE = dict(process_index=0, process_count=1)


def _unnormalize(image: np.ndarray) -> np.ndarray:
    return np.round(image * STD + MEAN)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95, subsampling=0)  # No chroma blur at edges.
    return buffer.getvalue()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _paint(height: int, width: int, blocks: list[tuple[int, int, int, int, tuple[int, int, int]]]) -> np.ndarray:
    """Grey image with flat colour blocks (rows r0:r1, cols c0:c1); 8-aligned so JPEG keeps them."""
    image = np.full((height, width, 3), 128, np.uint8)
    for r0, r1, c0, c1, colour in blocks:
        image[r0:r1, c0:c1] = colour
    return image


def _by_image_id(batches: list[dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for batch in batches:
        for i in np.flatnonzero(batch["mask"]):
            out[int(batch["image_id"][i])] = {k: v[i] for k, v in batch.items()}
    return out


def _inside_polygon(polygon: list[float], height: int, width: int) -> np.ndarray:
    """Reference fill: pixel centres inside a convex polygon (half-plane tests, independent code)."""
    pts = np.asarray(polygon, float).reshape(-1, 2)
    y, x = np.mgrid[:height, :width] + 0.5
    signs = []
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        signs.append((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0))
    signs = np.stack(signs)
    return (np.all(signs >= 0, axis=0) | np.all(signs <= 0, axis=0)).astype(np.uint8)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Reference COCO RLE (column-major runs starting with zeros), by a plain loop."""
    flat = mask.T.reshape(-1).tolist()
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


# ============================================================== COCO instances (own builder)

RED, GREEN, BLUE = (200, 30, 30), (30, 180, 40), (40, 60, 210)
PERSON_POLY = [16, 8, 40, 8, 40, 24, 16, 24]  # rows 8..23, cols 16..39
CAR_POLYS = [[48, 0, 64, 0, 64, 8, 48, 8], [0, 24, 12, 24, 0, 31]]  # rectangle + triangle
DOG_POLY = [8, 8, 24, 8, 24, 24, 8, 24]


def _crowd_mask() -> np.ndarray:
    mask = np.zeros((32, 64), np.uint8)
    mask[0:8, 0:8] = 1
    mask[4:6, 10:12] = 1
    return mask


@pytest.fixture(scope="module")
def coco_instances(tmp_path_factory) -> dict:
    """val2017 with 4 listed images (one corrupt JPEG, one without annotations); no train2017."""
    manual = str(tmp_path_factory.mktemp("coco_manual"))
    images = {
        139: _paint(32, 64, [(8, 24, 16, 40, RED), (0, 8, 48, 64, BLUE)]),
        285: _paint(48, 32, [(8, 24, 8, 24, GREEN)]),
        724: _paint(32, 40, []),
    }
    for image_id, image in images.items():
        _write(f"{manual}/val2017/{image_id:012d}.jpg", _jpeg(image))
    _write(f"{manual}/val2017/{632:012d}.jpg", b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    sizes = {139: (32, 64), 285: (48, 32), 724: (32, 40), 632: (32, 48)}
    annotations = [
        dict(
            id=11, image_id=139, category_id=1, iscrowd=0, area=384.0, bbox=[16, 8, 24, 16], segmentation=[PERSON_POLY]
        ),
        dict(id=12, image_id=139, category_id=3, iscrowd=0, area=200.0, bbox=[0, 0, 64, 31], segmentation=CAR_POLYS),
        dict(
            id=10,
            image_id=139,
            category_id=1,
            iscrowd=1,
            area=68.0,
            bbox=[0, 0, 12, 8],
            segmentation=_uncompressed_rle(_crowd_mask()),
        ),
        dict(id=20, image_id=285, category_id=18, iscrowd=0, area=256.0, bbox=[8, 8, 16, 16], segmentation=[DOG_POLY]),
        dict(
            id=30,
            image_id=632,
            category_id=18,
            iscrowd=0,
            area=4.0,
            bbox=[0, 0, 2, 2],
            segmentation=[[0, 0, 2, 0, 2, 2, 0, 2]],
        ),
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()],
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
        ],
    }
    _write(f"{manual}/annotations/instances_val2017.json", json.dumps(data).encode())
    return {"manual": manual, "data_dir": str(tmp_path_factory.mktemp("coco_data")), "images": images}


def _coco_cfg(fixture: dict, **overrides) -> dict:
    cfg = dict(
        dataset="coco_instances",
        data_dir=fixture["data_dir"],
        manual_dir=fixture["manual"],
        train_split="validation",
        eval_short_side=32,
        eval_max_size=64,
        eval_pad_size=64,
        train_crop_size=64,
        max_instances=5,
        mask_stride=1,
    )
    cfg.update(overrides)
    return cfg


def test_coco_instances_builder_round_trip(coco_instances):
    cfg = _coco_cfg(coco_instances)
    info = dp.get_dataset_info(cfg)
    assert info["num_classes"] == 80 and info["num_eval"] == 4 and info["category_ids"][2] == 3
    assert info["instances_json"].endswith(os.path.join("annotations", "instances_val2017.json"))

    skipped = dp.skipped_examples()
    batches = list(dp.create_eval_iterator(cfg, global_batch_size=2, **ONE))
    assert dp.skipped_examples() == skipped + 1  # The corrupt JPEG, counted.
    assert len(batches) == 2 and sum(b["mask"].sum() for b in batches) == 3
    got = _by_image_id(batches)
    assert sorted(got) == [139, 285, 724]

    for image_id, image in coco_instances["images"].items():
        ex, (h, w) = got[image_id], image.shape[:2]
        np.testing.assert_allclose(_unnormalize(ex["image"][:h, :w]), image, atol=6)
        assert ex["image_mask"].sum() == h * w and not ex["image"][h:].any()
        np.testing.assert_array_equal(ex["scale"], [1, 1])
        np.testing.assert_array_equal(ex["orig_size"], [h, w])
        assert np.all(ex["semantic"] == 255) and not ex["panoptic_ids"].any()

    ex = got[139]  # Objects in annotation-id order: crowd person 10, person 11, car 12.
    assert ex["instance_valid"].tolist() == [True, True, True, False, False]
    assert ex["classes"].tolist() == [0, 0, 2, -1, -1]
    assert ex["is_crowd"].tolist() == [True, False, False, False, False]
    np.testing.assert_allclose(ex["boxes"][:3], [[0, 0, 8, 12], [8, 16, 24, 40], [0, 0, 31, 64]])
    person = np.zeros((32, 64), np.uint8)
    person[8:24, 16:40] = 1
    car = np.zeros((32, 64), np.uint8)
    car[0:8, 48:64] = 1
    car |= _inside_polygon(CAR_POLYS[1], 32, 64)
    np.testing.assert_array_equal(ex["instance_masks"][0, :32, :64], _crowd_mask())
    np.testing.assert_array_equal(ex["instance_masks"][1, :32, :64], person)
    np.testing.assert_array_equal(ex["instance_masks"][2, :32, :64], car)
    assert not ex["instance_masks"][3:].any() and not ex["instance_masks"][:, 32:].any()

    dog = got[285]
    assert dog["classes"][0] == 16 and dog["instance_valid"].sum() == 1
    np.testing.assert_allclose(dog["boxes"][0], [8, 8, 24, 24])
    assert dog["instance_masks"][0, 8:24, 8:24].all() and dog["instance_masks"][0].sum() == 256
    assert got[724]["instance_valid"].sum() == 0 and np.all(got[724]["classes"] == -1)


def test_coco_instances_train_skips_corrupt_and_counts(coco_instances):
    cfg = _coco_cfg(coco_instances, train_scale_range=(0.5, 1.5), max_instances=4)
    skipped = dp.skipped_examples()
    it = dp.create_train_iterator(cfg, seed=0, global_batch_size=3, **ONE)
    batches = [next(it) for _ in range(4)]  # 12 > 3 epochs of the 3 readable images.
    ids = np.concatenate([b["image_id"] for b in batches])
    assert set(ids.tolist()) == {139, 285, 724}
    assert dp.skipped_examples() >= skipped + 3
    b = batches[0]
    assert b["image"].shape == (3, 64, 64, 3) and b["instance_masks"].shape == (3, 4, 64, 64)
    for batch in batches:
        for i in range(3):
            valid = batch["instance_valid"][i]
            assert (
                np.all(batch["classes"][i][~valid] == -1)
                and valid.sum() <= {139: 3, 285: 1, 724: 0}[int(batch["image_id"][i])]
            )
            boxes = batch["boxes"][i][valid]
            assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
            assert np.all(boxes >= 0) and np.all(boxes <= 64)
    it.close()


def test_missing_and_empty_split_one_line_errors(coco_instances):
    for split, word in (("train", "missing"), ("validation[:0]", "empty")):
        cfg = _coco_cfg(coco_instances, train_split=split)
        with pytest.raises(ValueError) as err:
            dp.create_train_iterator(cfg, seed=0, global_batch_size=2, **ONE)
        message = str(err.value)
        assert f"'{split}'" in message and "'coco_instances'" in message and word in message
        assert coco_instances["data_dir"] in message and "\n" not in message
        assert "python -m clusterformer_jax.data.dense_pipeline --dataset=coco_instances" in message


def test_unprepared_without_manual_dir_and_unknown_dataset(tmp_path):
    for name in ("coco_instances", "ade20k", "coco_panoptic"):
        with pytest.raises(ValueError) as err:
            dp.get_dataset_info({"dataset": name, "data_dir": str(tmp_path)})
        assert name in str(err.value) and "--manual_dir" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cityscapes"):
        dp.get_dataset_info({"dataset": "cityscapes"})


# ============================================================== COCO panoptic (tfds coco/2017_panoptic)

SKY_ID, GRASS_ID = 187, 193
PAN_SEGMENTS = {  # image id -> [(segment id, category id, iscrowd, rows, cols)]
    9: [
        (3226956, 1, 0, (8, 24), (8, 16)),
        (5, 1, 1, (8, 16), (24, 40)),
        (70000, SKY_ID, 0, (0, 8), (0, 48)),
        (1234, GRASS_ID, 0, (24, 32), (0, 48)),
    ],
    25: [(77, 18, 0, (0, 16), (0, 16)), (78, GRASS_ID, 0, (16, 48), (0, 32))],
}
PAN_SIZES = {9: (32, 48), 25: (48, 32), 30: (32, 32)}


def _panoptic_png(image_id: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = PAN_SIZES[image_id]
    ids = np.zeros((h, w), np.int64)
    for sid, _, _, (r0, r1), (c0, c1) in PAN_SEGMENTS.get(image_id, []):
        ids[r0:r1, c0:c1] = sid
    return ids, coco_format.id_to_rgb(ids)


@pytest.fixture(scope="module")
def coco_panoptic(tmp_path_factory) -> dict:
    """Original panoptic layout: val2017/ folder, train2017.zip, extracted panoptic PNG folders."""
    manual = str(tmp_path_factory.mktemp("panoptic_manual"))
    categories = [
        {"id": i, "name": n, "isthing": int(t), "supercategory": "x"} for i, n, t in coco_lib.COCO_PANOPTIC_CATEGORIES
    ]
    colours = {9: [(8, 24, 8, 16, RED), (8, 16, 24, 40, GREEN)], 25: [(0, 16, 0, 16, BLUE)], 30: []}
    images = {i: _paint(*PAN_SIZES[i], colours[i]) for i in PAN_SIZES}
    for split, ids in (("val", (9, 25)), ("train", (30,))):
        anns = []
        for image_id in ids:
            h, w = PAN_SIZES[image_id]
            _write(f"{manual}/{split}2017/{image_id:012d}.jpg", _jpeg(images[image_id]))
            _write(f"{manual}/annotations/panoptic_{split}2017/{image_id:012d}.png", _png(_panoptic_png(image_id)[1]))
            anns.append(
                {
                    "image_id": image_id,
                    "file_name": f"{image_id:012d}.png",
                    "segments_info": [
                        {
                            "id": sid,
                            "category_id": cid,
                            "iscrowd": crowd,
                            "bbox": [c0, r0, c1 - c0, r1 - r0],
                            "area": (r1 - r0) * (c1 - c0),
                        }
                        for sid, cid, crowd, (r0, r1), (c0, c1) in PAN_SEGMENTS.get(image_id, [])
                    ],
                }
            )
        data = {
            "images": [
                {"id": i, "file_name": f"{i:012d}.jpg", "height": PAN_SIZES[i][0], "width": PAN_SIZES[i][1]}
                for i in ids
            ],
            "annotations": anns,
            "categories": categories,
        }
        _write(f"{manual}/annotations/panoptic_{split}2017.json", json.dumps(data).encode())
    with zipfile.ZipFile(f"{manual}/train2017.zip", "w") as zf:  # Train images only as the original zip.
        zf.write(f"{manual}/train2017/{30:012d}.jpg", f"train2017/{30:012d}.jpg")
    shutil.rmtree(f"{manual}/train2017")
    return {"manual": manual, "data_dir": str(tmp_path_factory.mktemp("panoptic_data")), "images": images}


def test_coco_panoptic_builder_round_trip(coco_panoptic):
    cfg = dict(
        dataset="coco_panoptic",
        data_dir=coco_panoptic["data_dir"],
        manual_dir=coco_panoptic["manual"],
        eval_short_side=32,
        eval_max_size=64,
        eval_pad_size=64,
        max_instances=6,
        mask_stride=1,
    )
    info = dp.get_dataset_info(cfg)
    assert (info["num_classes"], info["num_thing_classes"], info["num_train"], info["num_eval"]) == (133, 80, 1, 2)
    assert info["panoptic_png_dir"].endswith("panoptic_val2017") and os.path.isdir(info["panoptic_png_dir"])
    index = {cid: k for k, (cid, _, _) in enumerate(coco_lib.COCO_PANOPTIC_CATEGORIES)}
    assert info["category_ids"][index[SKY_ID]] == SKY_ID and not info["is_thing"][index[SKY_ID]]

    got = _by_image_id(list(dp.create_eval_iterator(cfg, global_batch_size=2, **ONE)))
    assert sorted(got) == [9, 25]
    for image_id, segments in PAN_SEGMENTS.items():
        ex, (h, w) = got[image_id], PAN_SIZES[image_id]
        np.testing.assert_allclose(_unnormalize(ex["image"][:h, :w]), coco_panoptic["images"][image_id], atol=6)
        n = len(segments)
        assert ex["instance_valid"].sum() == n
        assert ex["classes"][:n].tolist() == [index[cid] for _, cid, _, _, _ in segments]
        assert ex["is_thing"][:n].tolist() == [cid < 92 for _, cid, _, _, _ in segments]
        assert ex["is_crowd"][:n].tolist() == [bool(c) for _, _, c, _, _ in segments]
        ids, _ = _panoptic_png(image_id)
        expected_pan = np.zeros((64, 64), np.int32)
        expected_sem = np.full((64, 64), 255, np.int32)
        for slot, (sid, cid, _, (r0, r1), (c0, c1)) in enumerate(segments):
            expected_pan[:h, :w][ids == sid] = slot + 1
            expected_sem[:h, :w][ids == sid] = index[cid]
            np.testing.assert_allclose(ex["boxes"][slot], [r0, c0, r1, c1], atol=1e-4)
            np.testing.assert_array_equal(ex["instance_masks"][slot], expected_pan == slot + 1)
        np.testing.assert_array_equal(ex["panoptic_ids"], expected_pan)
        np.testing.assert_array_equal(ex["semantic"], expected_sem)

    things = dict(cfg, instance_targets="things")
    ex = _by_image_id(list(dp.create_eval_iterator(things, global_batch_size=2, **ONE)))[9]
    assert ex["instance_valid"].sum() == 2 and ex["is_thing"][:2].all()
    # Stuff pixels keep their semantic class but have no slot in panoptic_ids.
    assert set(np.unique(ex["panoptic_ids"])) == {0, 1, 2}

    it = dp.create_train_iterator(dict(cfg, train_crop_size=64), seed=1, global_batch_size=2, **ONE)
    batch = next(it)
    assert np.all(batch["image_id"] == 30) and batch["instance_valid"].sum() == 0
    assert np.all(batch["semantic"] == 255)  # The train image is all void.


# ============================================================== ADE20K (own builder, zip layout)

ADE_LABELS = {  # (split, number) -> label blocks (value, rows, cols); background value 0 = other
    ("training", 1): [(1, (0, 16), (0, 48)), (3, (16, 32), (8, 24)), (150, (16, 32), (32, 48))],
    ("training", 2): [(13, (0, 48), (0, 16))],
    ("validation", 1): [(2, (0, 8), (0, 32)), (150, (8, 48), (16, 32))],
}
ADE_SIZES = {("training", 1): (32, 48), ("training", 2): (48, 32), ("validation", 1): (48, 32)}


@pytest.fixture(scope="module")
def ade20k(tmp_path_factory) -> dict:
    manual = str(tmp_path_factory.mktemp("ade_manual"))
    labels, images = {}, {}
    with zipfile.ZipFile(f"{manual}/ADEChallengeData2016.zip", "w") as zf:
        for (split, k), blocks in ADE_LABELS.items():
            h, w = ADE_SIZES[(split, k)]
            label = np.zeros((h, w), np.uint8)
            for value, (r0, r1), (c0, c1) in blocks:
                label[r0:r1, c0:c1] = value
            stem = f'ADE_{"train" if split == "training" else "val"}_{k:08d}'
            images[(split, k)] = _paint(h, w, [(0, 8, 0, 8, RED)])
            labels[(split, k)] = label
            zf.writestr(f"ADEChallengeData2016/images/{split}/{stem}.jpg", _jpeg(images[(split, k)]))
            zf.writestr(f"ADEChallengeData2016/annotations/{split}/{stem}.png", _png(label))
    return {"manual": manual, "data_dir": str(tmp_path_factory.mktemp("ade_data")), "labels": labels, "images": images}


def test_ade20k_builder_reduce_zero_label(ade20k):
    cfg = dict(
        dataset="ade20k",
        data_dir=ade20k["data_dir"],
        manual_dir=ade20k["manual"],
        eval_short_side=32,
        eval_max_size=64,
        eval_pad_size=64,
        mask_stride=1,
        max_instances=4,
        train_crop_size=32,
    )
    info = dp.get_dataset_info(cfg)
    assert (info["num_classes"], info["num_train"], info["num_eval"]) == (150, 2, 1)
    assert info["class_names"][0] == "wall" and info["class_names"][149] == "flag"

    for split, cfg_split in (("training", "train"), ("validation", "validation")):
        got = _by_image_id(list(dp.create_eval_iterator(dict(cfg, eval_split=cfg_split), global_batch_size=2, **ONE)))
        for (s, k), label in ade20k["labels"].items():
            if s != split:
                continue
            ex, (h, w) = got[k], label.shape
            expected = np.full((64, 64), 255, np.int32)
            expected[:h, :w] = np.where(label == 0, 255, label.astype(np.int32) - 1)
            np.testing.assert_array_equal(ex["semantic"], expected)
            np.testing.assert_allclose(_unnormalize(ex["image"][:h, :w]), ade20k["images"][(s, k)], atol=6)
            classes = sorted({v - 1 for v, _, _ in ADE_LABELS[(s, k)]})
            n = len(classes)
            assert ex["classes"][:n].tolist() == classes and ex["instance_valid"].sum() == n
            for slot, c in enumerate(classes):
                np.testing.assert_array_equal(ex["instance_masks"][slot], expected == c)
                rows, cols = np.nonzero(expected == c)
                np.testing.assert_array_equal(
                    ex["boxes"][slot], [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
                )
                assert np.all(ex["panoptic_ids"][expected == c] == slot + 1)
    assert ade20k_lib.reduce_zero_label(np.array([0, 1, 150, 151, 255], np.uint8)).tolist() == [255, 0, 149, 255, 255]

    it = dp.create_train_iterator(cfg, seed=0, global_batch_size=2, **ONE)
    batch = next(it)
    assert batch["semantic"].shape == (2, 32, 32)
    labelled = batch["semantic"][batch["image_mask"]]
    assert set(np.unique(labelled)) <= {255, 0, 2, 149, 12}


# ============================================================== shapes (procedural) + COCO export


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    shapes_lib.prepare_shapes(data_dir, "small")
    return data_dir


def _shapes_cfg(data_dir: str, **overrides) -> dict:
    cfg = dict(
        dataset="shapes",
        data_dir=data_dir,
        shapes_variant="small",
        train_crop_size=64,
        eval_short_side=64,
        eval_max_size=64,
        eval_pad_size=64,
        max_instances=8,
    )
    cfg.update(overrides)
    return cfg


def test_shapes_generation_deterministic_and_consistent():
    a = shapes_lib.generate(64, 4, "train", 3)
    b = shapes_lib.generate(64, 4, "train", 3)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["ids"], b["ids"])
    assert not np.array_equal(a["image"], shapes_lib.generate(64, 4, "validation", 3)["image"])
    # Every pixel belongs to exactly one listed segment; areas and boxes match the id map.
    assert set(np.unique(a["ids"])) == {s["id"] for s in a["segments"]}
    for s in a["segments"]:
        rows, cols = np.nonzero(a["ids"] == s["id"])
        assert s["area"] == len(rows)
        np.testing.assert_array_equal(s["bbox"], [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1])
    assert any(s["is_thing"] for s in a["segments"]) and any(not s["is_thing"] for s in a["segments"])


def test_shapes_pipeline_matches_coco_export(shapes_dir):
    cfg = _shapes_cfg(shapes_dir)
    info = dp.get_dataset_info(cfg)
    assert (info["num_classes"], info["num_thing_classes"], info["num_train"], info["num_eval"]) == (6, 3, 48, 16)
    got = _by_image_id(list(dp.create_eval_iterator(cfg, global_batch_size=5, **ONE)))
    assert sorted(got) == list(range(1, 17))

    with open(info["instances_json"]) as f:
        instances = json.load(f)
    with open(info["panoptic_json"]) as f:
        panoptic = json.load(f)
    assert [c["id"] for c in panoptic["categories"]] == [1, 2, 3, 4, 5, 6]
    assert len(instances["images"]) == 16
    for ann in panoptic["annotations"]:
        ex = got[ann["image_id"]]
        ids = coco_format.rgb_to_id(np.asarray(Image.open(os.path.join(info["panoptic_png_dir"], ann["file_name"]))))
        image = np.asarray(
            Image.open(
                os.path.join(os.path.dirname(os.path.dirname(info["instances_json"])), "validation", ann["file_name"])
            )
        )
        np.testing.assert_array_equal(_unnormalize(ex["image"]), image)  # PNG: exact.
        segments = ann["segments_info"]
        assert ex["instance_valid"].sum() == len(segments)
        for slot, seg in enumerate(segments):
            assert ex["classes"][slot] == seg["category_id"] - 1
            np.testing.assert_array_equal(ex["instance_masks"][slot], ids == seg["id"])
            np.testing.assert_array_equal(ex["panoptic_ids"] == slot + 1, ids == seg["id"])
            x, y, w, h = seg["bbox"]
            np.testing.assert_array_equal(ex["boxes"][slot], [y, x, y + h, x + w])
            assert np.all(ex["semantic"][ids == seg["id"]] == seg["category_id"] - 1)
        thing_anns = [a for a in instances["annotations"] if a["image_id"] == ann["image_id"]]
        assert len(thing_anns) == sum(s["category_id"] <= 3 for s in segments)
        for a in thing_anns:
            mask = coco_format.rle_decode(a["segmentation"])
            assert mask.sum() == a["area"]
            slot = [s["id"] for s in segments].index(a["id"] % 1000)
            np.testing.assert_array_equal(mask, ex["instance_masks"][slot])


def test_shapes_train_determinism_resume_and_things(shapes_dir):
    cfg = _shapes_cfg(shapes_dir, train_crop_size=48, mask_stride=2, instance_targets="things")
    kwargs = dict(global_batch_size=4, **ONE)
    a = [next(it) for it in [dp.create_train_iterator(cfg, seed=3, **kwargs)] for _ in range(3)]
    b_it = dp.create_train_iterator(cfg, seed=3, **kwargs)
    b = [next(b_it) for _ in range(3)]
    c = next(dp.create_train_iterator(cfg, seed=4, **kwargs))
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["image"], c["image"])
    assert a[0]["image"].shape == (4, 48, 48, 3) and a[0]["instance_masks"].shape == (4, 8, 24, 24)
    assert np.all(a[0]["is_thing"] == a[0]["instance_valid"])

    it = dp.create_train_iterator(cfg, seed=5, **kwargs)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = dp.create_train_iterator(cfg, seed=5, **kwargs)
    resumed.set_state(state)
    for x, y in zip(expected, [next(resumed) for _ in range(2)]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_shapes_eval_sharding_and_outputs(shapes_dir):
    cfg = _shapes_cfg(shapes_dir, outputs=("image", "panoptic_ids"))
    per_process = [
        list(dp.create_eval_iterator(cfg, global_batch_size=6, process_index=p, process_count=2)) for p in (0, 1)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(8 / 3)
    assert set(per_process[0][0]) == {"image", "panoptic_ids", "mask"}
    assert sum(b["mask"].sum() for batches in per_process for b in batches) == 16
    full = _shapes_cfg(shapes_dir)
    ids = [
        int(i)
        for p in (0, 1)
        for b in dp.create_eval_iterator(full, global_batch_size=6, process_index=p, process_count=2)
        for i, m in zip(b["image_id"], b["mask"])
        if m
    ]
    assert sorted(ids) == list(range(1, 17))


def test_shapes_eval_pads_last_batch_with_empty_rows(shapes_dir):
    cfg = _shapes_cfg(shapes_dir)
    batches = list(dp.create_eval_iterator(cfg, global_batch_size=5, **ONE))
    assert len(batches) == 4  # ceil(16 / 5): the last batch has 1 real row and 4 padding rows
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert rows["mask"].dtype == np.float32 and set(np.unique(rows["mask"])) == {0.0, 1.0}
    real = rows["mask"] == 1
    assert real.sum() == dp.get_dataset_info(cfg)["num_eval"] == 16 and real[:16].all() and not real[16:].any()
    empty = DT.empty_output(dp.eval_transform(cfg).spec)
    assert set(rows) == set(empty) | {"mask"}
    for key, value in empty.items():
        assert rows[key].dtype == value.dtype, key
        np.testing.assert_array_equal(rows[key][~real], np.broadcast_to(value, (4, *np.shape(value))), err_msg=key)
    assert not rows["image"][~real].any() and rows["image_mask"][real].any()


def test_shapes_worker_processes_match_threads(shapes_dir):
    cfg = _shapes_cfg(shapes_dir)
    threads = list(dp.create_eval_iterator(cfg, global_batch_size=6, **ONE))
    workers = list(dp.create_eval_iterator(dict(cfg, num_workers=1), global_batch_size=6, **ONE))
    assert len(workers) == len(threads) == 3
    for x, y in zip(threads, workers):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ============================================================== transforms with values


def _dense_example(image: np.ndarray, boxes, classes, masks=None, segments=None, semantic=None) -> dict:
    n = len(classes)
    return {
        "image": image,
        "image_id": 7,
        "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
        "classes": np.asarray(classes, np.int32),
        "is_crowd": np.zeros(n, bool),
        "is_thing": np.ones(n, bool),
        "masks": masks,
        "segments": segments,
        "semantic": semantic,
    }


def test_placement_box_arithmetic():
    # 100x200 image at scale 0.5 -> 50x100; 40x40 window at top 5, left 30.
    p = DT.Placement.create(100, 200, 0.5, 40, 40, top_frac=5 / 11, left_frac=30 / 61)
    assert (p.top, p.left, p.crop_h, p.crop_w, p.scale_y, p.scale_x) == (5, 30, 40, 40, 0.5, 0.5)
    boxes = np.array(
        [
            [10, 70, 30, 110],  # -> [0, 5, 10, 25]: y 5..15 - 5, x 35..55 - 30
            [0, 0, 10, 40],  # above and left of the window: clipped to nothing
            [60, 120, 200, 300],
        ]
    )  # -> [25, 30, 40, 40] clipped at the window's edge
    np.testing.assert_allclose(p.map_boxes(boxes), [[0, 5, 10, 25], [0, 0, 0, 0], [25, 30, 40, 40]])
    flipped = dataclasses.replace(p, flip=True)
    np.testing.assert_allclose(flipped.map_boxes(boxes[:1]), [[0, 15, 10, 35]])  # x -> 40 - x
    # Rounding like detectron2: 33 * 0.5 = 16.5 -> 17 rows, so scale_y = 17 / 33.
    q = DT.Placement.create(33, 40, 0.5, 64, 64)
    assert (q.crop_h, q.crop_w, q.scale_y) == (17, 20, 17 / 33)


def test_render_scale_crop_aligns_image_masks_and_boxes():
    # A white 20x30 rectangle (rows 20..39, cols 40..69) on black, as image, mask, segment and box.
    image = np.zeros((80, 120, 3), np.uint8)
    image[20:40, 40:70] = 255
    mask = np.zeros((1, 80, 120), np.uint8)
    mask[0, 20:40, 40:70] = 1
    spec = DT.RenderSpec(out_h=64, out_w=64, max_instances=3, mask_stride=1)
    norm = T.Normalize()
    # Scale 2 -> 160x240; window at top 30, left 70 covers rows 15..47, cols 35..67 of the source.
    p = DT.Placement.create(80, 120, 2.0, 64, 64, top_frac=30 / 97, left_frac=70 / 177)
    assert (p.top, p.left) == (30, 70)
    for flip in (False, True):
        p = dataclasses.replace(p, flip=flip)
        for example in (
            _dense_example(image, [[20, 40, 40, 70]], [5], masks=mask),
            _dense_example(
                image,
                [[20, 40, 40, 70]],
                [5],
                segments=mask[0].astype(np.int32),
                semantic=np.where(mask[0] == 1, 5, 255).astype(np.uint8),
            ),
        ):
            out = DT.render(example, p, spec, norm)
            box = [10, 10, 50, 64]  # (20 * 2 - 30, 40 * 2 - 70, 40 * 2 - 30, 70 * 2 - 70 clipped to 64)
            if flip:
                box = [box[0], 64 - box[3], box[2], 64 - box[1]]
            np.testing.assert_allclose(out["boxes"][0], box)
            expected = np.zeros((64, 64), np.uint8)
            expected[box[0] : box[2], box[1] : box[3]] = 1
            np.testing.assert_array_equal(out["instance_masks"][0], expected)
            white = _unnormalize(out["image"]).mean(-1) > 127
            np.testing.assert_array_equal(white, expected.astype(bool))
            assert out["instance_valid"].tolist() == [True, False, False] and out["classes"][0] == 5
            if example["segments"] is not None:
                np.testing.assert_array_equal(out["panoptic_ids"], expected)
                np.testing.assert_array_equal(out["semantic"] == 5, expected.astype(bool))


def test_render_identity_is_exact_and_stride_samples_cell_centres():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    segments = rng.integers(0, 4, (24, 32)).astype(np.int32)
    boxes = DT.segment_boxes(segments, 3)
    example = _dense_example(image, boxes, [0, 1, 2], segments=segments)
    p = DT.Placement.create(24, 32, 1.0, 32, 32)
    full = DT.render(example, p, DT.RenderSpec(32, 32, 4, mask_stride=1), T.Normalize())
    np.testing.assert_array_equal(_unnormalize(full["image"][:24]), image)
    np.testing.assert_array_equal(full["panoptic_ids"][:24], segments)
    low = DT.render(example, p, DT.RenderSpec(32, 32, 4, mask_stride=4), T.Normalize())
    assert low["instance_masks"].shape == (4, 8, 8)
    # Cell k of stride 4 samples full-resolution pixel 4k + 2 (its centre); rows past 24 are padding.
    np.testing.assert_array_equal(low["instance_masks"][:3, :6], full["instance_masks"][:3, 2:24:4, 2::4])
    assert not low["instance_masks"][:, 6:].any()


def test_render_drops_cropped_out_and_truncates_to_max_instances():
    image = np.zeros((40, 40, 3), np.uint8)
    masks = np.zeros((5, 40, 40), np.uint8)
    boxes = []
    for k in range(5):
        masks[k, 2 + 7 * k : 6 + 7 * k, 2:6] = 1
        boxes.append([2 + 7 * k, 2, 6 + 7 * k, 6])
    example = _dense_example(image, boxes, [0, 1, 2, 3, 4], masks=masks)
    # A 20x40 window at the top keeps instances 0, 1 (rows 2..5, 9..12) and part of 2 (rows 16..19).
    p = DT.Placement.create(40, 40, 1.0, 20, 40)
    out = DT.render(example, p, DT.RenderSpec(20, 40, 8), T.Normalize())
    assert out["instance_valid"].sum() == 3 and out["classes"][:4].tolist() == [0, 1, 2, -1]
    out = DT.render(example, p, DT.RenderSpec(20, 40, 2), T.Normalize())
    assert out["instance_valid"].tolist() == [True, True] and out["classes"].tolist() == [0, 1]
    # A box that overlaps the window while its mask does not is dropped too.
    masks2 = masks.copy()
    masks2[2] = 0
    masks2[2, 30:34, 2:6] = 1
    out = DT.render(
        _dense_example(image, boxes, [0, 1, 2, 3, 4], masks=masks2), p, DT.RenderSpec(20, 40, 8), T.Normalize()
    )
    assert out["instance_valid"].sum() == 2


def test_train_transform_jitter_range_and_alignment():
    image = np.zeros((60, 90, 3), np.uint8)
    image[10:40, 20:50] = 255
    segments = np.zeros((60, 90), np.int32)
    segments[10:40, 20:50] = 1
    example = _dense_example(image, [[10, 20, 40, 50]], [1], segments=segments)
    t = DT.DenseTrainTransform(DT.RenderSpec(64, 64, 2), scale_range=(0.1, 2.0), scale_mode="fit")
    rng = np.random.default_rng(0)
    scales = []
    for _ in range(40):
        p = t.placement(example, rng)
        scales.append(p.scale_y * 60 / (64 / 90 * 60))  # Jitter factor relative to the fit scale.
        out = DT.render(example, p, t.spec, t.normalize)
        white = _unnormalize(out["image"]).mean(-1) > 127
        inside = out["panoptic_ids"] == 1
        # Masks follow the image: disagreement only on the bilinear boundary.
        assert np.count_nonzero(white != inside) <= 2 * (white.shape[0] + white.shape[1])
        if out["instance_valid"][0]:
            y0, x0, y1, x1 = out["boxes"][0]
            rows, cols = np.nonzero(inside)
            assert abs(rows.min() - y0) <= 1 and abs(rows.max() + 1 - y1) <= 1
            assert abs(cols.min() - x0) <= 1 and abs(cols.max() + 1 - x1) <= 1
    assert 0.1 <= min(scales) < 0.5 and 1.5 < max(scales) <= 2.05
    a = t.random_map(example, np.random.default_rng(9))
    b = t.random_map(example, np.random.default_rng(9))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_eval_transform_shorter_side_and_padding_mask():
    t = DT.DenseEvalTransform(DT.RenderSpec(96, 96, 4, mask_stride=4), short_side=40, max_size=80)
    example = _dense_example(
        np.zeros((30, 50, 3), np.uint8), [[0, 0, 30, 50]], [0], masks=np.ones((1, 30, 50), np.uint8)
    )
    out = t.map(example)  # 40 / 30 -> 40 x 67 (67 <= 80).
    assert out["image_mask"].sum() == 40 * 67 and out["image_mask"][:40, :67].all()
    np.testing.assert_allclose(out["boxes"][0], [0, 0, 40, 67])
    np.testing.assert_allclose(out["scale"], [40 / 30, 67 / 50])
    assert out["instance_masks"][0].sum() == 10 * 17  # ceil-ish cells whose centre is inside.
    wide = _dense_example(np.zeros((20, 100, 3), np.uint8), [[0, 0, 20, 100]], [0])
    assert t.map(wide)["image_mask"].sum() == 16 * 80  # Longer side capped at 80.
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: (v.shape, v.dtype) for k, v in DT.empty_output(t.spec).items()
    }


def test_cat_max_ratio_avoids_single_class_crops():
    semantic = np.zeros((64, 64), np.uint8)
    semantic[:, 56:] = 1  # Class 1 only in the right eighth.
    example = _dense_example(np.zeros((64, 64, 3), np.uint8), np.zeros((0, 4)), [], semantic=semantic)

    def mixed_crops(ratio: float) -> int:
        t = DT.DenseTrainTransform(
            DT.RenderSpec(16, 16, 1), scale_range=(1.0, 1.0), scale_mode="shorter", hflip=False, cat_max_ratio=ratio
        )
        t.base_scale = lambda h, w: 1.0  # Keep the 64x64 source; crop 16x16 windows.
        rng = np.random.default_rng(0)
        mixed = 0
        for _ in range(100):
            crop = DT.render(example, t.placement(example, rng), t.spec, t.normalize)["semantic"]
            counts = np.bincount(crop.ravel(), minlength=2)[:2]
            mixed += counts.max() / counts.sum() < 0.75
        return mixed

    # 4 of the 49 window offsets qualify: ~8% unconstrained, 1 - 0.92^10 = ~57% with 10 tries.
    assert mixed_crops(1.0) <= 20 and mixed_crops(0.75) >= 40


# pycocotools.mask.encode of the disc in the test below (runs > 31 and negative deltas).
PYCOCOTOOLS_DISC_RLE = "]:5P16K4M2N2N2O0O2O000O2O00000001N10001N101N2N2N3L5Jnd0"


def test_segment_boxes_and_masks_codecs():
    segments = np.zeros((10, 12), np.int32)
    segments[2:5, 3:9] = 1
    segments[7, 0] = 3
    np.testing.assert_array_equal(DT.segment_boxes(segments, 3), [[2, 3, 5, 9], [0, 0, 0, 0], [7, 0, 8, 1]])
    # Polygons: pixel-centre rule, against an independent half-plane fill.
    np.testing.assert_array_equal(coco_format.polygon_mask([1, 1, 5, 1, 5, 4, 1, 4], 7, 8).sum(), 12)
    for poly in ([0, 0, 8.2, 0, 0, 8.2], [2.3, 1.1, 9.7, 4.2, 5.5, 9.9, 0.4, 6.6], [3.1, 0, 10, 5.3, 3.1, 10]):
        np.testing.assert_array_equal(coco_format.polygon_mask(poly, 12, 12), _inside_polygon(poly, 12, 12))
    # RLE: a hand-computed compressed string and one made by pycocotools' encode, then round trips.
    np.testing.assert_array_equal(coco_format.rle_decode({"size": [2, 2], "counts": "121"}), [[0, 1], [1, 0]])
    assert coco_format.rle_encode(np.array([[0, 1], [1, 0]]))["counts"] == "121"
    y, x = np.mgrid[:40, :50]
    disc = (((x - 20) ** 2 + (y - 15) ** 2) < 150).astype(np.uint8)
    assert coco_format.rle_encode(disc)["counts"] == PYCOCOTOOLS_DISC_RLE
    np.testing.assert_array_equal(coco_format.rle_decode({"size": [40, 50], "counts": PYCOCOTOOLS_DISC_RLE}), disc)
    rng = np.random.default_rng(1)
    for shape, density in (((37, 53), 0.5), ((64, 80), 0.02), ((5, 7), 1.0)):
        mask = (rng.random(shape) < density).astype(np.uint8)
        mask[10:30, 5:40] = 1 if shape[0] > 30 else mask[10:30, 5:40]
        rle = coco_format.rle_encode(mask)
        np.testing.assert_array_equal(coco_format.rle_decode(rle), mask)
        np.testing.assert_array_equal(coco_format.rle_decode(_uncompressed_rle(mask)), mask)
        assert coco_format.annotation_mask(rle, *shape).sum() == mask.sum()
