"""Context Cluster on ImageNet-1k with the published timm recipe, or on the quickstart digits.

  python -m clusterformer_jax.main --config=configs/coc_imagenet.py:coc_small \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=MANUAL_DIR --workdir=WORKDIR
  python -m clusterformer_jax.main --config=configs/coc_imagenet.py:coc_tiny2,quickstart --workdir=WORKDIR

The argument is MODEL[,quickstart], MODEL one of coc_tiny, coc_tiny2, coc_tiny_plain, coc_small, coc_medium,
coc_base_dim64, coc_base_dim96. Extra model overrides defined here: --config.model.kwargs.folds=8,4,2,1,
--config.model.kwargs.proposals=2,2,2,2, --config.model.kwargs.denominator=count.

Recipe (upstream ma-xu/Context-Cluster, train.py defaults + README): AdamW lr 1e-3 per 1024 images (8 x 128),
weight decay 0.05 (not on biases / norms / layer scales), eps 1e-8, no gradient clipping; 5 warmup epochs from
1e-6, cosine to 1e-6. timm runs 300 epochs plus 10 cooldown epochs at the minimum lr; this trainer has no
flat cooldown, so the cosine spans all 310. RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
Mixup 0.8 / CutMix 1.0 (prob 1.0, switch 0.5), label smoothing 0.1, flips; eval bicubic, crop 0.9.
Drop-path 0.1 (the model presets). Deviations the trainer imposes: train interpolation bicubic (timm:
random), and the 1-element sim_alpha / sim_beta are decayed (timm exempts every 1-D parameter).

Quickstart: configs/quickstart.py with this model (32x32 digits, stage maps 8/4/2/1); coc_tiny2's folds
(7, 7, 1, 1) do not divide those maps, so it runs with folds (1, 1, 1, 1).
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common, quickstart

MODELS = ("coc_tiny", "coc_tiny2", "coc_tiny_plain", "coc_small", "coc_medium", "coc_base_dim64", "coc_base_dim96")
QUICKSTART_FOLDS = {"coc_tiny2": (1, 1, 1, 1)}


def _add_model_kwargs(config: ml_collections.ConfigDict) -> None:
    config.model.kwargs.folds = placeholder(tuple)
    config.model.kwargs.proposals = placeholder(tuple)
    config.model.kwargs.denominator = placeholder(str)  # 'similarity' (current) | 'count' (before 2023-05-31)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    model, on_digits = common.parse_model_arg(arg, MODELS, "coc_tiny")
    if on_digits:
        config = quickstart.get_config()
        config.model.name = model
        _add_model_kwargs(config)
        config.model.kwargs.folds = QUICKSTART_FOLDS.get(model)
        return config

    config = common.set_imagenet_input(common.get_config(), eval_crop_pct=0.9)
    config.model.name = model
    _add_model_kwargs(config)

    config.num_epochs = 310.0
    config.optim.lr_base_batch_size = 1024
    config.optim.warmup_epochs = 5.0
    config.optim.min_lr_ratio = 1e-3  # min-lr 1e-6
    config.optim.grad_clip_norm = 0.0
    return config
