"""Semantic segmentation (paper §4.1.3): one cluster center per class, each pixel's class from its
center-pixel assignment.

``config.task = 'semantic_segmentation'`` reads the dense pipeline's 'semantic' label map (255 = ignore:
padding, void, and ADE20K's reduce-zero-label). ``config.semantic.head`` picks the head over any registered
backbone:
  'cluster'  the cluster decoder with ``num_queries`` = the number of classes and no class/box heads: query k
             is the center of class k, and a pixel's K logits are its similarities to the K centers (the
             decoder's mask logits), so its class is the argmax of the center-pixel assignment (a softmax
             over the K centers, as the E-step's). Loss per decoder layer (deep supervision, summed):
             ``ce_weight`` (5) x pixel cross-entropy + ``dice_weight`` (1) x dice of each class's softmax map,
             the paper's weights.
  'paca'     PaCa-ViT's segmentation head (models/paca_vit.PaCaSegHead) with its published loss: CE on the
             logits + 0.4 x CE on the cluster logits (``paca_aux_weight``).
Both compute the loss at the stride-4 feature grid against labels sampled at the grid cells' centres (the
pipeline's convention for instance masks), which keeps memory independent of the class count x image size
(mmseg upsamples the logits to the label size instead); prediction returns the stride-4 logits and the
evaluator resizes them bilinearly to each image's original size before the argmax.

``config.semantic.inference``: 'whole' (the paper's, mmseg's whole-image test: one forward pass over the eval
canvas) or 'slide' (mmseg's sliding window, ``slide_crop`` / ``slide_stride`` as (h, w)): `SlidingWindow`
runs the model on crop-sized windows and averages the logits of the windows covering each stride-4 cell.
``config.semantic.source_size_ground_truth``: on ADE20K, score mIoU at each image's original size against
the annotation PNGs under ``config.input.manual_dir`` (data/ade20k.SourceLabels), as mmseg does; without
them, or when False, at the eval canvas against the pipeline's label map.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from clu import metrics as clu_metrics

from clusterformer_jax.data import ade20k
from clusterformer_jax.data.dense_transforms import IGNORE_LABEL
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.evaluation.semantic import SemanticEvaluator
from clusterformer_jax.models.dense_model import DenseModel, HeadModel
from clusterformer_jax.models.paca_vit import PaCaSegHead
from clusterformer_jax.tasks.dense_base import DenseInputs, as_dict, backbone_and_decoder, config_section
from clusterformer_jax.tasks.dice import dice_loss
from clusterformer_jax.tasks.sliding_window import SlidingWindow

HEADS = ("cluster", "paca")
INFERENCE = ("whole", "slide")
# config.semantic's fields (their values: configs/dense.py, semantic_config())
FIELDS = (
    "head",
    "ce_weight",
    "dice_weight",
    "paca_channels",
    "paca_dropout",
    "paca_aux_weight",
    "inference",
    "slide_crop",
    "slide_stride",
    "source_size_ground_truth",
)


def _pair(options: Mapping[str, Any], name: str) -> tuple[int, int]:
    """config.semantic.<name> as (h, w) positive ints (an int means a square)."""
    value = options[name]
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"config.semantic.{name}={value!r}: give (height, width) as positive ints")
    return int(pair[0]), int(pair[1])


def grid_labels(labels: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, S, S') label map -> (B, h, w) labels at the centres of the (S/h x S'/w) cells of an h x w grid."""
    b, s0, s1 = labels.shape
    if s0 % grid[0] or s1 % grid[1]:
        raise ConfigError(f"label map {s0}x{s1} is not a multiple of the {grid[0]}x{grid[1]} logit grid")
    r0, r1 = s0 // grid[0], s1 // grid[1]
    return labels[:, r0 // 2 :: r0, r1 // 2 :: r1]


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Mean cross-entropy over the non-ignored pixels: logits (..., h, w, K), labels (..., h, w)."""
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def class_dice(logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Mean over (image, class) of the dice loss between the class's softmax map and its one-hot label map,
    over the non-ignored pixels: logits (B, h, w, K), labels (B, h, w)."""
    valid = (labels != ignore_label)[..., None]
    probs = jnp.where(valid, jax.nn.softmax(logits, -1), 0.0)
    onehot = jax.nn.one_hot(jnp.where(valid[..., 0], labels, -1), logits.shape[-1], dtype=jnp.float32)
    return jnp.mean(dice_loss(probs, onehot, axis=(1, 2)))


def layer_logits(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """(L, B, h, w, K) per-layer logits of either head: the cluster decoder's mask logits of its L layers, or
    PaCa's 'logits' as one layer."""
    if "logits" in outputs:
        return outputs["logits"][None]
    return jnp.moveaxis(outputs["mask_logits"], 2, -1)


def final_logits(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """(B, h, w, K) final-layer logits of either head."""
    return layer_logits(outputs)[-1]


class SemanticTask(DenseInputs):
    """Per-pixel classification over ``num_classes`` classes (ADE20K: 150) with a cluster or PaCa head."""

    def __init__(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]):
        self.num_classes = int(dataset_info["num_classes"])
        self.image_size = int(dataset_info["image_size"])
        self.class_names = tuple(dataset_info["class_names"])
        self.options = config_section(config, "semantic", FIELDS)
        if self.options["head"] not in HEADS:
            raise ConfigError(f"config.semantic.head={self.options['head']!r}: use one of {HEADS}")
        if self.options["inference"] not in INFERENCE:
            raise ConfigError(f"config.semantic.inference={self.options['inference']!r}: use one of {INFERENCE}")
        self.slide_crop, self.slide_stride = (_pair(self.options, name) for name in ("slide_crop", "slide_stride"))
        if any(s > c for s, c in zip(self.slide_stride, self.slide_crop)):
            raise ConfigError(
                f"config.semantic.slide_stride={self.slide_stride} exceeds slide_crop={self.slide_crop}: "
                "windows would leave gaps"
            )
        self.input_fields = as_dict(config.get("input"))
        model = config["model"]
        self.decoder_fields = as_dict(model.get("decoder"))
        if self.options["head"] == "cluster":
            queries = self.decoder_fields.get("num_queries")
            if queries != self.num_classes:
                raise ConfigError(
                    f"config.model.decoder.num_queries={queries} but the dataset has {self.num_classes} classes; "
                    f"semantic segmentation uses one cluster center per class: set it to {self.num_classes}"
                )
            if self.decoder_fields.get("query_init") == "encoder_centers":
                raise ConfigError(
                    "config.model.decoder.query_init='encoder_centers' gives no fixed center per class; use 'free' "
                    "(learned class centers) or 'scene_adaptive' for semantic segmentation"
                )

    # ----------------------------------------------------------------------------------------- model
    def build_model(self, model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
        paca = self.options["head"] == "paca"
        backbone, decoder = backbone_and_decoder(model_name, model_kwargs, None if paca else self.decoder_fields)
        if paca:
            head = PaCaSegHead(
                self.num_classes, int(self.options["paca_channels"]), float(self.options["paca_dropout"])
            )
            model = HeadModel(backbone=backbone, head=head)
        else:
            model = DenseModel(backbone=backbone, decoder=decoder, num_classes=0)
        if self.options["inference"] == "slide":
            return SlidingWindow(model, self.num_classes, final_logits, self.slide_crop, self.slide_stride)
        return model

    def pixel_logits(self, outputs: Mapping[str, jax.Array]) -> jax.Array:
        """Per-layer (L, B, h, w, K) logits of the cluster head, or (1, B, h, w, K) of the PaCa head."""
        return layer_logits(outputs)

    # ----------------------------------------------------------------------------------------- training
    def loss_fn(
        self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = self.pixel_logits(outputs).astype(jnp.float32)
        labels = grid_labels(batch["semantic"], logits.shape[2:4])
        if self.options["head"] == "paca":
            ce = pixel_cross_entropy(logits[0], labels)
            aux = self.options["paca_aux_weight"] * pixel_cross_entropy(outputs["cluster_logits"], labels)
            loss = ce + aux
            return loss, {"loss": loss, "loss_ce": ce, "loss_dice": jnp.zeros(()), "loss_aux": aux}
        ce_w, dice_w = self.options["ce_weight"], self.options["dice_weight"]
        per_layer = jax.vmap(lambda x: (ce_w * pixel_cross_entropy(x, labels), dice_w * class_dice(x, labels)))(logits)
        ce, dice = per_layer
        loss = jnp.sum(ce) + jnp.sum(dice)
        aux = jnp.sum(ce[:-1]) + jnp.sum(dice[:-1])
        return loss, {"loss": loss, "loss_ce": ce[-1], "loss_dice": dice[-1], "loss_aux": aux}

    def train_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        names = ("loss", "loss_ce", "loss_dice", "loss_aux")
        return {name: clu_metrics.Average.from_output(name) for name in names}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """'semantic_logits' float32 (B, h, w, K): the final logits on the stride-4 grid of the canvas (whole
        image, or `SlidingWindow`'s averaged windows); the evaluator resizes them bilinearly to the ground
        truth's size before the argmax (mmseg)."""
        if "semantic_logits" in outputs:
            return {"semantic_logits": outputs["semantic_logits"].astype(jnp.float32)}
        return {"semantic_logits": final_logits(outputs).astype(jnp.float32)}

    def source_ground_truth(self) -> Callable[[int], Any] | None:
        """image id -> source-size label map for the eval split, or None (score at the canvas): ADE20K's
        annotation PNGs under ``config.input.manual_dir`` (folder or zip) when ``source_size_ground_truth``."""
        if not self.options["source_size_ground_truth"] or self.input_fields.get("dataset") != "ade20k":
            return None
        manual_dir = self.input_fields.get("manual_dir")
        split = str(self.input_fields["eval_split"]).split("[")[0]
        labels = ade20k.source_labels(os.path.expanduser(manual_dir), split) if manual_dir else None
        if labels is None:
            logging.warning(
                "semantic: no ADE20K annotations for split %r under config.input.manual_dir=%r; mIoU is scored "
                "at the eval canvas, not at the original image size",
                split,
                manual_dir,
            )
        return labels

    def serving(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Any:
        """The task's JAX-free serving side: SavedModel outputs and prediction records (serving/)."""
        from clusterformer_jax.data import dense_pipeline
        from clusterformer_jax.serving import preprocess, segmentation

        steps = preprocess.DensePreprocess.from_transform(dense_pipeline.eval_transform(config["input"]))
        return segmentation.SemanticServing(self.class_names, steps.constants())

    def create_evaluator(self) -> SemanticEvaluator:
        return SemanticEvaluator(
            self.num_classes,
            ignore_label=IGNORE_LABEL,
            class_names=self.class_names,
            ground_truth=self.source_ground_truth(),
        )

    def summary(self, eval_metrics: Mapping[str, Any]) -> dict[str, float]:
        return {name: float(eval_metrics[name]) for name in ("mIoU", "mAcc", "aAcc")}
