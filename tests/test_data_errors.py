"""Dense data that real datasets contain and that used to go wrong: CMYK JPEGs (decoded as if RGBA) in all
three dense builders, a COCO panoptic json that lists only the categories it uses, an ADE20K label PNG of
another size than its image. Each builder runs on a few files written here in the original layout.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from clusterformer_jax.data import coco as coco_lib
from clusterformer_jax.data import coco_format
from clusterformer_jax.data import dense_pipeline as dp
from clusterformer_jax.data import transforms as T

pytestmark = pytest.mark.xdist_group("dense_data")

ONE = dict(process_index=0, process_count=1)
MEAN = np.asarray(T.IMAGENET_MEAN, np.float32)
STD = np.asarray(T.IMAGENET_STD, np.float32)
# Saturated colours: reading C, M, Y as R, G, B (the old bug) turns each into its complement.
TOP, BOTTOM = (200, 30, 40), (20, 180, 60)


def _two_colour(height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), np.uint8)
    image[: height // 2] = TOP
    image[height // 2 :] = BOTTOM
    return image


def _cmyk_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "CMYK"
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _assert_rgb(batches: list[dict[str, np.ndarray]], sizes: dict[int, tuple[int, int]]) -> None:
    """Every listed image comes back with the colours it was painted with (JPEG tolerance)."""
    seen = set()
    for batch in batches:
        for i in np.flatnonzero(batch["mask"]):
            image_id = int(batch["image_id"][i])
            h, w = sizes[image_id]
            got = np.round(batch["image"][i, :h, :w] * STD + MEAN)
            np.testing.assert_allclose(got, _two_colour(h, w), atol=8)
            seen.add(image_id)
    assert seen == set(sizes)


def test_to_rgb_converts_cmyk_bytes_with_pil():
    rgb = _two_colour(16, 8)
    np.testing.assert_allclose(T.DecodeImage.to_rgb(_cmyk_jpeg(rgb)).astype(int), rgb, atol=8)


def _eval_cfg(dataset: str, data_dir: str, manual: str, **overrides) -> dict:
    cfg = dict(
        dataset=dataset,
        data_dir=data_dir,
        manual_dir=manual,
        eval_short_side=32,
        eval_max_size=64,
        eval_pad_size=64,
        train_crop_size=32,
        max_instances=4,
        mask_stride=1,
    )
    cfg.update(overrides)
    return cfg


def test_coco_instances_cmyk_jpeg_is_rgb(tmp_path):
    manual, sizes = str(tmp_path / "manual"), {5: (32, 48)}
    _write(f"{manual}/val2017/{5:012d}.jpg", _cmyk_jpeg(_two_colour(*sizes[5])))
    data = {
        "images": [{"id": 5, "file_name": f"{5:012d}.jpg", "height": 32, "width": 48}],
        "annotations": [
            dict(
                id=1,
                image_id=5,
                category_id=1,
                iscrowd=0,
                area=64.0,
                bbox=[0, 0, 8, 8],
                segmentation=[[0, 0, 8, 0, 8, 8, 0, 8]],
            )
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    _write(f"{manual}/annotations/instances_val2017.json", json.dumps(data).encode())
    cfg = _eval_cfg("coco_instances", str(tmp_path / "data"), manual, train_split="validation")
    _assert_rgb(list(dp.create_eval_iterator(cfg, global_batch_size=1, **ONE)), sizes)


PAN_SIZES = {"train": {7: (32, 32)}, "val": {8: (32, 48), 9: (48, 32)}}
PAN_SEGMENTS = {7: [(1, 184)], 8: [(3, 1), (4, 187)], 9: [(5, 18)]}  # (segment id, COCO category id)


def test_coco_panoptic_subset_categories_and_cmyk_jpeg(tmp_path):
    """The jsons list only the categories their segments use, out of id order: the builder still has the
    133 classes in COCO order, every segment keeps its class, and the CMYK JPEGs decode to RGB."""
    manual = str(tmp_path / "manual")
    for split, sizes in PAN_SIZES.items():
        anns, used = [], set()
        for image_id, (h, w) in sizes.items():
            _write(f"{manual}/{split}2017/{image_id:012d}.jpg", _cmyk_jpeg(_two_colour(h, w)))
            ids = np.zeros((h, w), np.int64)
            segments = PAN_SEGMENTS[image_id]
            for k, (sid, _) in enumerate(segments):  # horizontal bands
                ids[k * h // len(segments) : (k + 1) * h // len(segments)] = sid
            _write(f"{manual}/annotations/panoptic_{split}2017/{image_id:012d}.png", _png(coco_format.id_to_rgb(ids)))
            info = [
                dict(id=sid, category_id=cid, iscrowd=0, bbox=[0, 0, w, h], area=int((ids == sid).sum()))
                for sid, cid in segments
            ]
            anns.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": info})
            used.update(cid for _, cid in segments)
        names = {cid: (name, thing) for cid, name, thing in coco_lib.COCO_PANOPTIC_CATEGORIES}
        categories = [
            {"id": cid, "name": names[cid][0], "isthing": int(names[cid][1]), "supercategory": "x"}
            for cid in sorted(used, reverse=True)
        ]
        images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()]
        data = {"images": images, "annotations": anns, "categories": categories}
        _write(f"{manual}/annotations/panoptic_{split}2017.json", json.dumps(data).encode())

    cfg = _eval_cfg("coco_panoptic", str(tmp_path / "data"), manual)
    info = dp.get_dataset_info(cfg)
    assert (info["num_classes"], info["num_train"], info["num_eval"]) == (133, 1, 2)
    assert list(info["category_ids"]) == [cid for cid, _, _ in coco_lib.COCO_PANOPTIC_CATEGORIES]
    batches = list(dp.create_eval_iterator(cfg, global_batch_size=2, **ONE))
    _assert_rgb(batches, PAN_SIZES["val"])
    index = {cid: k for k, cid in enumerate(info["category_ids"])}
    for batch in batches:
        for i in np.flatnonzero(batch["mask"]):
            segments = PAN_SEGMENTS[int(batch["image_id"][i])]
            n = len(segments)
            assert batch["classes"][i][:n].tolist() == [index[cid] for _, cid in segments]


def test_canonical_panoptic_categories_rejects_unknown_with_the_file():
    full = coco_lib.canonical_panoptic_categories([{"id": 184, "name": "tree-merged"}], "a.json")
    assert [c["id"] for c in full] == [cid for cid, _, _ in coco_lib.COCO_PANOPTIC_CATEGORIES]
    with pytest.raises(ValueError) as err:
        coco_lib.canonical_panoptic_categories([{"id": 1, "name": "cat"}], "x/panoptic_val2017.json")
    assert "x/panoptic_val2017.json" in str(err.value) and "'cat'" in str(err.value) and "\n" not in str(err.value)


def test_ade20k_cmyk_jpeg_and_mismatched_label_named_at_preparation(tmp_path, caplog):
    """One training image has a label PNG of another size: preparation skips it, names its file and counts
    it; the others (CMYK JPEGs) decode to their RGB colours."""
    manual = str(tmp_path / "manual")
    sizes = {("training", 1): (32, 48), ("training", 2): (48, 32), ("validation", 3): (32, 32)}
    bad = "ADE_train_00000002"
    os.makedirs(manual)
    with zipfile.ZipFile(f"{manual}/ADEChallengeData2016.zip", "w") as zf:
        for (split, k), (h, w) in sizes.items():
            stem = f'ADE_{"train" if split == "training" else "val"}_{k:08d}'
            label_size = (h + 8, w) if stem == bad else (h, w)
            zf.writestr(f"ADEChallengeData2016/images/{split}/{stem}.jpg", _cmyk_jpeg(_two_colour(h, w)))
            zf.writestr(f"ADEChallengeData2016/annotations/{split}/{stem}.png", _png(np.ones(label_size, np.uint8)))
    cfg = _eval_cfg("ade20k", str(tmp_path / "data"), manual)
    with caplog.at_level(logging.WARNING):
        info = dp.get_dataset_info(cfg)
    assert (info["num_train"], info["num_eval"]) == (1, 1)
    named = [r.getMessage() for r in caplog.records if f"{bad}.png" in r.getMessage()]
    assert len(named) == 1 and "56x32" in named[0] and "48x32" in named[0] and f"{bad}.jpg" in named[0]
    assert any("1 images" in r.getMessage() and "another size" in r.getMessage() for r in caplog.records)
    for split, sizes_by_id in (("train", {1: (32, 48)}), ("validation", {3: (32, 32)})):
        batches = list(dp.create_eval_iterator(dict(cfg, eval_split=split), global_batch_size=1, **ONE))
        _assert_rgb(batches, sizes_by_id)
