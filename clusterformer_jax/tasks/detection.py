"""Object detection and instance segmentation with the cluster decoder (paper §3.3, §4.1.2, §4.1.4).

``config.task``: 'detection' (boxes; evaluated with COCO bbox AP) or 'instance_segmentation' (boxes and
masks; bbox and segm AP). Both read the dense pipeline (things only), build ``DenseModel`` = any registered
backbone (``config.model.name``) + the cluster decoder (``config.model.decoder``), train with Hungarian-matched
set losses on every decoder layer (``config.detection``, tasks/set_losses.py) and keep the ``top_k`` best
(query, class) pairs per image for COCO evaluation (DETR/DINO-style top-k over sigmoid scores, or over the softmax's object classes with
``class_loss='softmax'``; for instance
segmentation a pair's score is its class probability times its mask's mean foreground probability, as
Mask2Former ranks instances). ``detection.aux_semantic_weight`` > 0 adds kMaX's auxiliary semantic loss: a
1x1 head on the decoder's stride-4 pixel features trained with pixel cross-entropy on the dataset's semantic
labels (all classes, things and stuff; datasets without semantic labels, such as COCO instances, mark every
pixel ignored and the term is 0), which gives the pixel features the class evidence the mask-pooled class
head reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.evaluation.coco import BOX_SOURCES, COCOEvaluator
from clusterformer_jax.models.dense_model import DenseModel
from clusterformer_jax.tasks import boxes as box_ops
from clusterformer_jax.tasks.dense_base import DenseInputs, as_dict, backbone_and_decoder, config_section
from clusterformer_jax.tasks.semantic import grid_labels, pixel_cross_entropy
from clusterformer_jax.tasks.set_losses import SetLossConfig, set_criterion

_LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(SetLossConfig))
_PREDICT_FIELDS = ("top_k", "mask_threshold", "eval_backend", "box_source")
_TASK_FIELDS = ("aux_semantic_weight",)


class DetectionTask(DenseInputs):
    """Set prediction of things: boxes (and masks with ``with_masks``) for ``num_thing_classes`` classes."""

    def __init__(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any], *, with_masks: bool):
        self.with_masks = with_masks
        self.num_classes = int(dataset_info["num_thing_classes"])
        if self.num_classes <= 0:
            raise ConfigError(f"dataset {config['input']['dataset']!r} has no thing classes to detect")
        self.image_size = int(dataset_info["image_size"])
        self.category_ids = tuple(dataset_info["category_ids"])[: self.num_classes]
        self.class_names = tuple(dataset_info["class_names"])[: self.num_classes]
        self.instances_json = dataset_info.get("instances_json")
        model = config["model"]
        self.decoder_fields = as_dict(model.get("decoder"))
        det = config_section(config, "detection", _PREDICT_FIELDS + _TASK_FIELDS, optional=_LOSS_FIELDS)
        loss = {k: v for k, v in det.items() if k in _LOSS_FIELDS}
        loss["use_masks"] = with_masks
        try:
            self.loss_config = SetLossConfig(**loss)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.detection: {e}") from None
        self.num_semantic_classes = int(dataset_info["num_classes"])
        self.aux_semantic_weight = float(det["aux_semantic_weight"])
        if self.aux_semantic_weight < 0:
            raise ConfigError(f"detection.aux_semantic_weight must be >= 0, got {self.aux_semantic_weight}")
        self.top_k = int(det["top_k"])
        self.mask_threshold = float(det["mask_threshold"])
        self.eval_backend = str(det["eval_backend"])
        if self.top_k <= 0:
            raise ConfigError(f"detection.top_k must be positive, got {self.top_k}")
        self.box_source = str(det["box_source"])
        if self.box_source not in BOX_SOURCES:
            raise ConfigError(f"detection.box_source must be one of {BOX_SOURCES}, got {self.box_source!r}")
        if self.box_source == "mask" and not with_masks:
            raise ConfigError("detection.box_source='mask' needs predicted masks: use it for instance_segmentation")

    # ----------------------------------------------------------------------------------------- model
    def build_model(self, model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
        backbone, decoder = backbone_and_decoder(model_name, model_kwargs, self.decoder_fields)
        return DenseModel(
            backbone=backbone,
            decoder=decoder,
            num_classes=self.num_classes,
            void_class=self.loss_config.void_class,
            semantic_classes=self.num_semantic_classes if self.aux_semantic_weight > 0 else 0,
        )

    # ----------------------------------------------------------------------------------------- training
    def targets(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The criterion's targets: things that are not crowd regions, boxes normalised to the canvas."""
        classes = batch["classes"].astype(jnp.int32)
        valid = batch["instance_valid"] & ~batch["is_crowd"] & (classes >= 0) & (classes < self.num_classes)
        canvas = batch["image"].shape[1:3]
        return {
            "classes": jnp.where(valid, classes, -1),
            "boxes": box_ops.yxyx_pixels_to_cxcywh(batch["boxes"], canvas),
            "masks": batch["instance_masks"].astype(jnp.float32),
            "valid": valid,
        }

    def loss_fn(
        self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, terms = set_criterion(outputs, self.targets(batch), rng, self.loss_config)
        if self.aux_semantic_weight > 0:
            logits = outputs["semantic_logits"]
            labels = grid_labels(batch["semantic"], logits.shape[1:3])
            terms["loss_semantic"] = self.aux_semantic_weight * pixel_cross_entropy(logits, labels)
            loss = loss + terms["loss_semantic"]
        return loss, {"loss": loss, **{k: v for k, v in terms.items() if k in self._term_names()}}

    def _term_names(self) -> tuple[str, ...]:
        names = ("loss_class", "loss_bbox", "loss_giou", "loss_aux", "num_targets")
        names += ("loss_semantic",) if self.aux_semantic_weight > 0 else ()
        return names + (("loss_mask", "loss_dice") if self.with_masks else ())

    def train_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        return {name: clu_metrics.Average.from_output(name) for name in ("loss",) + self._term_names()}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The ``top_k`` (query, class) pairs of the last decoder layer with canvas-pixel boxes (and masks)."""
        logits = outputs["class_logits"][-1].astype(jnp.float32)
        if self.loss_config.void_class:
            probs = jax.nn.softmax(logits, axis=-1)[..., :-1]
        else:
            probs = jax.nn.sigmoid(logits)
        b, q, c = probs.shape
        k = min(self.top_k, q * c)
        scores, flat = jax.lax.top_k(probs.reshape(b, q * c), k)
        query, labels = flat // c, flat % c
        boxes = jnp.take_along_axis(outputs["boxes"][-1], query[..., None], axis=1)
        result = {
            "boxes": box_ops.cxcywh_to_yxyx_pixels(boxes, batch["image"].shape[1:3]),
            "scores": scores,
            "labels": labels.astype(jnp.int32),
        }
        if self.with_masks:
            masks = jax.nn.sigmoid(
                jnp.take_along_axis(outputs["mask_logits"][-1], query[..., None, None], axis=1).astype(jnp.float32)
            )
            inside = masks > self.mask_threshold
            mask_score = jnp.sum(masks * inside, axis=(2, 3)) / (jnp.sum(inside, axis=(2, 3)) + 1e-6)
            result["scores"] = scores * mask_score
            result["masks"] = jnp.round(masks * 255.0).astype(jnp.uint8)
        return result

    def serving(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Any:
        """The task's JAX-free serving side: SavedModel outputs and prediction records (serving/)."""
        from clusterformer_jax.data import dense_pipeline
        from clusterformer_jax.serving import instances, preprocess

        steps = preprocess.DensePreprocess.from_transform(dense_pipeline.eval_transform(config["input"]))
        return instances.InstanceServing(
            self.class_names, self.category_ids, steps.constants(), self.with_masks, self.mask_threshold,
            self.box_source,
        )  # fmt: skip

    def create_evaluator(self) -> COCOEvaluator:
        if not self.instances_json:
            raise ConfigError(
                "the eval split has no COCO instances json to score against; set config.input.manual_dir to the "
                "COCO folder holding annotations/instances_val2017.json"
            )
        return COCOEvaluator(
            self.instances_json,
            self.category_ids,
            iou_types=("bbox", "segm") if self.with_masks else ("bbox",),
            backend=self.eval_backend,
            max_detections=self.top_k,
            mask_threshold=self.mask_threshold,
            box_source=self.box_source,
        )

    def summary(self, eval_metrics: Mapping[str, Any]) -> dict[str, float]:
        types = ("bbox", "segm") if self.with_masks else ("bbox",)
        stats = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        return {f"{t}_{s}": float(eval_metrics[f"{t}_{s}"]) for t in types for s in stats}


def detection_task(config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> DetectionTask:
    return DetectionTask(config, dataset_info, with_masks=False)


def instance_segmentation_task(config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> DetectionTask:
    return DetectionTask(config, dataset_info, with_masks=True)
