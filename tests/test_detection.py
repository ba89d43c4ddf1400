"""The detection / instance-segmentation task: targets, prediction decoding, config errors (the whole run on
1 and 8 devices is in test_dense_trainer.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import registry
from tests import load_config

INFO = {
    "num_classes": 6,
    "num_thing_classes": 3,
    "class_names": ("circle", "square", "triangle", "sky", "grass", "water"),
    "category_ids": (1, 2, 3, 4, 5, 6),
    "image_size": 16,
    "instances_json": None,
}


def _task(task: str = "instance_segmentation", **detection):
    config = load_config("shapes_instance.py")
    config.task = task
    if task == "detection":  # no masks to take boxes from
        config.detection.box_source = "head"
    config.detection.update(detection)
    return registry.create_task(config, INFO)


def test_targets_drop_crowd_padding_and_stuff_and_normalise_boxes():
    task = _task()
    batch = {
        "image": jnp.zeros((1, 16, 32, 3)),
        "classes": jnp.asarray([[0, 2, 4, -1]]),  # class 4 is stuff: not a detection target
        "instance_valid": jnp.asarray([[True, True, True, False]]),
        "is_crowd": jnp.asarray([[False, True, False, False]]),
        "boxes": jnp.asarray([[[0, 0, 16, 32], [4, 8, 12, 16], [0, 0, 1, 1], [0, 0, 0, 0]]], jnp.float32),
        "instance_masks": jnp.ones((1, 4, 4, 8), jnp.uint8),
    }
    targets = task.targets(batch)
    np.testing.assert_array_equal(targets["valid"], [[True, False, False, False]])
    np.testing.assert_array_equal(targets["classes"], [[0, -1, -1, -1]])
    # [ymin, xmin, ymax, xmax] pixels of a 16 x 32 canvas -> (cx, cy, w, h) / (W, H)
    np.testing.assert_allclose(targets["boxes"][0, 0], [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(targets["boxes"][0, 1], [12 / 32, 8 / 16, 8 / 32, 8 / 16])


def test_predict_keeps_the_top_k_query_class_pairs_with_pixel_boxes_and_mask_scores():
    task = _task(top_k=2, class_loss="focal")
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    # 2 layers (only the last counts), 1 image, 3 queries, 3 classes.
    final = np.full((1, 3, 3), logit(0.01), np.float32)
    final[0, 1, 2] = logit(0.9)  # query 1, class 2: best
    final[0, 2, 0] = logit(0.6)  # query 2, class 0: second
    class_logits = np.stack([np.zeros_like(final), final])
    boxes = np.zeros((2, 1, 3, 4), np.float32)
    boxes[1, 0, 1] = [0.25, 0.5, 0.5, 0.25]  # cx, cy, w, h
    boxes[1, 0, 2] = [0.5, 0.5, 1.0, 1.0]
    masks = np.full((2, 1, 3, 4, 4), -10.0, np.float32)
    masks[1, 0, 1, :2, :2] = logit(0.8)  # 4 cells at 0.8: mask score 0.8
    masks[1, 0, 2, :, :] = logit(0.7)
    outputs = {
        "class_logits": jnp.asarray(class_logits),
        "boxes": jnp.asarray(boxes),
        "mask_logits": jnp.asarray(masks),
    }
    pred = jax.device_get(task.predict(outputs, {"image": jnp.zeros((1, 16, 16, 3))}))
    np.testing.assert_array_equal(pred["labels"], [[2, 0]])
    np.testing.assert_allclose(pred["scores"], [[0.9 * 0.8, 0.6 * 0.7]], rtol=1e-5)
    np.testing.assert_allclose(
        pred["boxes"][0, 0], [6, 0, 10, 8], atol=1e-5
    )  # x 0.25 +- 0.25 of 16, y 0.5 +- 0.125 of 16
    np.testing.assert_allclose(pred["boxes"][0, 1], [0, 0, 16, 16], atol=1e-5)
    assert pred["masks"].dtype == np.uint8 and pred["masks"].shape == (1, 2, 4, 4)
    assert pred["masks"][0, 0, 0, 0] == round(0.8 * 255) and pred["masks"][0, 0, 3, 3] == 0

    box_only = jax.device_get(
        _task("detection", top_k=2, class_loss="focal").predict(outputs, {"image": jnp.zeros((1, 16, 16, 3))})
    )
    assert "masks" not in box_only
    np.testing.assert_allclose(box_only["scores"], [[0.9, 0.6]], rtol=1e-5)


def test_config_mistakes_are_one_line_errors():
    with pytest.raises(ConfigError, match="no field 'top_kk'") as error:
        _task(top_kk=3)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="class_loss"):
        _task(class_loss="hinge")
    with pytest.raises(ConfigError, match="box_source must be one of"):
        _task(box_source="masks")
    with pytest.raises(ConfigError, match="use it for instance_segmentation"):
        _task("detection", box_source="mask")
    config = load_config("shapes_instance.py")
    task = registry.create_task(config, INFO)
    with pytest.raises(ConfigError, match="instances json"):
        task.create_evaluator()
    config.model.decoder.query_init = "random"
    with pytest.raises(ConfigError, match="query_init"):
        registry.create_task(config, INFO).build_model("clusterformer_nano", {})


def test_softmax_predict_scores_object_classes_and_builds_a_void_logit():
    task = _task("detection", top_k=2, class_loss="softmax")
    # 1 layer, 1 image, 2 queries, 3 classes + no-object: probabilities after the softmax
    probs = np.array([[[0.1, 0.7, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]]], np.float32)
    outputs = {"class_logits": jnp.log(jnp.asarray(probs))[None], "boxes": jnp.full((1, 1, 2, 4), 0.5)}
    pred = jax.device_get(task.predict(outputs, {"image": jnp.zeros((1, 8, 8, 3))}))
    np.testing.assert_array_equal(pred["labels"], [[1, 0]])  # the no-object column is never a label
    np.testing.assert_allclose(pred["scores"], [[0.7, 0.1]], rtol=1e-5)
    model = task.build_model("clusterformer_nano", {})
    assert model.void_class and model.num_classes == 3


def test_auxiliary_semantic_loss_adds_weighted_pixel_cross_entropy():
    rng = np.random.default_rng(0)
    b, q, m, side = 2, 4, 3, 16
    outputs = {
        "class_logits": jnp.asarray(rng.normal(size=(2, b, q, 4)), jnp.float32),
        "boxes": jnp.full((2, b, q, 4), 0.5),
        "mask_logits": jnp.asarray(rng.normal(size=(2, b, q, 4, 4)), jnp.float32),
        "semantic_logits": jnp.asarray(rng.normal(size=(b, 4, 4, 6)), jnp.float32),
    }
    semantic = rng.integers(0, 6, size=(b, side, side)).astype(np.int32)
    semantic[0, :8] = 255
    batch = {
        "image": jnp.zeros((b, side, side, 3)),
        "classes": jnp.asarray([[0, 1, -1], [2, -1, -1]]),
        "instance_valid": jnp.asarray([[True, True, False], [True, False, False]]),
        "is_crowd": jnp.zeros((b, m), bool),
        "boxes": jnp.asarray(np.tile([0, 0, 8, 8], (b, m, 1)), jnp.float32),
        "instance_masks": jnp.ones((b, m, side, side), jnp.uint8),
        "semantic": jnp.asarray(semantic),
    }
    with_aux, without = _task(aux_semantic_weight=2.0), _task(aux_semantic_weight=0.0)
    assert with_aux.build_model("clusterformer_nano", {}).semantic_classes == 6
    assert without.build_model("clusterformer_nano", {}).semantic_classes == 0
    loss_aux, terms = with_aux.loss_fn(outputs, batch, jax.random.PRNGKey(0))
    loss_plain, _ = without.loss_fn(outputs, batch, jax.random.PRNGKey(0))
    # the 4x4 grid reads pixels (4r + 2, 4c + 2); rows 0..7 of image 0 are ignored
    labels = semantic[:, 2::4, 2::4]
    logits = np.asarray(outputs["semantic_logits"], np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    expected = 2.0 * nll[valid].mean()
    np.testing.assert_allclose(terms["loss_semantic"], expected, rtol=1e-5)
    np.testing.assert_allclose(loss_aux - loss_plain, expected, rtol=1e-4)
