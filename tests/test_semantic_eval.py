"""SemanticEvaluator: confusion-matrix mIoU on fixed predictions with hand-computed values; ADE20K's source-size
ground truth read back from a tiny ADEChallengeData2016 (folder and zip) and wired through the semantic task."""

import math

import numpy as np
import pytest

from clusterformer_jax.evaluation.semantic import SemanticEvaluator, confusion_matrix, resample, semantic_metrics

# Source ground truth (2 x 4), 255 = ignore; 4 classes: class 2 appears nowhere, class 3 only in the prediction.
GT = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
PRED = np.array([[0, 1, 1, 1], [0, 0, 1, 3]])
# Valid pixels: 7. Class 0: GT 3, pred 2, TP 2 -> IoU 2 / 3, Acc 2 / 3. Class 1: GT 4, pred 4, TP 3 -> IoU 3 / 5,
# Acc 3 / 4. Class 2: nowhere -> NaN. Class 3: GT 0, pred 1 -> IoU 0, Acc NaN.
EXPECTED = {
    "IoU": [2 / 3, 3 / 5, math.nan, 0.0],
    "mIoU": (2 / 3 + 3 / 5 + 0.0) / 3,
    "mAcc": (2 / 3 + 3 / 4) / 2,
    "aAcc": 5 / 7,
}
NAMES = ("a", "b", "c", "d")


def _check(out):
    assert out["mIoU"] == pytest.approx(EXPECTED["mIoU"])
    assert out["mAcc"] == pytest.approx(EXPECTED["mAcc"])
    assert out["aAcc"] == pytest.approx(EXPECTED["aAcc"])
    for name, iou in zip(NAMES, EXPECTED["IoU"]):
        assert out[f"IoU/{name}"] == pytest.approx(iou, nan_ok=True)
    assert out["num_classes_scored"] == 3


def test_confusion_matrix_and_metrics_by_hand():
    confusion = confusion_matrix(GT, PRED, 4)
    assert confusion.shape == (4, 5)
    assert confusion[0, 0] == 2 and confusion[0, 1] == 1 and confusion[1, 1] == 3 and confusion[1, 3] == 1
    assert confusion.sum() == 7  # the ignore pixel is not counted
    _check(semantic_metrics(confusion, NAMES))


def test_void_predictions_lower_recall_only():
    # A pixel predicted as no class (-1) is a miss for its GT class and in no class's prediction area.
    confusion = confusion_matrix(np.array([0, 0, 1]), np.array([0, -1, 1]), 2)
    out = semantic_metrics(confusion)
    assert out["IoU/0"] == pytest.approx(1 / 2) and out["IoU/1"] == pytest.approx(1.0)
    assert out["aAcc"] == pytest.approx(2 / 3)


def test_bilinear_resample_by_hand():
    # Cells [0, 10] read at 4 output pixels over a 2-cell region: positions -0.25, 0.25, 0.75, 1.25 clipped.
    out = resample(np.array([[0.0, 10.0]]), (1, 2), (1, 4), bilinear=True)
    np.testing.assert_allclose(out[0], [0.0, 2.5, 7.5, 10.0])
    near = resample(np.array([[1, 2]]), (1, 2), (1, 4))
    np.testing.assert_array_equal(near[0], [1, 1, 2, 2])


def _canvas_batch(pad_rows: int = 0):
    """The 2 x 4 source image at scale 2 on an 8 x 8 canvas (valid 4 x 8), plus padding rows."""
    semantic = np.full((1 + pad_rows, 8, 8), 255, np.int32)
    semantic[0, :4, :8] = np.repeat(np.repeat(GT, 2, 0), 2, 1)
    mask = np.zeros((1 + pad_rows,), np.float32)
    mask[0] = 1
    image_mask = np.zeros((1 + pad_rows, 8, 8), bool)
    image_mask[0, :4, :8] = True
    return {
        "semantic": semantic,
        "image_mask": image_mask,
        "mask": mask,
        "image_id": np.arange(1, 2 + pad_rows, dtype=np.int32),
        "orig_size": np.array([[2, 4]] * (1 + pad_rows), np.int32),
        "scale": np.array([[2.0, 2.0]] * (1 + pad_rows), np.float32),
    }


def _canvas_pred(stride: int, pad_rows: int = 0, fill: int = 0):
    """PRED placed on the canvas at resolution 8 / stride; padding rows hold garbage class `fill`."""
    up = 2 // stride
    grid = np.full((1 + pad_rows, 8 // stride, 8 // stride), fill, np.int32)
    grid[0, : 2 * up, : 4 * up] = np.repeat(np.repeat(PRED, up, 0), up, 1)
    return grid


@pytest.mark.parametrize("stride", [1, 2])
def test_canvas_mode_crops_valid_region_and_skips_padding_rows(stride):
    evaluator = SemanticEvaluator(4, class_names=NAMES)
    # Padding rows carry predictions of class 3 against an all-ignore label: they must not count.
    evaluator.update({"semantic": _canvas_pred(stride, pad_rows=2, fill=3)}, _canvas_batch(pad_rows=2))
    out = evaluator.compute()
    _check(out)
    assert out["num_examples"] == 1
    # Every canvas pixel of the valid region is scored: 4 x as many as source pixels, same fractions.
    assert evaluator.confusion().sum() == 7 * 4


def test_source_mode_with_ground_truth_and_logits():
    lookup = {1: GT}
    evaluator = SemanticEvaluator(4, class_names=NAMES, ground_truth=lambda image_id: lookup[image_id])
    logits = np.eye(4, dtype=np.float32)[_canvas_pred(1)] * 10.0  # one-hot logits on the canvas
    evaluator.update({"semantic_logits": logits}, _canvas_batch())
    out = evaluator.compute()
    _check(out)
    assert evaluator.confusion().sum() == 7  # scored at the source size
    # Per-row source-size label maps (a list) are taken as they are.
    listed = SemanticEvaluator(4, class_names=NAMES, ground_truth=lambda image_id: lookup[image_id])
    listed.update({"semantic": [PRED]}, _canvas_batch())
    _check(listed.compute())


def test_updates_accumulate_over_batches():
    evaluator = SemanticEvaluator(4, class_names=NAMES)
    for _ in range(3):
        evaluator.update({"semantic": _canvas_pred(1)}, _canvas_batch())
    out = evaluator.compute()
    _check(out)  # fractions unchanged by repeating the same image
    assert out["num_examples"] == 3


def test_label_out_of_range_names_the_image():
    batch = _canvas_batch()
    batch["semantic"][0, 0, 0] = 7
    evaluator = SemanticEvaluator(4)
    with pytest.raises(ValueError, match="image 1"):
        evaluator.update({"semantic": _canvas_pred(1)}, batch)


# ---------------------------------------------------------------------------- ADE20K source-size ground truth

# Raw ADE label PNG values: 0 = other (ignored), k = class k - 1, above 150 ignored.
ADE_RAW = np.array([[0, 1, 1, 2, 2, 2, 151, 3], [1, 1, 2, 2, 3, 3, 3, 0], [1, 1, 1, 2, 3, 3, 0, 0]], np.uint8)
ADE_REDUCED = np.where((ADE_RAW == 0) | (ADE_RAW > 150), 255, ADE_RAW.astype(np.int64) - 1)


def _ade_manual(root, zipped: bool) -> str:
    """ADEChallengeData2016 with two validation images (JPEG + label PNG of its size), as a folder or a zip."""
    import zipfile

    from tests.test_dense_data import _jpeg, _png

    files = {}
    for k, raw in ((1, ADE_RAW), (2, np.ones((4, 4), np.uint8))):
        stem = f"ADE_val_{k:08d}"
        files[f"ADEChallengeData2016/images/validation/{stem}.jpg"] = _jpeg(np.full(raw.shape + (3,), 90, np.uint8))
        files[f"ADEChallengeData2016/annotations/validation/{stem}.png"] = _png(raw)
    root.mkdir()
    if zipped:
        with zipfile.ZipFile(root / "ADEChallengeData2016.zip", "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return str(root)


@pytest.mark.parametrize("zipped", [False, True])
def test_ade20k_source_labels_read_back_reduced(tmp_path, zipped):
    from clusterformer_jax.data import ade20k

    manual = _ade_manual(tmp_path / "manual", zipped)
    labels = ade20k.source_labels(manual, "validation")
    assert len(labels) == 2
    np.testing.assert_array_equal(labels(1), ADE_REDUCED)
    np.testing.assert_array_equal(labels.raw(1), ADE_RAW)
    np.testing.assert_array_equal(labels(2), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="image id 7 in .*annotations/validation"):
        labels(7)
    assert ade20k.source_labels(manual, "train") is None  # no annotations/training: the canvas is scored
    if not zipped:  # the ADEChallengeData2016 folder itself as the manual directory
        np.testing.assert_array_equal(
            ade20k.source_labels(f"{manual}/ADEChallengeData2016", "validation")(1), ADE_REDUCED
        )


def test_evaluator_scores_ade20k_at_the_source_size(tmp_path):
    from clusterformer_jax.data import ade20k

    labels = ade20k.source_labels(_ade_manual(tmp_path / "manual", zipped=False), "validation")
    # The 3 x 8 image at scale 2 on a 16 x 16 canvas; a prediction of class 0 / 1 / 2 per column block.
    pred = np.array([[0, 0, 1, 1, 1, 2, 2, 2]] * 3)
    canvas = np.full((1, 16, 16), 5, np.int32)
    canvas[0, :6, :16] = np.repeat(np.repeat(pred, 2, 0), 2, 1)
    batch = {
        "mask": np.ones((1,), np.float32),
        "image_id": np.array([1]),
        "orig_size": np.array([[3, 8]]),
        "scale": np.array([[2.0, 2.0]]),
    }
    evaluator = SemanticEvaluator(ade20k.NUM_CLASSES, class_names=ade20k.ADE20K_CLASSES, ground_truth=labels)
    evaluator.update({"semantic": canvas}, batch)
    # Expected counts, ground truth (rows) x prediction (columns), over the 19 labelled pixels.
    expected = np.zeros((150, 151), np.int64)
    for gt, p in zip(ADE_REDUCED.ravel(), pred.ravel()):
        if gt != 255:
            expected[gt, p] += 1
    assert expected[:3, :3].tolist() == [[5, 2, 0], [0, 5, 1], [0, 2, 4]] and expected.sum() == 19  # by hand
    np.testing.assert_array_equal(evaluator.confusion(), expected)
    out = evaluator.compute()
    assert out["aAcc"] == pytest.approx(14 / 19) and out["IoU/wall"] == pytest.approx(5 / 7)


def test_semantic_task_wires_ade20k_source_labels(tmp_path, caplog):
    from clusterformer_jax.data import ade20k
    from clusterformer_jax.tasks import registry
    from tests import load_config

    manual = _ade_manual(tmp_path / "manual", zipped=True)
    info = {"num_classes": 150, "class_names": ade20k.ADE20K_CLASSES, "image_size": 64}
    config = load_config("shapes_semantic.py")
    config.model.decoder.num_queries = 150
    config.input.update(dataset="ade20k", manual_dir=manual)
    truth = registry.create_task(config, info).create_evaluator().ground_truth
    assert isinstance(truth, ade20k.SourceLabels)
    np.testing.assert_array_equal(truth(1), ADE_REDUCED)
    config.input.eval_split = "train"  # no training annotations: the canvas, with a warning
    assert registry.create_task(config, info).create_evaluator().ground_truth is None
    config.input.eval_split = "validation"
    config.semantic.source_size_ground_truth = False
    assert registry.create_task(config, info).create_evaluator().ground_truth is None
    shapes = load_config("shapes_semantic.py")  # other datasets: the canvas, as before
    assert (
        registry.create_task(shapes, dict(info, num_classes=6, class_names=tuple("abcdef")))
        .create_evaluator()
        .ground_truth
        is None
    )
