"""Evaluators with known answers: COCO AP on a hand-made ground truth, classification sums, gathering, drawing.

The COCO ground truth has three images whose source sizes differ from the 64 x 64 eval canvas (scales 2, 4
and 1.75) and two categories with non-contiguous ids (contiguous class 0 -> id 7, class 1 -> id 3). Every
mask is a union of rectangles whose edges fall on stride-4 canvas cell edges, so the canvas grid represents
it exactly and the bilinear map back to the source reproduces it pixel for pixel. That needs grid cells of
at most ~2.4 source pixels (scale >= 1.7): with coarser cells bilinear upsampling rounds a rectangle's
corner pixels off (0.5625^2 < 0.5 at scale 0.5); `test_mask_resize_matches_pil` covers downscaled images.
"""

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from clusterformer_jax.data.coco_format import rle_decode
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.evaluation import gather
from clusterformer_jax.evaluation.base import Evaluator
from clusterformer_jax.evaluation.classification import ClassificationEvaluator
from clusterformer_jax.evaluation.coco import (
    COCOEvaluator,
    binary_masks_to_source,
    largest_component_boxes,
    masks_to_source,
)
from clusterformer_jax.render import draw_instances, side_by_side

CANVAS, GRID, K = 64, 16, 6
CATEGORY_IDS = [7, 3]  # contiguous class -> COCO id
# image id -> (orig (H, W), scale, [(class, [(y0, y1, x0, x1) rectangles of the mask in source pixels])])
IMAGES = {
    11: ((30, 30), 2.0, [(0, [(4, 12, 4, 16)]), (1, [(16, 24, 16, 24), (22, 24, 24, 28)])]),
    12: ((16, 14), 4.0, [(0, [(2, 8, 3, 11)]), (1, [(10, 14, 1, 6)])]),
    13: ((36, 36), 1.75, [(1, [(16, 32, 0, 16)])]),
}
# An empty region of image 11 (class 0 would be a false positive there).
EMPTY_11 = [(26, 30, 0, 8)]


def source_mask(size, rects):
    mask = np.zeros(size, np.uint8)
    for y0, y1, x0, x1 in rects:
        mask[y0:y1, x0:x1] = 1
    return mask


def source_box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@pytest.fixture(scope="module")
def gt_json(tmp_path_factory):
    images, annotations = [], []
    for image_id, (size, _, objects) in IMAGES.items():
        images.append({"id": image_id, "height": size[0], "width": size[1], "file_name": f"{image_id}.png"})
        for cls, rects in objects:
            mask = source_mask(size, rects)
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[cls],
                    "bbox": source_box(mask),
                    "area": int(mask.sum()),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


def detection(image_id, cls, rects, score):
    """One detection in canvas coordinates: its box and its mask on the stride-4 canvas grid."""
    size, scale, _ = IMAGES[image_id]
    mask = source_mask(size, rects)
    x, y, w, h = source_box(mask)
    box = np.array([y, x, y + h, x + w]) * scale
    centres = (np.arange(GRID) * 4 + 2) / scale  # source position of each grid cell's centre
    rows, cols = np.floor(centres).astype(int), np.floor(centres).astype(int)
    inside = (rows[:, None] < size[0]) & (cols[None, :] < size[1])
    grid = np.where(inside, mask[np.minimum(rows, size[0] - 1)][:, np.minimum(cols, size[1] - 1)], 0)
    return box, cls, score, (grid * 255).astype(np.uint8)


def perfect(image_id, scores=None):
    objects = IMAGES[image_id][2]
    scores = scores or [0.9 - 0.1 * i for i in range(len(objects))]
    return [detection(image_id, cls, rects, s) for (cls, rects), s in zip(objects, scores)]


def make_batch(rows):
    """rows: [(image_id, [detections], real)] -> (predictions, batch) with K slots; empty slots are padding
    (label -1) except one slot of score 0 for class 0, which must be dropped too."""
    b = len(rows)
    pred = {
        "boxes": np.zeros((b, K, 4), np.float32),
        "scores": np.zeros((b, K), np.float32),
        "labels": np.full((b, K), -1, np.int32),
        "masks": np.zeros((b, K, GRID, GRID), np.uint8),
    }
    batch = {
        "image_id": np.zeros(b, np.int32),
        "orig_size": np.zeros((b, 2), np.int32),
        "scale": np.zeros((b, 2), np.float32),
        "mask": np.zeros(b, np.float32),
    }
    for r, (image_id, dets, real) in enumerate(rows):
        size, scale, _ = IMAGES[image_id]
        batch["image_id"][r], batch["orig_size"][r], batch["scale"][r], batch["mask"][r] = image_id, size, scale, real
        pred["scores"][r, -2] = 0.95  # padded label with a high score: dropped
        pred["labels"][r, -1] = 0  # real label with score 0: dropped
        pred["boxes"][r, -2:] = [0, 0, 16, 16]
        pred["masks"][r, -2:] = 255
        for k, (box, cls, score, grid) in enumerate(dets):
            pred["boxes"][r, k], pred["labels"][r, k], pred["scores"][r, k], pred["masks"][r, k] = box, cls, score, grid
    return pred, batch


def evaluate(gt_json, *batches, **kwargs):
    ev = COCOEvaluator(gt_json, CATEGORY_IDS, **kwargs)
    for pred, batch in batches:
        ev.update(pred, batch)
    return ev, ev.compute()


def assert_ap(metrics, ap, iou_types=("bbox", "segm")):
    for t in iou_types:
        for name in ("AP", "AP50", "AP75", "APs"):  # every object is small (area < 32^2)
            assert metrics[f"{t}_{name}"] == pytest.approx(ap, abs=1e-12), (t, name)
        assert metrics[f"{t}_APm"] == -1 and metrics[f"{t}_APl"] == -1  # no ground truth of those sizes


def test_perfect_predictions_map_back_to_source(gt_json):
    garbage = [detection(11, 0, EMPTY_11, 0.99), detection(11, 1, EMPTY_11, 0.98)]
    rows = [(11, perfect(11), 1), (11, garbage, 0), (12, perfect(12), 1), (13, perfect(13), 1)]
    ev, metrics = evaluate(gt_json, make_batch(rows))
    assert isinstance(ev, Evaluator)
    assert_ap(metrics, 1.0)
    assert metrics["num_examples"] == 3 and metrics["num_detections"] == 5  # padding row and slots dropped
    gt = json.load(open(gt_json))["annotations"]
    results = ev.results()
    assert len(results) == len(gt)
    for res, ann in zip(results, gt):  # same order: images, then objects
        assert (res["image_id"], res["category_id"]) == (ann["image_id"], ann["category_id"])
        np.testing.assert_allclose(res["bbox"], ann["bbox"], atol=1e-4)
        np.testing.assert_array_equal(rle_decode(res["segmentation"]), rle_decode(ann["segmentation"]))


def test_slice_of_the_split_is_scored_on_its_own_images(gt_json):
    _, metrics = evaluate(gt_json, make_batch([(11, perfect(11), 1), (12, perfect(12), 1)]))
    assert_ap(metrics, 1.0)  # image 13's ground truth is not counted as missed
    assert metrics["num_examples"] == 2


def test_one_of_two_missed(gt_json):
    # Class 0 (id 7) has two objects; the one in image 12 is not detected. Its precision is 1 up to recall
    # 0.5 and then undefined (0): of the 101 recall points 0, 0.01, .., 1, the 51 up to 0.5 score 1,
    # so AP_7 = 51 / 101 at every IoU threshold. Class 1 (id 3) is perfect: AP = (51 / 101 + 1) / 2.
    rows = [(11, perfect(11), 1), (12, perfect(12)[1:], 1), (13, perfect(13), 1)]
    _, metrics = evaluate(gt_json, make_batch(rows))
    assert_ap(metrics, (51 / 101 + 1) / 2)


def test_false_positive_above_a_true_positive(gt_json):
    # Class 0 ranked by score: TP 0.9 (image 11), FP 0.8 (image 11, empty region), TP 0.6 (image 12).
    # Precision 1, 1/2, 2/3 at recall 0.5, 0.5, 1; made monotone from the right: 1, 2/3, 2/3. Recall
    # points 0..0.5 (51) take 1, points 0.51..1 (50) take 2/3: AP_7 = (51 + 50 * 2 / 3) / 101 = 253 / 303.
    rows = [
        (11, perfect(11) + [detection(11, 0, EMPTY_11, 0.8)], 1),
        (12, perfect(12, scores=[0.6, 0.5]), 1),
        (13, perfect(13), 1),
    ]
    _, metrics = evaluate(gt_json, make_batch(rows))
    assert_ap(metrics, (253 / 303 + 1) / 2)
    assert metrics["num_detections"] == 6


def test_updates_split_across_calls_match_one_call(gt_json):
    rows = [(11, perfect(11)[:1], 1), (12, perfect(12), 1), (13, perfect(13), 1)]
    whole, one = evaluate(gt_json, make_batch(rows))
    first = make_batch(rows[:1] + [(13, perfect(13), 0)])
    split, two = evaluate(gt_json, first, make_batch(rows[1:]))
    assert one == two and whole.results() == split.results()
    assert one["bbox_AP"] < 1.0  # the missed class-1 object of image 11 counts


def test_bbox_only_and_errors(gt_json, tmp_path):
    pred, batch = make_batch([(11, perfect(11), 1)])
    del pred["masks"]
    ev, metrics = evaluate(gt_json, (pred, batch), iou_types=("bbox",))
    assert metrics["bbox_AP"] == pytest.approx(1.0) and "segm_AP" not in metrics
    ev.write_results(str(tmp_path / "res.json"))
    assert json.load(open(tmp_path / "res.json")) == ev.results()
    with pytest.raises(ConfigError, match="no COCO instances json"):
        COCOEvaluator(None, CATEGORY_IDS)
    with pytest.raises(ConfigError, match="no 'masks'"):
        COCOEvaluator(gt_json, CATEGORY_IDS).update(pred, batch)
    _, empty = evaluate(gt_json, make_batch([(12, [], 1)]))
    assert empty["bbox_AP"] == 0.0 and empty["num_detections"] == 0


def test_boxes_from_masks_replace_the_head_boxes(gt_json):
    rows = [(i, [(box + 5.0, c, s, g) for box, c, s, g in perfect(i)], 1) for i in IMAGES]  # head boxes 5 px off
    _, head = evaluate(gt_json, make_batch(rows))
    ev, from_masks = evaluate(gt_json, make_batch(rows), box_source="mask")
    assert head["bbox_AP"] < 0.5 and head["segm_AP"] == pytest.approx(1.0)
    assert from_masks["bbox_AP"] == pytest.approx(1.0) and from_masks["segm_AP"] == pytest.approx(1.0)
    gt = json.load(open(gt_json))["annotations"]
    for res, ann in zip(ev.results(), gt):
        np.testing.assert_allclose(res["bbox"], ann["bbox"])
    with pytest.raises(ConfigError, match="box_source must be one of"):
        COCOEvaluator(gt_json, CATEGORY_IDS, box_source="rpn")
    with pytest.raises(ConfigError, match="evaluate 'segm' too"):
        COCOEvaluator(gt_json, CATEGORY_IDS, iou_types=("bbox",), box_source="mask")


def test_largest_component_boxes():
    masks = np.zeros((3, 12, 16), bool)
    masks[0, 2:7, 3:9] = True  # 30 px object
    masks[0, 10, 14] = True  # a stray pixel: not the box
    masks[1, 1, 1] = masks[1, 2, 2] = masks[1, 3, 3] = True  # diagonal: one 8-connected component of 3
    masks[1, 8:10, 8:9] = True  # 2 px, a smaller component
    boxes = largest_component_boxes(masks)
    np.testing.assert_array_equal(boxes[0], [2, 3, 7, 9])
    np.testing.assert_array_equal(boxes[1], [1, 1, 4, 4])
    assert np.isnan(boxes[2]).all()  # empty mask: the caller keeps the head's box


def test_faster_coco_eval_backend_matches(gt_json):
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install faster-coco-eval"):
            COCOEvaluator(gt_json, CATEGORY_IDS, backend="faster_coco_eval")
        pytest.skip("faster-coco-eval is not installed (optional backend); checked its one-line error instead")
    rows = [(11, perfect(11) + [detection(11, 0, EMPTY_11, 0.8)], 1), (12, perfect(12)[1:], 1)]
    _, ref = evaluate(gt_json, make_batch(rows))
    _, fast = evaluate(gt_json, make_batch(rows), backend="faster_coco_eval")
    assert fast == pytest.approx(ref, abs=1e-9)


def test_classification_evaluator():
    ev = ClassificationEvaluator(top_k=5)
    ev.update(
        {"loss": np.array([1.0, 2.0, 99.0]), "top1": np.array([1.0, 0.0, 1.0]), "top5": np.array([1.0, 1.0, 1.0])},
        {"mask": np.array([1.0, 1.0, 0.0])},
    )
    # Raw logits path: label 2 is top-1 in row 0; in row 1 three logits beat label 0 (top-2 miss, top-5 hit).
    logits = np.array([[0.0, 1.0, 5.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    ev.update({"loss": np.array([3.0, 6.0]), "logits": logits, "labels": np.array([2, 0])}, {})
    out = ev.compute()
    assert out["num_examples"] == 4
    assert out["loss"] == pytest.approx((1 + 2 + 3 + 6) / 4)
    assert out["top1"] == pytest.approx(2 / 4) and out["top5"] == pytest.approx(4 / 4)
    ev2 = ClassificationEvaluator(top_k=2)
    ev2.update({"loss": np.zeros(2), "logits": logits, "labels": np.array([2, 0])}, {})
    assert ev2.compute()["top5"] == pytest.approx(1 / 2)  # 'top5' is top-k with k = 2 here


def test_allgather_objects(monkeypatch):
    obj = {"a": [1, 2], "b": np.arange(3.0)}
    out = gather.allgather_objects(obj)
    assert len(out) == 1 and out[0] is obj
    np.testing.assert_array_equal(gather.sum_across_processes(np.array([1.5, 2.0])), [1.5, 2.0])

    # Two simulated processes: the other one's payload is longer, so ours is zero-padded and cut back.
    other = ["x" * 50, 7]
    other_bytes = np.frombuffer(pickle.dumps(other, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)

    def fake_allgather(x):
        if x.dtype == np.int32:
            return np.stack([x, np.array([other_bytes.size], np.int32)])
        padded = np.zeros_like(x)
        padded[: other_bytes.size] = other_bytes
        return np.stack([x, padded])

    monkeypatch.setattr(gather.jax, "process_count", lambda: 2)
    monkeypatch.setattr(gather.multihost_utils, "process_allgather", fake_allgather)
    mine = [1, {"k": "v"}]
    assert gather.allgather_objects(mine) == [mine, other]


def test_draw_instances():
    image = np.full((32, 40, 3), 10, np.uint8)
    boxes = np.array([[4, 6, 20, 30], [0, 0, 8, 8]], np.float32)
    masks = np.zeros((2, 32, 40), bool)
    masks[0, 10:18, 10:20] = True
    out = draw_instances(image, boxes, np.array([1, 0]), np.array([0.93, 0.1]), ["a", "b"], masks)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[19, 6:30] != 10).any(axis=-1).all()  # bottom edge of the box outline
    assert (out[12, 6] != 10).any() and (out[12, 29] != 10).any()  # left and right edges
    assert (out[15, 15] != 10).any() and (out[25, 35] == 10).all()  # tinted mask; outside untouched
    assert (out[30, 2] == 10).all()  # the 0.1-score box is under the threshold
    assert (image == 10).all()  # input left as it was
    pair = side_by_side(out, image[:20])
    assert pair.shape == (32, 84, 3) and (pair[:, :40] == out).all() and (pair[:20, 44:] == 10).all()


@pytest.mark.parametrize("orig_size,scale", [((80, 120), 0.5), ((37, 23), 1.5), ((300, 200), 0.2)])
def test_mask_resize_matches_pil(orig_size, scale):
    # Reference: PIL's bilinear resize of the valid canvas region, box (0, 0, valid_w / 4, valid_h / 4) in
    # grid cells with valid = round(orig * scale), to the source size (all cases upsample the grid).
    grid = np.random.default_rng(0).integers(0, 256, (2, GRID, GRID), dtype=np.uint8)
    valid_h, valid_w = np.floor(np.array(orig_size) * scale + 0.5)
    ref = [
        Image.fromarray(g.astype(np.float32) / 255, "F").resize(
            orig_size[::-1], Image.BILINEAR, box=(0, 0, valid_w / 4, valid_h / 4)
        )
        for g in grid
    ]
    np.testing.assert_allclose(masks_to_source(grid, orig_size, (scale, scale)), np.stack(ref), atol=1e-6)


def test_binary_masks_only_computed_around_the_support_match_dense():
    rng = np.random.default_rng(1)
    grid = np.zeros((12, GRID, GRID), np.uint8)
    for k in range(12):  # a random patch of random values per mask, some of them touching the grid edge
        y, x = rng.integers(0, GRID, 2)
        h, w = rng.integers(1, 6, 2)
        grid[k, y : y + h, x : x + w] = rng.integers(0, 256, grid[k, y : y + h, x : x + w].shape)
    for orig_size, scale in [((80, 120), 0.5), ((37, 23), 1.5), ((16, 14), 4.0)]:
        dense = masks_to_source(grid, orig_size, (scale, scale)) >= 0.5
        np.testing.assert_array_equal(binary_masks_to_source(grid, orig_size, (scale, scale), 0.5), dense)
        assert dense.any()
