"""The task seam stays open: a new task -- a per-pixel depth-like regression on the shapes -- with its dataset,
model, ``Task``, evaluator and config all defined in this file, registered through the public tables
(``dense_datasets.register_dataset``, ``models.registry.register_model``, ``tasks.registry.register_task``) and
trained through ``trainers.trainer.train_and_evaluate`` with no package file changed for it.

The toy target: things stand in front of the landscape, so 'depth' is 1 on circles, squares and triangles and
3 on sky, grass and water; the dense rendering carries it like any per-pixel map (``PixelMap``), through the
same scale jitter, crop and flip as the image.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from clu import metrics as clu_metrics

from clusterformer_jax.data import dense_datasets, dense_pipeline
from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.data.dense_transforms import PixelMap
from clusterformer_jax.evaluation.base import real_rows
from clusterformer_jax.evaluation.gather import sum_across_processes
from clusterformer_jax.models import registry as model_registry
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.tasks.dense_base import DenseInputs
from clusterformer_jax.trainers import trainer
from tests import load_config

NEAR, FAR, PAD = 1.0, 3.0, -1.0
STEPS = 6


# ---------------------------------------------------------------------------------------------- the dataset


def depth_decode(record):
    """A shapes record -> its dense example plus the toy 'depth' map (source pixels)."""
    example = shapes_lib.decode(record)
    example["depth"] = np.where(example["semantic"] < shapes_lib.NUM_THING_CLASSES, NEAR, FAR).astype(np.float32)
    return example


def open_shapes_depth(cfg):
    builder, _ = dense_datasets.DATASETS["shapes"].open(cfg)
    return builder, depth_decode


dense_datasets.register_dataset(
    "shapes_depth",
    dataclasses.replace(
        dense_datasets.DATASETS["shapes"],
        open=open_shapes_depth,
        eval_files=None,
        pixel_maps={"depth": PixelMap(np.float32, PAD)},
    ),
)


# ------------------------------------------------------------------------------ the model, task, evaluator


class DepthNet(nn.Module):
    """Two convolutions: (B, H, W, 3) images -> (B, H, W) depth."""

    width: int = 8

    @nn.compact
    def __call__(self, images, pixel_mask, train=False):
        del pixel_mask, train
        x = nn.relu(nn.Conv(self.width, (3, 3))(images))
        return nn.Conv(1, (1, 1), bias_init=nn.initializers.constant(2.0))(x)[..., 0]


model_registry.register_model("toy_depth_net", DepthNet)


class DepthEvaluator:
    """RMSE over the image pixels of the real rows; keeps every pass's result in ``HISTORY``."""

    HISTORY: list[dict[str, float]] = []

    def __init__(self):
        self.totals = np.zeros(3)  # squared error, pixels, examples

    def update(self, predictions, batch):
        for row in real_rows(batch, len(batch["image"])):
            valid = np.asarray(batch["image_mask"][row], bool)
            target = np.asarray(batch["depth"][row])[valid]
            assert set(np.unique(target)) <= {NEAR, FAR}, "the rendered map left its values"
            error = np.asarray(predictions["depth"][row])[valid] - target
            self.totals += (float(np.sum(error**2)), valid.sum(), 1)

    def compute(self):
        squared, pixels, examples = sum_across_processes(self.totals)
        result = {"rmse": math.sqrt(squared / pixels), "num_examples": int(examples)}
        DepthEvaluator.HISTORY.append(result)
        return result


class DepthTask(DenseInputs):
    """Per-pixel regression of the 'depth' map: mean squared error over image pixels."""

    def __init__(self, config, dataset_info):
        self.image_size = int(dataset_info["image_size"])

    def build_model(self, model_name, model_kwargs):
        return model_registry.create_model(model_name, **model_kwargs)

    def loss_fn(self, outputs, batch, rng):
        valid = batch["image_mask"]
        squared = jnp.where(valid, (outputs - batch["depth"]) ** 2, 0.0)
        loss = jnp.sum(squared) / jnp.maximum(jnp.sum(valid), 1)
        return loss, {"loss": loss}

    def train_metric_fields(self):
        return {"loss": clu_metrics.Average.from_output("loss")}

    def predict(self, outputs, batch):
        return {"depth": outputs}

    def create_evaluator(self):
        return DepthEvaluator()

    def summary(self, eval_metrics):
        return {"rmse": float(eval_metrics["rmse"])}


task_registry.register_task("toy_depth", DepthTask, dense_pipeline)


def depth_config(data_dir: str) -> ml_collections.ConfigDict:
    """The shared defaults (configs/common.py) with the toy task, dataset and model: 64 px shapes, 8 images a
    step, evaluated after every step."""
    config = load_config("common.py")
    config.task = "toy_depth"
    config.model.name = "toy_depth_net"
    config.model.kwargs = ml_collections.ConfigDict()
    config.input = ml_collections.ConfigDict(
        dict(
            dataset="shapes_depth",
            data_dir=data_dir,
            shapes_variant="small",  # 48 train / 16 validation images
            train_crop_size=64,
            eval_pad_size=64,
            eval_short_side=64,
            eval_max_size=64,
            max_instances=4,
        )
    )
    config.batch_size = 8
    config.num_train_steps = STEPS
    config.log_every_steps = STEPS
    config.eval_every_steps = 1
    config.checkpoint.every_steps = STEPS
    config.checkpoint.async_save = False
    config.optim.base_lr = 3e-2
    config.optim.warmup_steps = 0
    config.optim.weight_decay = 0.0
    return config


def test_the_dataset_table_renders_a_new_per_pixel_map_aligned_with_the_labels(shapes_dir):
    cfg = depth_config(shapes_dir).input
    batch = next(dense_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=8))  # scale, crop, flip
    image, semantic, depth = batch["image_mask"], batch["semantic"], batch["depth"]
    assert depth.shape == (8, 64, 64) and depth.dtype == np.float32
    np.testing.assert_array_equal(depth[~image], PAD)
    np.testing.assert_array_equal(depth[image], np.where(semantic[image] < 3, NEAR, FAR))
    assert (depth[image] == NEAR).any() and (depth[image] == FAR).any()
    assert dense_pipeline.example_spec(cfg, eval_mode=True)["depth"].shape == (64, 64)


def test_a_task_defined_outside_the_package_trains_and_evaluates(shapes_dir, tmp_path):
    DepthEvaluator.HISTORY.clear()
    result = trainer.train_and_evaluate(depth_config(shapes_dir), str(tmp_path / "run"))

    assert result["steps"] == STEPS and result["eval_num_examples"] == 16  # the small variant's validation split
    history = DepthEvaluator.HISTORY
    assert len(history) == STEPS  # after steps 1..5, and the final one
    assert all(h["num_examples"] == 16 for h in history)
    assert result["rmse"] == pytest.approx(history[-1]["rmse"])
    assert history[-1]["rmse"] < 0.8 * history[0]["rmse"], [h["rmse"] for h in history]
    assert jax.tree.leaves(result)  # results.json-able numbers
    assert (tmp_path / "run" / "results.json").exists()
