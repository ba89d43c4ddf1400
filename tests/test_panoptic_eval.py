"""Panoptic quality (own numpy vs hotcoco / panopticapi-lite), the PanopticEvaluator on the shapes COCO export,
and the fixed-shape panoptic post-processing, on hand-made inputs with hand-computed values."""

import importlib.util
import json
import os

import numpy as np
import pytest

from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.data.coco_format import id_to_rgb, png_bytes
from clusterformer_jax.evaluation import panoptic as P

PACKAGES = [b for b in ("hotcoco", "panopticapi") if importlib.util.find_spec(b) is not None]
CATS = [
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "s", "isthing": 0},
    {"id": 4, "name": "t", "isthing": 0},
]
INDEX = {1: 0, 2: 1, 3: 2, 4: 3}


def _write(folder, name, images, anns, with_images=True):
    """COCO panoptic json + PNG folder: images = {image_id: id map}, anns = {image_id: segments_info}."""
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    entries = []
    for image_id, ids in images.items():
        with open(os.path.join(folder, name, f"{image_id:06d}.png"), "wb") as f:
            f.write(png_bytes(id_to_rgb(ids)))
        entries.append({"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": anns[image_id]})
    doc = {"annotations": entries, "categories": CATS}
    if with_images:
        doc["images"] = [
            {"id": i, "file_name": f"{i:06d}.png", "height": m.shape[0], "width": m.shape[1]} for i, m in images.items()
        ]
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(doc, f)
    return os.path.join(folder, f"{name}.json"), os.path.join(folder, name)


def _segs(ids, table, crowd=()):
    return [
        {"id": i, "category_id": c, "iscrowd": int(i in crowd), "area": int(np.count_nonzero(ids == i))}
        for i, c in table.items()
    ]


def _hand_fixture():
    """8 x 8: stuff 10 (cat 3) on top, 11 (cat 4) below, things 1 (cat 1) and 2 (cat 2), one void pixel.

    The prediction misses thing 2 (its pixels go to stuff 11) and labels the void pixel as stuff 10.
    Hand values: cat 1 IoU 1; cat 2 FN; cat 3: GT 27 px, pred 28 = 27 + the GT-void pixel -> IoU 27 / 27 = 1;
    cat 4: GT 28, pred 32, inter 28 -> IoU 0.875. Things PQ (1 + 0) / 2, RQ 1 / 2; stuff PQ (1 + 0.875) / 2, RQ 1.
    """
    gt = np.zeros((8, 8), np.int32)
    gt[:4], gt[4:] = 10, 11
    gt[1:3, 1:3], gt[5:7, 5:7], gt[0, 7] = 1, 2, 0
    pred = gt.copy()
    pred[pred == 2], pred[0, 7] = 11, 10
    table = {1: 1, 2: 2, 10: 3, 11: 4}
    return gt, _segs(gt, table), pred, _segs(pred, {1: 1, 10: 3, 11: 4})


HAND = {"PQ": 0.71875, "SQ": 0.71875, "RQ": 0.75, "PQ_th": 0.5, "RQ_th": 0.5, "PQ_st": 0.9375, "RQ_st": 1.0}


def _assert_summary(flat, expected, prefix=""):
    for key, value in expected.items():
        assert flat[prefix + key] == pytest.approx(value, abs=1e-9), key


def test_pq_hand_fixture_own_and_packages_agree(tmp_path):
    gt, gt_segs, pred, pred_segs = _hand_fixture()
    stats = P.pq_image(gt, gt_segs, pred, pred_segs, INDEX)
    np.testing.assert_array_equal(stats[:3], [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])  # TP, FP, FN
    own = P.flatten_pq(P.pq_from_stats(stats, [1, 2, 3, 4], [True, True, False, False]))
    _assert_summary(own, HAND)
    gt_json, gt_dir = _write(str(tmp_path), "gt", {1: gt}, {1: gt_segs})
    pred_json, pred_dir = _write(str(tmp_path), "pred", {1: pred}, {1: pred_segs}, with_images=False)
    for backend in PACKAGES:
        _assert_summary(P.flatten_pq(P.package_pq(gt_json, gt_dir, pred_json, pred_dir, backend)), HAND)


def test_pq_crowd_and_void_rules(tmp_path):
    # GT: cat-1 crowd region (id 5) in rows 0-1, void row 2, a cat-1 thing (id 1) of 8 px in rows 4-5 cols 0-3,
    # stuff 10 (cat 3) elsewhere. Predictions: id 7 (cat 1) covers the crowd region -> ignored, not FP;
    # id 8 (cat 2) lies 6 of its 8 px on void -> ignored; id 9 (cat 2) 2 of 8 px on void -> FP (not > 1/2);
    # id 1 (cat 1) = the thing plus 2 px of GT stuff -> union 10 + 8 - 8 = 10, IoU 0.8; stuff 10 matches.
    gt = np.full((8, 8), 10, np.int32)
    gt[0:2], gt[2], gt[4:6, 0:4] = 5, 0, 1
    pred = np.full((8, 8), 10, np.int32)
    pred[0:2], pred[4:6, 0:4] = 7, 1
    pred[2, 0:6], pred[3, 0:2] = 8, 8
    pred[2:4, 6:8], pred[6:8, 6:8] = 9, 9
    pred[4, 4:6] = 1
    gt_segs = _segs(gt, {5: 1, 1: 1, 10: 3}, crowd=(5,))
    pred_segs = _segs(pred, {7: 1, 8: 2, 9: 2, 1: 1, 10: 3})
    stats = P.pq_image(gt, gt_segs, pred, pred_segs, INDEX)
    # cat 1: TP 1 (IoU 0.8); cat 2: FP 1 (id 9); cat 3: TP with IoU inter / union (its void pixels left out).
    stuff_inter = int(np.count_nonzero((gt == 10) & (pred == 10)))
    stuff_union = int(np.count_nonzero(gt == 10) + np.count_nonzero(pred == 10) - stuff_inter)
    stuff_union -= int(np.count_nonzero((gt == 0) & (pred == 10)))
    np.testing.assert_array_equal(stats[:3], [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(stats[3], [0.8, 0, stuff_inter / stuff_union, 0])
    expected = {"PQ_th": (0.8 + 0.0) / 2, "RQ_th": (1 + 0) / 2, "PQ_st": stuff_inter / stuff_union}
    _assert_summary(P.flatten_pq(P.pq_from_stats(stats, [1, 2, 3, 4], [1, 1, 0, 0])), expected)
    gt_json, gt_dir = _write(str(tmp_path), "gt", {1: gt}, {1: gt_segs})
    pred_json, pred_dir = _write(str(tmp_path), "pred", {1: pred}, {1: pred_segs}, with_images=False)
    for backend in PACKAGES:
        _assert_summary(P.flatten_pq(P.package_pq(gt_json, gt_dir, pred_json, pred_dir, backend)), expected)


# ---------------------------------------------------------------------------- evaluator on the shapes export


@pytest.fixture(scope="module")
def shapes_export(tmp_path_factory):
    builder = shapes_lib.prepare_shapes(str(tmp_path_factory.mktemp("shapes")), "small")
    paths = shapes_lib.export_coco(builder, "validation")
    with open(paths["panoptic_json"]) as f:
        doc = json.load(f)
    return paths, doc


def _gt_ids(paths, ann):
    return P.read_panoptic_png(os.path.join(paths["panoptic_png_dir"], ann["file_name"]))


def _batches(paths, doc, num_images, drop=None, scale=2, batch_size=3):
    """Ground truth as predictions on a canvas `scale` x the source (nearest upsampled), in padded batches.

    Segment id k + 1 <- the k-th segment of the json; `drop` = (image_id, segment id) predicted as void.
    """
    anns = doc["annotations"][:num_images]
    size = 64 * scale
    for start in range(0, len(anns), batch_size):
        part = anns[start : start + batch_size]
        panoptic = np.zeros((batch_size, size, size), np.int32)
        classes = np.full((batch_size, 8), -1, np.int32)
        mask = np.zeros((batch_size,), np.float32)
        image_id = np.zeros((batch_size,), np.int32)
        for r, ann in enumerate(part):
            ids = _gt_ids(paths, ann)
            slots = np.zeros(ids.shape, np.int32)
            for k, seg in enumerate(ann["segments_info"]):
                if drop != (ann["image_id"], seg["id"]):
                    slots[ids == seg["id"]] = k + 1
                    classes[r, k] = seg["category_id"] - 1
            panoptic[r] = np.repeat(np.repeat(slots, scale, 0), scale, 1)
            mask[r], image_id[r] = 1, ann["image_id"]
        batch = {
            "mask": mask,
            "image_id": image_id,
            "orig_size": np.full((batch_size, 2), 64, np.int32),
            "scale": np.full((batch_size, 2), float(scale), np.float32),
            "image_mask": np.ones((batch_size, size, size), bool),
        }
        yield {"panoptic": panoptic, "segment_classes": classes}, batch


def _evaluate(paths, doc, num_images, **kwargs):
    drop = kwargs.pop("drop", None)
    evaluator = P.PanopticEvaluator(paths["panoptic_json"], paths["panoptic_png_dir"], range(1, 7), **kwargs)
    for predictions, batch in _batches(paths, doc, num_images, drop):
        evaluator.update(predictions, batch)
    return evaluator.compute()


def test_evaluator_perfect_predictions(shapes_export, tmp_path):
    paths, doc = shapes_export
    out = _evaluate(paths, doc, 5, output_dir=str(tmp_path))
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU_pan", "mAP_th_pan"):
        assert out[key] == pytest.approx(1.0), key
    assert out["num_examples"] == 5 and out["gt_unlisted_segments"] == 0
    with open(tmp_path / "panoptic_pred.json") as f:
        written = json.load(f)["annotations"]
    assert len(written) == 5 and len(os.listdir(tmp_path / "panoptic_pred")) == 5
    # The written PNG is at the source size and holds exactly the listed segments.
    ids = P.read_panoptic_png(str(tmp_path / "panoptic_pred" / written[0]["file_name"]))
    assert ids.shape == (64, 64)
    assert sorted(set(np.unique(ids).tolist()) - {0}) == sorted(s["id"] for s in written[0]["segments_info"])


@pytest.mark.parametrize("backend", ["numpy"] + PACKAGES)
def test_evaluator_one_missed_thing(shapes_export, backend):
    paths, doc = shapes_export
    num_images = 7
    ann = doc["annotations"][1]
    thing = next(s for s in ann["segments_info"] if s["category_id"] <= 3)
    out = _evaluate(paths, doc, num_images, drop=(ann["image_id"], thing["id"]), backend=backend)
    # Arithmetic from the json: every segment matched with IoU 1 except one FN of the dropped thing's category.
    counts = np.zeros(6)
    areas = np.zeros(6)
    for a in doc["annotations"][:num_images]:
        for s in a["segments_info"]:
            counts[s["category_id"] - 1] += 1
            areas[s["category_id"] - 1] += s["area"]
    c = thing["category_id"] - 1
    pq = np.where(counts > 0, 1.0, np.nan)
    pq[c] = (counts[c] - 1) / (counts[c] - 1 + 0.5)
    scored_things = [k for k in range(3) if counts[k] > 0]
    assert out["PQ_th"] == pytest.approx(np.mean(pq[scored_things]))
    assert out["PQ_st"] == pytest.approx(1.0)
    assert out["PQ"] == pytest.approx(np.nanmean(pq))
    assert out["SQ"] == pytest.approx(1.0)
    iou = np.where(counts > 0, 1.0, np.nan)
    iou[c] = (areas[c] - thing["area"]) / areas[c]  # void predictions are misses, not another class
    assert out["mIoU_pan"] == pytest.approx(np.nanmean(iou))
    # Thing AP: every detection is exact (score 1), one thing of class c is never detected, so class c's
    # precision is 1 up to recall (n - 1) / n and 0 beyond: AP_c = share of COCO's 101 recall points <= it.
    ap = [
        1.0 if k != c else np.count_nonzero(np.linspace(0, 1, 101) <= (counts[c] - 1) / counts[c]) / 101
        for k in scored_things
    ]
    assert out["mAP_th_pan"] == pytest.approx(np.mean(ap))
    assert out["num_examples"] == num_images
    if backend != "numpy":
        for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
            assert out[f"{backend}/{key}"] == pytest.approx(out[key], abs=1e-12), key


def test_evaluator_rejects_annotation_of_another_size(tmp_path):
    gt, gt_segs, _, _ = _hand_fixture()
    gt_json, gt_dir = _write(str(tmp_path), "gt", {1: gt}, {1: gt_segs})
    evaluator = P.PanopticEvaluator(gt_json, gt_dir, [1, 2, 3, 4])
    batch = {"mask": np.ones(1), "image_id": np.array([1]), "orig_size": np.array([[8, 9]]), "scale": np.ones((1, 2))}
    predictions = {"panoptic": np.zeros((1, 8, 9), np.int32), "segment_classes": np.full((1, 4), -1)}
    with pytest.raises(ValueError, match="000001.png"):
        evaluator.update(predictions, batch)


def test_evaluator_hand_fixture_counts_unlisted_ground_truth(tmp_path):
    # The json leaves out thing 2: it is counted, matched to nothing and (for mIoU_pan) ignored. Hand values:
    # cat 1 IoU 1; cat 2 unscored; cat 3 IoU 1 (void pixel left out); cat 4: pred 11 = 32 px, GT 28 px,
    # inter 28, the 4 px on unlisted ground truth are not void -> IoU 28 / 32 = 0.875.
    gt, gt_segs, pred, _ = _hand_fixture()
    gt_json, gt_dir = _write(str(tmp_path), "gt", {1: gt}, {1: [s for s in gt_segs if s["id"] != 2]})
    evaluator = P.PanopticEvaluator(gt_json, gt_dir, [1, 2, 3, 4])
    classes = np.full((1, 12), -1, np.int32)
    classes[0, 0], classes[0, 9], classes[0, 10] = 0, 2, 3  # segment ids 1, 10, 11
    batch = {"mask": np.ones(1), "image_id": np.array([1]), "orig_size": np.array([[8, 8]]), "scale": np.ones((1, 2))}
    evaluator.update({"panoptic": pred[None], "segment_classes": classes}, batch)
    out = evaluator.compute()
    _assert_summary(out, {"PQ_th": 1.0, "PQ_st": (1 + 0.875) / 2, "PQ": (1 + 1 + 0.875) / 3, "mIoU_pan": 1.0})
    assert out["gt_unlisted_segments"] == 1 and out["mAP_th_pan"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- post-processing


def _box(q, rows, cols, shape=(6, 6)):
    m = np.full(shape, -8.0, np.float32)
    m[rows, cols] = 8.0
    return m


def _postprocess(probs, masks, **kwargs):
    from clusterformer_jax.tasks.panoptic_postprocess import panoptic_postprocess

    out = panoptic_postprocess(
        np.asarray(probs, np.float32), np.asarray(masks, np.float32), (True, True, False), **kwargs
    )
    return {k: np.asarray(v) for k, v in out.items()}


def test_postprocess_overlap_score_area_and_stuff_merge():
    # Classes 0, 1 things, 2 stuff; sigmoid masks (+-8 logits, so every mask score is the same sigmoid(8)) and
    # queries visited by class score: Q6 .95, Q0 .9, Q4 .9, Q1 .85, Q2 .8, Q5 .8, Q3 .6.
    masks = [
        _box(0, slice(0, 2), slice(0, 4)),  # Q0 thing 0, 8 px -> segment 1
        _box(1, slice(1, 3), slice(0, 4)),  # Q1 thing 1: 4 of its 8 px already taken -> 0.5 < 0.8, dropped
        _box(2, slice(1, 4), slice(3, 5)),  # Q2 thing 0: 1 of 6 px taken -> 5 / 6 >= 0.8, kept as segment 3
        _box(3, slice(4, 6), slice(0, 2)),  # Q3 thing 0 with score 0.6 < 0.7: dropped
        _box(4, slice(4, 6), slice(2, 6)),  # Q4 stuff 2 -> segment 5
        _box(5, slice(0, 4), slice(5, 6)),  # Q5 stuff 2 again -> merged into segment 5
        _box(6, slice(5, 6), slice(0, 1)),  # Q6 thing 1, 1 px < min_thing_area 2 -> void
    ]
    probs = np.zeros((7, 4), np.float32)
    for q, (c, p) in enumerate([(0, 0.9), (1, 0.85), (0, 0.8), (0, 0.6), (2, 0.9), (2, 0.8), (1, 0.95)]):
        probs[q, c], probs[q, 3] = p, 1 - p
    out = _postprocess(probs, masks, mask_activation="sigmoid", pixel_threshold=0.5, min_thing_area=2)
    expected = np.zeros((6, 6), np.int32)
    expected[0:2, 0:4] = 1
    expected[1:4, 3:5][expected[1:4, 3:5] == 0] = 3
    expected[4:6, 2:6] = 5
    expected[0:4, 5] = 5
    np.testing.assert_array_equal(out["panoptic"], expected)
    np.testing.assert_array_equal(out["segment_classes"], [0, -1, 0, -1, 2, -1, -1])
    np.testing.assert_allclose(out["segment_scores"], [0.9, 0, 0.8, 0, 0.9, 0, 0], atol=1e-6)
    # Without the area floor the 1-px thing stays as segment 7.
    kept = _postprocess(probs, masks, mask_activation="sigmoid", pixel_threshold=0.5)
    assert kept["panoptic"][5, 0] == 7 and kept["segment_classes"][6] == 1
    # A stuff area floor of 13 px removes the merged stuff segment (12 px) everywhere.
    no_stuff = _postprocess(probs, masks, mask_activation="sigmoid", pixel_threshold=0.5, min_stuff_area=13)
    assert not np.any(no_stuff["panoptic"] == 5) and no_stuff["segment_classes"][4] == -1


def test_postprocess_softmax_masks_and_void_argmax():
    # Softmax over queries: Q0 logit 4 on the left half, Q1 on the right, Q2 logit 0 everywhere, so each half's
    # owner has probability e^4 / (e^4 + 2) = 0.965 > 0.4 and Q2 owns no pixel (1 / (e^4 + 2) < 0.4).
    masks = np.zeros((3, 4, 4), np.float32)
    masks[0, :, :2], masks[1, :, 2:] = 4.0, 4.0
    probs = np.array([[0.8, 0, 0, 0.2], [0, 0, 0.45, 0.55], [0.9, 0, 0, 0.1]], np.float32)
    out = _postprocess(probs, masks, stuff_threshold=0.3)
    expected = np.array([[1, 1, 2, 2]] * 4)
    np.testing.assert_array_equal(out["panoptic"], expected)
    np.testing.assert_array_equal(out["segment_classes"], [0, 2, -1])
    # Mask2Former's rule: Q1's void probability 0.55 beats its best class 0.45, so it is dropped.
    dropped = _postprocess(probs, masks, stuff_threshold=0.3, drop_void_argmax=True)
    np.testing.assert_array_equal(dropped["panoptic"], np.array([[1, 1, 0, 0]] * 4))
    # Class probabilities without a void column give the same map.
    no_void = _postprocess(probs[:, :3], masks, stuff_threshold=0.3)
    np.testing.assert_array_equal(no_void["panoptic"], expected)


def test_postprocess_output_feeds_the_evaluator(shapes_export):
    # Queries = the ground-truth segments of one shapes image (mask logits +-8, class probability 0.95): the
    # post-processed map, read by the evaluator as it is, scores PQ 1.
    paths, doc = shapes_export
    ann = doc["annotations"][0]
    ids = _gt_ids(paths, ann)
    segs = ann["segments_info"]
    masks = np.stack([np.where(ids == s["id"], 8.0, -8.0) for s in segs]).astype(np.float32)
    probs = np.zeros((len(segs), 7), np.float32)
    for q, s in enumerate(segs):
        probs[q, s["category_id"] - 1], probs[q, 6] = 0.95, 0.05
    from clusterformer_jax.tasks.panoptic_postprocess import panoptic_postprocess_batch

    out = panoptic_postprocess_batch(probs[None], masks[None], [True] * 3 + [False] * 3)
    predictions = {k: np.asarray(v) for k, v in out.items()}
    batch = {"mask": np.ones(1), "image_id": np.array([ann["image_id"]]), "orig_size": np.array([[64, 64]])}
    batch["scale"] = np.ones((1, 2))
    evaluator = P.PanopticEvaluator(paths["panoptic_json"], paths["panoptic_png_dir"], range(1, 7))
    evaluator.update(predictions, batch)
    result = evaluator.compute()
    assert result["PQ"] == pytest.approx(1.0) and result["mIoU_pan"] == pytest.approx(1.0)
