"""GroupMixFormer on ImageNet-1k with the published recipe; the config argument picks the model.

  python -m clusterformer_jax.main --config=configs/gmf_imagenet.py:gmf_small \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=MANUAL_DIR --workdir=WORKDIR

Arguments: gmf_miny | gmf_tiny | gmf_small (default) | gmf_base | gmf_large (or miny, tiny, ...).

Recipe (upstream AILab-CVC/GroupMixFormer config.py / train.py, Swin code base): AdamW lr 5e-4 at global batch 512
(scaled linearly with the batch), betas (0.9, 0.999), eps 1e-8, weight decay 0.05 except on biases and 1-D
parameters, gradient clipping 5.0, 300 epochs with 20 linear warm-up epochs from 5e-7, cosine to 5e-6,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0 (switch 0.5), label smoothing
0.1, bicubic inception crop + flip, eval resize 256 -> centre crop 224. No EMA. Drop-path is the preset's
(0.1 / 0.1 / 0.2 / 0.5 / 0.1).
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("gmf_miny", "gmf_tiny", "gmf_small", "gmf_base", "gmf_large")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name = (arg or "gmf_small").strip().lower()
    if not name.startswith("gmf_"):
        name = f"gmf_{name}"
    if name not in VARIANTS:
        raise ValueError(f"config argument must be one of {', '.join(VARIANTS)}, got {arg!r}")
    config = common.set_imagenet_input(common.get_config(), eval_crop_pct=224 / 256)
    config.model.name = name

    config.batch_size = 512  # 8 GPUs x 64
    config.optim.base_lr = 5e-4
    config.optim.lr_base_batch_size = 512
    return config
