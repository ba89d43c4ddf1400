"""The ClusterFormer ImageNet-1k recipes, shared by clusterformer_{tiny,small}_imagenet.py.

'paper' (default): the paper's recipe (Swin/DeiT style) - AdamW lr 1e-3 at batch 1024, weight decay 0.05
(not on biases/norms), 300 epochs, 20 warmup epochs, cosine, gradient clipping 5.0, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, inception crop +
flip, eval resize 248 -> centre crop 224.

'official': the released mmcls configs - AMSGrad AdamW, lr 1.25e-4 at batch 256 (tiny) / 1e-4 at batch 512
(small), weight decay on every parameter, warmup from 1e-3 of the lr, cosine to 1e-4 (tiny) / 1e-2 (small)
of it, no Mixup / CutMix / label smoothing, and the '_official' model preset.
"""

from __future__ import annotations

import ml_collections

from configs import common

_OFFICIAL = {
    # variant: (batch size, lr, min lr ratio)
    "tiny": (256, 1.25e-4, 1e-4),
    "small": (512, 1e-4, 1e-2),
}


def imagenet_config(variant: str, arg: str | None) -> ml_collections.ConfigDict:
    """The recipe for model ``clusterformer_{variant}``; ``arg`` is None/'paper' or 'official'."""
    recipe = (arg or "paper").strip().lower()
    if recipe not in ("paper", "official"):
        raise ValueError(f"config argument must be 'paper' or 'official', got {arg!r}")
    config = common.set_imagenet_input(common.get_config(), eval_crop_pct=224 / 248)
    config.model.name = f"clusterformer_{variant}"

    config.optim.lr_base_batch_size = 1024

    if recipe == "official":
        batch, lr, min_ratio = _OFFICIAL[variant]
        config.model.name = f"clusterformer_{variant}_official"
        config.batch_size = batch
        config.optim.base_lr = lr
        config.optim.lr_base_batch_size = batch
        config.optim.amsgrad = True
        config.optim.weight_decay_mask = "all"
        config.optim.min_lr_ratio = min_ratio
        config.optim.warmup_start_ratio = 1e-3
        config.classification.label_smoothing = 0.0
        config.classification.mixup_alpha = 0.0
        config.classification.cutmix_alpha = 0.0
    return config
