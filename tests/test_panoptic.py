"""Panoptic segmentation task: targets on the logit grid, the model's outputs, loss and fixed-shape predict on a
tiny input, the recipes and one-line config errors (the losses: test_panoptic_losses.py; post-processing and
PQ: test_panoptic_eval.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import registry
from clusterformer_jax.tasks.panoptic_losses import TERMS
from tests import load_config
from tests.test_decoder import TINY_CF

INFO = {
    "num_classes": 6,
    "num_thing_classes": 3,
    "class_names": ("circle", "square", "triangle", "sky", "grass", "water"),
    "is_thing": (True, True, True, False, False, False),
    "category_ids": (1, 2, 3, 4, 5, 6),
    "image_size": 32,
}


def _batch(side=32):
    """Two images: sky over grass with one circle (a crowd square in image 1), 4 segment slots."""
    masks = np.zeros((2, 4, side, side), np.uint8)
    masks[:, 0, : side // 2] = 1  # sky
    masks[:, 1, side // 2 :] = 1  # grass
    masks[:, 0, 4:12, 4:12] = 0
    masks[:, 2, 4:12, 4:12] = 1  # thing
    semantic = np.where(masks[:, 0] > 0, 3, 4).astype(np.int32)
    semantic[:, 4:12, 4:12] = 0
    return {
        "image": jnp.zeros((2, side, side, 3)),
        "image_mask": jnp.ones((2, side, side), bool),
        "instance_masks": jnp.asarray(masks),
        "classes": jnp.asarray([[3, 4, 0, -1], [3, 4, 1, -1]], jnp.int32),
        "instance_valid": jnp.asarray([[True, True, True, False]] * 2),
        "is_crowd": jnp.asarray([[False, False, False, False], [False, False, True, False]]),
        "is_thing": jnp.asarray([[False, False, True, False]] * 2),
        "semantic": jnp.asarray(semantic),
    }


def _task(**panoptic):
    config = load_config("shapes_panoptic.py")
    config.model.decoder.update(dim=32, num_layers=2, layer_strides=(32, 8), ffn_dim=64, num_queries=4)
    config.panoptic.update(panoptic)
    return registry.create_task(config, INFO)


def test_targets_sample_the_grid_and_drop_crowd_segments():
    targets = _task().targets(_batch(), (8, 8))
    np.testing.assert_array_equal(targets["valid"], [[True, True, True, False], [True, True, False, False]])
    np.testing.assert_array_equal(targets["classes"][1], [3, 4, -1, -1])
    np.testing.assert_array_equal(targets["is_thing"], [[False, False, True, False], [False, False, False, False]])
    assert targets["masks"].shape == (2, 4, 8, 8) and targets["semantic"].shape == (2, 8, 8)
    # cell (r, c) of the 8x8 grid reads pixel (4r + 2, 4c + 2): the thing covers pixels 4..11 -> cells 1, 2
    np.testing.assert_array_equal(np.nonzero(targets["masks"][0, 2].any(0))[0], [1, 2])
    assert float(targets["masks"][1, 2].sum()) == 0.0  # the crowd segment is no target


def test_model_loss_and_predict_on_a_tiny_input():
    task = _task(upsample=4, thing_threshold=0.0, stuff_threshold=0.0, pixel_threshold=0.0, overlap_threshold=0.0)
    model = task.build_model("clusterformer_nano", TINY_CF)
    batch = _batch()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), **task.model_inputs(batch))  # op by op costs ~3x

    @jax.jit
    def step(variables):
        outputs = model.apply(variables, **task.model_inputs(batch))
        loss, metrics = task.loss_fn(outputs, batch, jax.random.PRNGKey(1))
        return outputs, loss, metrics, task.predict(outputs, batch)

    outputs, loss, metrics, pred = step(variables)
    assert set(outputs) == {"class_logits", "mask_logits", "pixel_embeddings", "semantic_logits"}  # no boxes
    assert outputs["class_logits"].shape == (2, 2, 4, 7)  # 6 classes + no-object
    assert np.isfinite(float(loss)) and set(task.train_metric_fields()) == {
        "loss",
        *TERMS,
        "loss_aux_layers",
        "num_targets",
    }
    np.testing.assert_allclose(loss, sum(metrics[t] for t in TERMS) + metrics["loss_aux_layers"], rtol=1e-5)
    assert float(metrics["num_targets"]) == 5.0
    assert pred["panoptic"].shape == (2, 32, 32) and pred["segment_classes"].shape == (2, 4)
    # with every threshold at 0, each pixel belongs to a kept segment whose class is a real class
    ids = np.asarray(pred["panoptic"])
    assert ids.min() >= 1
    classes = np.asarray(pred["segment_classes"])
    for b in range(2):
        assert (classes[b][np.unique(ids[b]) - 1] >= 0).all()


def test_recipes_and_config_errors():
    tiny = load_config("clusterformer_tiny_coco_panoptic.py")
    assert tiny.task == "panoptic_segmentation" and tiny.input.dataset == "coco_panoptic"
    assert (tiny.panoptic.lambda_thing, tiny.panoptic.lambda_stuff, tiny.panoptic.lambda_aux) == (5.0, 3.0, 1.0)
    assert (tiny.optim.base_lr, tiny.batch_size, tiny.input.train_crop_size, tiny.input.eval_short_side) == (
        1e-5,
        16,
        1024,
        800,
    )
    assert load_config("clusterformer_small_coco_panoptic.py").model.name == "clusterformer_small"
    with pytest.raises(ConfigError, match="no field 'lambda_things'") as error:
        _task(lambda_things=5.0)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="upsample=3"):
        _task(upsample=3)
    with pytest.raises(ConfigError, match="panoptic json"):
        _task().create_evaluator()
