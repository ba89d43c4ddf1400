"""Classification task: loss, Mixup/CutMix and masked top-k metrics against hand-computed values; the one task
table that the entry point validates ``config.task`` against."""

import ast
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.tasks import classification as cls
from clusterformer_jax.tasks import registry
from clusterformer_jax.errors import ConfigError
from tests import entry_point

REPO = Path(__file__).resolve().parents[1]
# Modules below the trainer in the import graph (directories or files).
LEAVES = ["clusterformer_jax/tasks", "clusterformer_jax/convert", "clusterformer_jax/optim.py"]
LEAVES += ["clusterformer_jax/sharding.py", "clusterformer_jax/checkpointing.py"]


def _task_config(**overrides):
    c = dict(label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5)
    c.update(overrides)
    return {"task": "classification", "classification": c}


def test_label_smoothed_cross_entropy_hand_computed():
    logits = jnp.asarray([[2.0, 1.0, 0.0]])
    targets = cls.smooth_targets(jnp.asarray([0]), 3, 0.1)
    np.testing.assert_allclose(targets, [[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]], rtol=1e-6)
    lse = math.log(math.exp(2.0) + math.exp(1.0) + 1.0)
    expected = -((0.9 + 0.1 / 3) * (2.0 - lse) + (0.1 / 3) * (1.0 - lse) + (0.1 / 3) * (0.0 - lse))
    assert expected == pytest.approx(0.507606, abs=1e-5)
    np.testing.assert_allclose(cls.cross_entropy(logits, targets), [expected], rtol=1e-6)
    task = registry.create_task(_task_config(label_smoothing=0.1), {"num_classes": 3})
    batch = task.prepare_train_batch(
        {"image": jnp.zeros((1, 4, 4, 3)), "label": jnp.asarray([0])}, jax.random.PRNGKey(0)
    )
    loss, outputs = task.loss_fn(logits, batch)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert int(outputs["labels"][0]) == 0


def test_mixup_with_fixed_lambda():
    images = jnp.stack([jnp.zeros((2, 2, 3)), jnp.ones((2, 2, 3))])
    targets = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    mixed, mixed_targets = cls.mixup(images, targets, 0.7)
    np.testing.assert_allclose(mixed[0], 0.3, rtol=1e-6)  # 0.7 * 0 + 0.3 * 1
    np.testing.assert_allclose(mixed[1], 0.7, rtol=1e-6)  # 0.7 * 1 + 0.3 * 0
    np.testing.assert_allclose(mixed_targets, [[0.7, 0.3], [0.3, 0.7]], rtol=1e-6)


def test_cutmix_box_area_equals_one_minus_lambda():
    height = width = 16
    lam = 0.75  # box side = 16 * sqrt(0.25) = 8 -> area 64 / 256 = 0.25
    images = jnp.stack([jnp.zeros((height, width, 1)), jnp.ones((height, width, 1))])
    targets = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    unclipped = 0
    for seed in range(20):
        box = np.asarray(cls.cutmix_box(jax.random.PRNGKey(seed), lam, height, width))
        y0, y1, x0, x1 = box
        area = (y1 - y0) * (x1 - x0) / (height * width)
        mixed, mixed_targets, lam_used = cls.cutmix(images, targets, jnp.asarray(box))
        # The pasted region is exactly the box, taken from the partner (reversed) example.
        assert float(jnp.mean(mixed[0])) == pytest.approx(area)
        np.testing.assert_array_equal(np.asarray(mixed[0, y0:y1, x0:x1]), 1.0)
        assert float(lam_used) == pytest.approx(1.0 - area)
        np.testing.assert_allclose(mixed_targets[0], [1.0 - area, area], rtol=1e-6)
        if y1 - y0 == 8 and x1 - x0 == 8:
            unclipped += 1
            assert area == pytest.approx(1.0 - lam)
    assert unclipped > 0


def test_mix_batch_off_and_on():
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    targets = jax.nn.one_hot(jnp.arange(4), 4)
    same_images, same_targets = cls.mix_batch(
        jax.random.PRNGKey(0), images, targets, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0, switch_prob=0.5
    )
    np.testing.assert_array_equal(same_images, images)
    np.testing.assert_array_equal(same_targets, targets)
    _, mixed_targets = cls.mix_batch(
        jax.random.PRNGKey(0), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5
    )
    np.testing.assert_allclose(jnp.sum(mixed_targets, axis=-1), 1.0, rtol=1e-6)
    lam = float(mixed_targets[0, 0])
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mixed_targets[0, 3], 1.0 - lam, rtol=1e-5)


def test_masked_top1_top5_hand_counted():
    # 4 examples, 7 classes, last row is padding (mask 0) and would count as correct if it were seen.
    logits = jnp.asarray(
        [
            [9, 8, 7, 6, 5, 4, 3],  # label 0: top-1 and top-5 hit
            [9, 8, 7, 6, 5, 4, 3],  # label 4: rank 5 -> top-5 hit only
            [9, 8, 7, 6, 5, 4, 3],  # label 6: rank 7 -> miss
            [9, 8, 7, 6, 5, 4, 3],  # padding, label 0
        ],
        jnp.float32,
    )
    batch = {"label": jnp.asarray([0, 4, 6, 0]), "mask": jnp.asarray([1.0, 1.0, 1.0, 0.0])}
    task = registry.create_task(_task_config(), {"num_classes": 7})
    evaluator = task.create_evaluator()
    predictions = jax.tree.map(np.asarray, task.predict(logits, batch))
    evaluator.update(predictions, jax.tree.map(np.asarray, batch))
    metrics = evaluator.compute()
    assert metrics["num_examples"] == 3
    assert float(metrics["top1"]) == pytest.approx(1 / 3)
    assert float(metrics["top5"]) == pytest.approx(2 / 3)
    log_probs = jax.nn.log_softmax(logits[0])
    expected_loss = -float(log_probs[0] + log_probs[4] + log_probs[6]) / 3
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_array_equal(cls.topk_correct(logits, batch["label"], 5), [1, 1, 0, 1])


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown task"):
        registry.create_task({"task": "segmentation"}, {"num_classes": 3})


def test_entry_point_checks_the_task_against_the_task_table(tmp_path):
    """Through the entry point's own parsing and checks, in this process (tests/entry_point.py)."""
    code, stderr = entry_point.run_main(
        [f"--config={REPO / 'configs' / 'quickstart.py'}", "--config.task=segmentation", f"--workdir={tmp_path}"]
    )
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"error: unknown config.task 'segmentation'; available: {', '.join(sorted(registry.TASKS))}"
    ]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_leaf_modules_do_not_import_the_trainer():
    """Tasks, converters, the optimizer, sharding and checkpointing sit below the trainer, never above it."""
    files = [f for leaf in LEAVES for f in ((REPO / leaf).glob("*.py") if (REPO / leaf).is_dir() else [REPO / leaf])]
    assert len(files) >= 10
    for path in files:
        bad = sorted(m for m in _imported_modules(path) if m.startswith("clusterformer_jax.trainers"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
