"""Semantic segmentation task: its losses on hand-computed values, label sampling, both heads forward + loss on a
tiny input, the recipes' configs and one-line config errors (training on shapes: test_dense_trainer.py); sliding-window
inference against a numpy transcription of mmseg's slide_inference on stub models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import registry
from clusterformer_jax.tasks import semantic as sem
from clusterformer_jax.tasks import sliding_window as sw
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
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), **task.model_inputs(batch))  # op by op costs ~3x

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


# ---------------------------------------------------------------------------- sliding-window inference


class _RelativeStub(nn.Module):
    """Stand-in model whose logits depend on where its window sits: per stride-4 cell, channel 0/1 = the cell's
    mean of image channel 0/1 (the pixel's row / column) minus the window's smallest; channel 2 = 1."""

    @nn.compact
    def __call__(self, images, pixel_mask=None, train=False):
        scale = self.param("scale", nn.initializers.ones, ())
        b, h, w, _ = images.shape
        cells = images[..., :2].reshape(b, h // 4, 4, w // 4, 4, 2).mean(axis=(2, 4))
        relative = cells - images[..., :2].min(axis=(1, 2))[:, None, None, :]
        return {"logits": jnp.concatenate([relative, jnp.ones_like(relative[..., :1])], -1) * scale}


def _coordinates(b, h, w):
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return np.broadcast_to(np.stack([rows, cols, np.zeros_like(rows)], -1), (b, h, w, 3)).copy()


def _mmseg_slide(extent, crop, stride):
    """mmseg's slide_inference of _RelativeStub over one image of size `extent` (numpy, pixel resolution),
    returned at the stride-4 cells: the mean over covering windows of (cell centre - window start)."""
    (he, we), (ch, cw), (sh, sw) = extent, crop, stride
    total, count = np.zeros((he, we, 2)), np.zeros((he, we))
    for i in range(max(he - ch + sh - 1, 0) // sh + 1):
        for j in range(max(we - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, he), min(j * sw + cw, we)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            rows, cols = np.meshgrid(np.arange(y1, y2), np.arange(x1, x2), indexing="ij")
            total[y1:y2, x1:x2] += np.stack([(rows // 4) * 4 + 1.5 - y1, (cols // 4) * 4 + 1.5 - x1], -1)
            count[y1:y2, x1:x2] += 1
    assert count.min() > 0
    return (total / count[..., None])[::4, ::4], count[::4, ::4]


def test_window_starts_follow_mmseg_on_the_logit_grid():
    # ADE20K: 640 crops every 426 (-> 424) px over a 1280 canvas; an 853-px-wide image needs 2 windows, the
    # last at 853 - 640 = 213 rounded up to the cell (216); a 300-px side needs one; the full canvas three.
    starts, active = sw.window_starts(jnp.array([853, 300, 1280]), 1280, 640, 424, 4)
    np.testing.assert_array_equal(starts, [[0, 0, 0], [216, 0, 424], [216, 0, 640]])
    np.testing.assert_array_equal(active, [[1, 1, 1], [1, 0, 1], [0, 0, 1]])
    mask = np.zeros((1, 1280, 1280), bool)
    mask[0, :640, :853] = True
    starts, active, crop, stride = sw.slide_plan(jnp.asarray(mask), (640, 640), (426, 426))
    assert (crop, stride) == ((640, 640), (424, 424)) and starts.shape == (9, 1, 2)
    np.testing.assert_array_equal(starts[np.asarray(active[:, 0])][:, 0], [[0, 0], [0, 216]])


def test_slide_averages_windows_as_mmseg_with_exact_counts():
    # Rows: whole 48x64 canvas; a 36x40 image; an image smaller than the crop (one window, padding masked).
    extents = [(48, 64), (36, 40), (16, 20)]
    images = _coordinates(3, 48, 64)
    mask = np.zeros((3, 48, 64), bool)
    for row, (h, w) in enumerate(extents):
        mask[row, :h, :w] = True
    crop, stride = (24, 32), (12, 20)
    model = sw.SlidingWindow(_RelativeStub(), num_classes=3, select=sem.final_logits, crop=crop, stride=stride)
    variables = model.init(jax.random.PRNGKey(0), images[:1, :24, :32], mask[:1, :24, :32])
    assert jax.tree.structure(variables) == jax.tree.structure(_RelativeStub().init(jax.random.PRNGKey(0), images))
    apply = jax.jit(model.apply)
    out = np.asarray(apply(variables, images, mask)["semantic_logits"])
    assert out.shape == (3, 12, 16, 3)
    for row, (h, w) in enumerate(extents):
        expected, count = _mmseg_slide((h, w), crop, stride)
        assert count.max() > 1 or row == 2  # overlaps exist where windows do
        np.testing.assert_allclose(out[row, : h // 4, : w // 4, :2], expected, atol=1e-5)
        np.testing.assert_array_equal(out[row, : h // 4, : w // 4, 2], 1.0)  # sum / count exactly 1
    # A batch of only small images: every window past the first is skipped, same result for the row.
    small = np.asarray(apply(variables, images[2:], mask[2:])["semantic_logits"])
    np.testing.assert_array_equal(small[0], out[2])
    # Training and init see the model itself.
    np.testing.assert_array_equal(
        model.apply(variables, images[:1], mask[:1], train=True)["logits"],
        _RelativeStub().apply(variables, images[:1], mask[:1])["logits"],
    )


class _ClusterStub(nn.Module):
    """Stand-in for the cluster head's output format: 'mask_logits' (L=2, B, K=6, H/4, W/4) from 4x4 patches
    through a Dense, plus the mean over the whole input (context, so windows would change it)."""

    @nn.compact
    def __call__(self, images, pixel_mask=None, train=False):
        b, h, w, c = images.shape
        patches = images.reshape(b, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 4, w // 4, -1)
        logits = nn.Dense(6)(patches) + images.mean(axis=(1, 2, 3))[:, None, None, None]
        return {"mask_logits": jnp.stack([-logits, logits]).transpose(0, 1, 4, 2, 3)}


def test_slide_with_one_window_equals_whole():
    config = load_config("shapes_semantic.py")
    whole_task = registry.create_task(config, INFO)
    config.semantic.update(inference="slide", slide_crop=(64, 64), slide_stride=(16, 16))  # cut to the canvas
    slide_task = registry.create_task(config, INFO)
    batch = _batch()
    batch["image"] = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    stub = _ClusterStub()
    variables = stub.init(jax.random.PRNGKey(0), **whole_task.model_inputs(batch))
    slide = sw.SlidingWindow(stub, 6, sem.final_logits, slide_task.slide_crop, slide_task.slide_stride)
    whole_pred = whole_task.predict(stub.apply(variables, **whole_task.model_inputs(batch)), batch)
    slide_pred = slide_task.predict(jax.jit(slide.apply)(variables, **slide_task.model_inputs(batch)), batch)
    assert slide_pred["semantic_logits"].shape == (2, 8, 8, 6)
    np.testing.assert_allclose(slide_pred["semantic_logits"], whole_pred["semantic_logits"], atol=1e-5)

    # The task wraps the real model with the same variable tree (checkpoints move between 'whole' and 'slide')
    # and predicts the canvas's logits (shapes only: compiling the tiny model twice costs minutes here).
    config.model.decoder.update(dim=32, num_layers=2, layer_strides=(32, 8), ffn_dim=64)
    slide_task = registry.create_task(config, INFO)
    config.semantic.inference = "whole"
    whole_task = registry.create_task(config, INFO)
    whole, slide = (t.build_model("clusterformer_nano", TINY_CF) for t in (whole_task, slide_task))
    assert isinstance(slide, sw.SlidingWindow) and not isinstance(whole, sw.SlidingWindow)
    inputs = whole_task.model_inputs(batch)
    shapes = jax.eval_shape(lambda: whole.init(jax.random.PRNGKey(0), **inputs))
    assert jax.tree.structure(jax.eval_shape(lambda: slide.init(jax.random.PRNGKey(0), **inputs))) == (
        jax.tree.structure(shapes)
    )
    out = jax.eval_shape(lambda v: slide_task.predict(slide.apply(v, **inputs), batch), shapes)
    assert out["semantic_logits"].shape == (2, 8, 8, 6)


def test_slide_config_and_mistakes():
    tiny = load_config("clusterformer_tiny_ade20k.py")
    assert tiny.semantic.inference == "whole"  # the paper's test; mmseg's 640 windows one flag away
    assert (tuple(tiny.semantic.slide_crop), tuple(tiny.semantic.slide_stride)) == ((640, 640), (426, 426))
    for fields, message in (
        (dict(inference="tiles"), "inference='tiles'"),
        (dict(inference="slide", slide_crop=(32, 32), slide_stride=(48, 16)), "exceeds slide_crop"),
        (dict(inference="slide", slide_crop=(32, 0)), "positive ints"),
    ):
        config = load_config("shapes_semantic.py")
        config.semantic.update(fields)
        with pytest.raises(ConfigError, match=message):
            registry.create_task(config, INFO)
