"""Quickstart: the nano ClusterFormer on 32x32 scikit-learn digits, a few minutes on one CPU.

python -m clusterformer_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def _common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("clusterformer_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    config = _common().get_config()
    config.model.name = "clusterformer_nano"

    config.input.dataset = "digits"
    config.input.image_size = 32
    config.input.train_augment = "resize"
    config.input.hflip = False

    config.batch_size = 64
    config.num_train_steps = 600
    config.log_every_steps = 50
    config.eval_every_steps = 200
    config.checkpoint.every_steps = 200

    config.optim.base_lr = 2e-3
    config.optim.warmup_steps = 50
    config.optim.grad_clip_norm = 5.0

    config.classification.label_smoothing = 0.0
    config.classification.mixup_alpha = 0.0
    config.classification.cutmix_alpha = 0.0
    return config
