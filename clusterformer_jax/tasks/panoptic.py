"""Panoptic segmentation (paper §4.1.5): things and stuff as clusters of the cluster decoder.

``config.task = 'panoptic_segmentation'`` reads the dense pipeline with every segment as a target (things and
stuff, ``instance_targets='all'``). The model is ``DenseModel`` with C + 1 softmax class logits (the last is
"no object"), mask logits, no boxes, and the decoder's stride-4 pixel embeddings plus an auxiliary semantic
head for kMaX's instance-discrimination and semantic losses. Loss: Eq. 7, λth L_th + λst L_st + λaux L_aux
with (5, 3, 1) (``tasks/panoptic_losses.py``; ``config.panoptic`` sets its fields). Targets are sampled at the
centres of the mask-logit grid's cells. Prediction: kMaX's post-processing (``panoptic_postprocess.py``,
thresholds from ``config.panoptic``) on the final layer, after upsampling the mask logits by
``upsample`` (1: the stride-4 grid; 4: the canvas), into segment-id maps + per-segment classes and scores that
the evaluator scores with PQ / SQ / RQ, mAP^Th_pan and mIoU_pan against the COCO panoptic ground truth.
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
from clusterformer_jax.evaluation.panoptic import PanopticEvaluator
from clusterformer_jax.models.dense_model import DenseModel
from clusterformer_jax.tasks.dense_base import DenseInputs, as_dict, backbone_and_decoder, config_section
from clusterformer_jax.tasks.panoptic_losses import TERMS, PanopticLossConfig, panoptic_criterion
from clusterformer_jax.tasks.panoptic_postprocess import panoptic_postprocess_batch
from clusterformer_jax.tasks.semantic import grid_labels

_LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(PanopticLossConfig))
_POST_FIELDS = (
    "thing_threshold",
    "stuff_threshold",
    "pixel_threshold",
    "overlap_threshold",
    "min_thing_area",
    "min_stuff_area",
)
_OTHER_FIELDS = ("upsample", "eval_backend", "compute_ap")


class PanopticTask(DenseInputs):
    """Things and stuff of ``num_classes`` classes (COCO panoptic: 80 + 53) as decoder clusters."""

    def __init__(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]):
        self.num_classes = int(dataset_info["num_classes"])
        self.is_thing = tuple(bool(t) for t in dataset_info["is_thing"])
        self.image_size = int(dataset_info["image_size"])
        self.category_ids = tuple(dataset_info["category_ids"])
        self.panoptic_json = dataset_info.get("panoptic_json")
        self.panoptic_png_dir = dataset_info.get("panoptic_png_dir")
        self.instances_json = dataset_info.get("instances_json")
        self.decoder_fields = as_dict(config["model"].get("decoder"))
        section = config_section(config, "panoptic", _POST_FIELDS + _OTHER_FIELDS, optional=_LOSS_FIELDS)
        try:
            self.loss_config = PanopticLossConfig(**{k: v for k, v in section.items() if k in _LOSS_FIELDS})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.panoptic: {e}") from None
        self.post = {k: section[k] for k in _POST_FIELDS}
        self.upsample = int(section["upsample"])
        if self.upsample not in (1, 2, 4):
            raise ConfigError(f"config.panoptic.upsample={self.upsample}: use 1 (stride-4 grid), 2 or 4 (canvas)")
        self.eval_backend = str(section["eval_backend"])
        self.compute_ap = bool(section["compute_ap"])

    # ----------------------------------------------------------------------------------------- model
    def build_model(self, model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
        backbone, decoder = backbone_and_decoder(model_name, model_kwargs, self.decoder_fields)
        return DenseModel(
            backbone=backbone,
            decoder=decoder,
            num_classes=self.num_classes,
            void_class=True,
            with_boxes=False,
            semantic_classes=self.num_classes,
            mask_activation="softmax",  # kMaX's masks: a softmax over the queries, as the loss and post-processing
        )

    # ----------------------------------------------------------------------------------------- training
    def targets(self, batch: Mapping[str, jax.Array], grid: tuple[int, int]) -> dict[str, jax.Array]:
        """Segments (crowd regions excluded: their pixels are void) at the centres of the h x w grid's cells."""
        classes = batch["classes"].astype(jnp.int32)
        valid = batch["instance_valid"] & ~batch["is_crowd"] & (classes >= 0) & (classes < self.num_classes)
        b, m = classes.shape
        masks = batch["instance_masks"]
        masks = grid_labels(masks.reshape(b * m, *masks.shape[2:]), grid).reshape(b, m, *grid)
        masks = masks.astype(jnp.float32) * valid[:, :, None, None]
        return {
            "classes": jnp.where(valid, classes, -1),
            "masks": masks,
            "valid": valid,
            "is_thing": batch["is_thing"] & valid,
            "semantic": grid_labels(batch["semantic"], grid),
            "pixel_valid": grid_labels(batch["image_mask"], grid),
        }

    def loss_fn(
        self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        grid = outputs["mask_logits"].shape[-2:]
        loss, terms = panoptic_criterion(outputs, self.targets(batch, grid), rng, self.loss_config)
        return loss, {"loss": loss, **terms}

    def train_metric_fields(self) -> dict[str, type[clu_metrics.Metric]]:
        names = ("loss",) + TERMS + ("loss_aux_layers", "num_targets")
        return {name: clu_metrics.Average.from_output(name) for name in names}

    # ----------------------------------------------------------------------------------------- evaluation
    def predict(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """'panoptic' int32 (B, h, w) segment ids (query index + 1, 0 void) on the grid upsampled by
        ``upsample``, 'segment_classes' int32 (B, Q) (-1 none) and 'segment_scores' float32 (B, Q)."""
        probs = jax.nn.softmax(outputs["class_logits"][-1].astype(jnp.float32), axis=-1)
        masks = outputs["mask_logits"][-1].astype(jnp.float32)
        if self.upsample > 1:
            b, q, h, w = masks.shape
            masks = jax.image.resize(masks, (b, q, h * self.upsample, w * self.upsample), "bilinear")
        result = panoptic_postprocess_batch(probs, masks, self.is_thing, **self.post)
        return {
            "panoptic": result["panoptic"].astype(jnp.int32),
            "segment_classes": result["segment_classes"].astype(jnp.int32),
            "segment_scores": result["segment_scores"].astype(jnp.float32),
        }

    def serving(self, config: Mapping[str, Any], dataset_info: Mapping[str, Any]) -> Any:
        """The task's JAX-free serving side: SavedModel outputs and prediction records (serving/)."""
        from clusterformer_jax.data import dense_pipeline
        from clusterformer_jax.serving import preprocess, segmentation

        steps = preprocess.DensePreprocess.from_transform(dense_pipeline.eval_transform(config["input"]))
        names = dataset_info["class_names"]
        return segmentation.PanopticServing(names, self.category_ids, self.is_thing, steps.constants())

    def create_evaluator(self) -> PanopticEvaluator:
        if not (self.panoptic_json and self.panoptic_png_dir):
            raise ConfigError(
                "the eval split has no COCO panoptic json/PNGs to score against; set config.input.manual_dir to "
                "the COCO folder holding annotations/panoptic_val2017.json and annotations/panoptic_val2017/"
            )
        return PanopticEvaluator(
            self.panoptic_json,
            self.panoptic_png_dir,
            self.category_ids,
            backend=self.eval_backend,
            instances_json=self.instances_json,
            compute_ap=self.compute_ap,
        )

    def summary(self, eval_metrics: Mapping[str, Any]) -> dict[str, float]:
        names = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU_pan", "mAP_th_pan")
        return {name: float(eval_metrics[name]) for name in names if name in eval_metrics}
