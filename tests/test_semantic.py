"""Semantic segmentation task: its losses on hand-computed values, label sampling, both heads forward + loss on a
tiny input, the recipes' configs and one-line config errors (training on shapes: test_dense_trainer.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import registry
from clusterformer_jax.tasks import semantic as sem
from tests import load_config
from tests.test_decoder import TINY_CF

INFO = {
    "num_classes": 6,
    "num_thing_classes": 3,
    "class_names": ("circle", "square", "triangle", "sky", "grass", "water"),
    "category_ids": (1, 2, 3, 4, 5, 6),
    "image_size": 32,
}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_cross_entropy_and_dice_hand_computed_with_ignored_pixels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)  # B=2, 2x3 pixels, K=4
    labels = np.array([[[0, 1, 255], [3, 3, 2]], [[255, 255, 1], [1, 0, 0]]], np.int32)
    p = _softmax(logits.astype(np.float64))
    valid = labels != 255
    nll = [-np.log(p[b, i, j, labels[b, i, j]]) for b, i, j in zip(*np.nonzero(valid))]
    np.testing.assert_allclose(sem.pixel_cross_entropy(logits, labels), np.mean(nll), rtol=1e-5)

    dice = []
    for b in range(2):
        for k in range(4):
            probs = p[b, :, :, k][valid[b]]
            target = (labels[b] == k)[valid[b]].astype(np.float64)
            dice.append(1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1))
    np.testing.assert_allclose(sem.class_dice(logits, labels), np.mean(dice), rtol=1e-5)


def test_grid_labels_take_the_cell_centres():
    labels = np.arange(64, dtype=np.int32).reshape(1, 8, 8)
    np.testing.assert_array_equal(sem.grid_labels(labels, (2, 4))[0], labels[0, 2::4, 1::2])
    with pytest.raises(ConfigError, match="not a multiple"):
        sem.grid_labels(labels, (3, 3))


def _batch(side=32):
    labels = np.full((2, side, side), 3, np.int32)  # sky
    labels[:, side // 2 :, :] = 4  # grass
    labels[0, 4:12, 4:12] = 0  # a circle
    labels[1, :, side - 4 :] = 255  # padding
    image = np.zeros((2, side, side, 3), np.float32)
    return {"image": jnp.asarray(image), "image_mask": jnp.asarray(labels != 255), "semantic": jnp.asarray(labels)}


@pytest.mark.parametrize("head", ["cluster", "paca"])
def test_both_heads_build_and_predict_on_a_tiny_input(head):
    config = load_config("shapes_semantic.py")
    config.semantic.head = head
    config.model.decoder.update(dim=32, num_layers=2, layer_strides=(32, 8), ffn_dim=64)
    task = registry.create_task(config, INFO)
    model = task.build_model("clusterformer_nano", TINY_CF)
    batch = _batch()
    variables = model.init(jax.random.PRNGKey(0), **task.model_inputs(batch))

    @jax.jit
    def step(variables):
        outputs = model.apply(variables, **task.model_inputs(batch))
        value, metrics = task.loss_fn(outputs, batch, jax.random.PRNGKey(1))
        return value, metrics, task.predict(outputs, batch), outputs

    value, metrics, pred, outputs = step(variables)
    assert set(variables["params"]) == ({"backbone", "decoder"} if head == "cluster" else {"backbone", "head"})
    assert np.isfinite(float(value))
    assert pred["semantic_logits"].shape == (2, 8, 8, 6)
    logits = task.pixel_logits(outputs)
    labels = sem.grid_labels(batch["semantic"], (8, 8))
    if head == "cluster":  # deep supervision: every layer's CE 5 + dice 1, the final one reported
        assert "class_logits" not in outputs and "boxes" not in outputs
        per_layer = [5 * sem.pixel_cross_entropy(x, labels) + sem.class_dice(x, labels) for x in logits]
        np.testing.assert_allclose(metrics["loss_ce"], 5 * sem.pixel_cross_entropy(logits[-1], labels), rtol=1e-4)
        np.testing.assert_allclose(value, sum(per_layer), rtol=1e-4)
    else:  # PaCa: CE + 0.4 CE of the cluster logits
        aux = 0.4 * sem.pixel_cross_entropy(outputs["cluster_logits"], labels)
        np.testing.assert_allclose(metrics["loss_aux"], aux, rtol=1e-4)


def test_recipes_load_with_the_papers_numbers():
    tiny = load_config("clusterformer_tiny_ade20k.py")
    assert tiny.task == "semantic_segmentation" and tiny.model.decoder.num_queries == 150
    assert (tiny.semantic.ce_weight, tiny.semantic.dice_weight, tiny.optim.base_lr) == (5.0, 1.0, 1e-5)
    assert (tiny.input.train_crop_size, tiny.input.train_scale_range, tiny.batch_size) == (640, (0.5, 2.0), 16)
    assert load_config("clusterformer_small_ade20k.py").model.name == "clusterformer_small"
    paca = load_config("paca_tiny_ade20k.py")
    assert paca.semantic.head == "paca" and paca.num_train_steps == 160_000 and paca.optim.base_lr == 6e-5
    assert tuple(paca.model.kwargs.clusters) == (200, 200, 200, 0)


def test_config_mistakes_are_one_line_errors():
    config = load_config("shapes_semantic.py")
    config.model.decoder.num_queries = 16
    with pytest.raises(ConfigError, match="set it to 6"):
        registry.create_task(config, INFO)
    config = load_config("shapes_semantic.py")
    config.model.decoder.query_init = "encoder_centers"
    with pytest.raises(ConfigError, match="no fixed center per class"):
        registry.create_task(config, INFO)
    config = load_config("shapes_semantic.py")
    config.semantic.head = "upernet"
    with pytest.raises(ConfigError, match="semantic.head='upernet'") as error:
        registry.create_task(config, INFO)
    assert "\n" not in str(error.value)
