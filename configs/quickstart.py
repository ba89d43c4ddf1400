"""Quickstart: the nano ClusterFormer on 32x32 scikit-learn digits, a few minutes on one CPU.

python -m clusterformer_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    config = common.get_config()
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
