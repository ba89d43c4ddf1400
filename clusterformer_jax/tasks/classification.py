"""Image classification: label-smoothed cross-entropy, on-device Mixup/CutMix, top-1/top-5 metrics.

Reads ``config.classification``: label_smoothing, mixup_alpha, cutmix_alpha, mix_prob, switch_prob
(the timm ``Mixup`` semantics, one mixing coefficient per batch, partner = the batch reversed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.evaluation.classification import ClassificationEvaluator
from clusterformer_jax.models import registry as model_registry


def smooth_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """One-hot targets with ``label_smoothing`` spread evenly over all classes (timm convention)."""
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against (soft) target distributions."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def mixup(images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blends every example with its partner in the reversed batch: ``lam * x + (1 - lam) * x[::-1]``."""
    lam = jnp.asarray(lam, jnp.float32)
    mixed = lam * images + (1.0 - lam) * images[::-1]
    return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * targets[::-1]


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """A random box ``[y0, y1, x0, x1)`` covering about ``1 - lam`` of the image, clipped to its borders."""
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    ry, rx = jax.random.split(rng)
    cy = jax.random.randint(ry, (), 0, height)
    cx = jax.random.randint(rx, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy - cut_h // 2 + cut_h, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx - cut_w // 2 + cut_w, 0, width)
    return jnp.stack([y0, y1, x0, x1])


def cutmix(images: jax.Array, targets: jax.Array, box: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pastes ``box`` from the reversed batch; targets mix by the pasted area. Returns (images, targets, lam)."""
    height, width = images.shape[1], images.shape[2]
    ys = jnp.arange(height)[:, None]
    xs = jnp.arange(width)[None, :]
    inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
    mixed = jnp.where(inside[None, :, :, None], images[::-1], images)
    area = (box[1] - box[0]) * (box[3] - box[2])
    lam = 1.0 - area.astype(jnp.float32) / (height * width)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1], lam


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float,
    switch_prob: float,
) -> tuple[jax.Array, jax.Array]:
    """Applies Mixup or CutMix (chosen with ``switch_prob`` when both are on) with probability ``mix_prob``."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0 or mix_prob <= 0:
        return images, targets
    r_apply, r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 5)
    height, width = images.shape[1], images.shape[2]
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(r_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    out_images, out_targets = images, targets
    if mixup_alpha > 0:
        lam = jax.random.beta(r_mix, mixup_alpha, mixup_alpha)
        m_images, m_targets = mixup(images, targets, lam)
        out_images = jnp.where(use_cutmix, out_images, m_images)
        out_targets = jnp.where(use_cutmix, out_targets, m_targets)
    if cutmix_alpha > 0:
        lam = jax.random.beta(r_cut, cutmix_alpha, cutmix_alpha)
        c_images, c_targets, _ = cutmix(images, targets, cutmix_box(r_box, lam, height, width))
        out_images = jnp.where(use_cutmix, c_images, out_images)
        out_targets = jnp.where(use_cutmix, c_targets, out_targets)
    apply = jax.random.uniform(r_apply) < mix_prob
    return jnp.where(apply, out_images, images), jnp.where(apply, out_targets, targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where ``labels`` is among the ``k`` highest logits (ties counted against the label)."""
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    higher = jnp.sum(logits > label_logit, axis=-1)
    return (higher < k).astype(jnp.float32)


def _topk_metric(k: int) -> type[clu_metrics.Metric]:
    def fun(logits: jax.Array, labels: jax.Array, **_: Any) -> jax.Array:
        return topk_correct(logits, labels, k)

    return clu_metrics.Average.from_fun(fun)


class ClassificationTask:
    """Softmax classification over ``num_classes`` (see the module docstring for the config)."""

    def __init__(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]):
        cfg = config["classification"]
        self.num_classes = int(dataset_info["num_classes"])
        self.image_size = int(dataset_info.get("image_size", 0))
        self.label_smoothing = float(cfg["label_smoothing"])
        self.mixup_alpha = float(cfg["mixup_alpha"])
        self.cutmix_alpha = float(cfg["cutmix_alpha"])
        self.mix_prob = float(cfg["mix_prob"])
        self.switch_prob = float(cfg["switch_prob"])
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"classification.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.mix_prob <= 1.0 or not 0.0 <= self.switch_prob <= 1.0:
            raise ConfigError("classification.mix_prob and classification.switch_prob must be in [0, 1]")
        self.top_k = min(5, self.num_classes)  # 'top5' is top-min(5, K) for datasets with fewer classes

    def build_model(self, model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
        try:
            return model_registry.create_model(model_name, num_classes=self.num_classes, **model_kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def dummy_inputs(self, batch_size: int) -> dict[str, jax.Array]:
        return {"images": jnp.zeros((batch_size, self.image_size, self.image_size, 3), jnp.float32)}

    def model_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {"images": batch["image"]}

    def prepare_train_batch(self, batch: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        targets = smooth_targets(batch["label"], self.num_classes, self.label_smoothing)
        images, targets = mix_batch(
            rng,
            batch["image"],
            targets,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            mix_prob=self.mix_prob,
            switch_prob=self.switch_prob,
        )
        return {**batch, "image": images, "target": targets}

    def loss_fn(
        self, logits: jax.Array, batch: Mapping[str, jax.Array], rng: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        per_example = cross_entropy(logits, batch["target"])
        outputs = {"loss": per_example, "logits": logits, "labels": jnp.argmax(batch["target"], axis=-1)}
        return jnp.mean(per_example), outputs

    def train_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        return {
            "loss": clu_metrics.Average.from_output("loss"),
            "top1": _topk_metric(1),
            "top5": _topk_metric(self.top_k),
        }

    def predict(self, logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-example loss and top-1/top-k hits (the evaluator averages them over the real rows)."""
        targets = jax.nn.one_hot(batch["label"], self.num_classes, dtype=jnp.float32)
        return {
            "loss": cross_entropy(logits, targets),
            "top1": topk_correct(logits, batch["label"], 1),
            "top5": topk_correct(logits, batch["label"], self.top_k),
        }

    def serving(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Any:
        """The task's JAX-free serving side: SavedModel outputs and prediction records (serving/)."""
        from clusterformer_jax.data import pipeline
        from clusterformer_jax.serving import classification, preprocess

        names = dataset_info.get("class_names") or [str(c) for c in range(self.num_classes)]
        steps = preprocess.ClassificationPreprocess.from_transform(pipeline.eval_transforms(config["input"]))
        return classification.ClassificationServing(names, steps.constants(), top_k=self.top_k)

    def create_evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator(self.top_k)

    def summary(self, eval_metrics: Mapping[str, Any]) -> dict[str, float]:
        return {key: float(eval_metrics[key]) for key in ("top1", "top5", "loss")}
