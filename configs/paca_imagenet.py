"""PaCa-ViT on ImageNet-1k with the published timm recipe, or on the quickstart digits.

  python -m clusterformer_jax.main --config=configs/paca_imagenet.py:paca_small \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=MANUAL_DIR --workdir=WORKDIR
  python -m clusterformer_jax.main --config=configs/paca_imagenet.py:paca_tiny,quickstart --workdir=WORKDIR

The argument is MODEL[,quickstart]: paca_tiny / paca_small / paca_base (conv clustering, clusters
100/100/100/0, stage-wise) or an upstream name: pacavit_{tiny,small,base}_p2cconv_100_0,
pacavit_small_p2cmlp_100_0, pacavit_small_p2cconv_{2_0,49_0,49_100,100_49,100,100_blockwise}. Extra
model overrides defined here: --config.model.kwargs.clusters=100,100,100,0,
--config.model.kwargs.onsite=0,0,0,0, --config.model.kwargs.clustering=mlp.

Recipe (upstream iVMCL/PaCaViT, classification/configs/imagenet_vit_adamw.yml): batch 1024 (8 x 128), AdamW
lr 5e-4 per 512 images (1e-3 at 1024), betas (0.9, 0.999), eps 1e-8, weight decay 0.05 (not on biases /
norms), no gradient clipping; 5 warmup epochs from 1e-6, cosine to 1e-5 over 300 epochs (no cooldown).
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0 (prob 1.0, switch 0.5),
label smoothing 0.1, bicubic, flips; eval crop 0.9 bicubic. Drop-path from the presets (T 0.1, S 0.1,
B 0.5). No EMA.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common, quickstart

MODELS = (
    "paca_tiny",
    "paca_small",
    "paca_base",
    "pacavit_tiny_p2cconv_100_0",
    "pacavit_small_p2cconv_100_0",
    "pacavit_base_p2cconv_100_0",
    "pacavit_small_p2cmlp_100_0",
    "pacavit_small_p2cconv_2_0",
    "pacavit_small_p2cconv_49_0",
    "pacavit_small_p2cconv_49_100",
    "pacavit_small_p2cconv_100_49",
    "pacavit_small_p2cconv_100",
    "pacavit_small_p2cconv_100_blockwise",
)


def _add_model_kwargs(config: ml_collections.ConfigDict) -> None:
    config.model.kwargs.clusters = placeholder(tuple)  # per stage; 0 = plain MHSA
    config.model.kwargs.onsite = placeholder(tuple)  # 0 stage-wise, 1 block-wise, k every k blocks
    config.model.kwargs.clustering = placeholder(str)  # 'conv' | 'mlp' | 'linear'
    config.model.kwargs.attn_drop_rate = placeholder(float)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    model, on_digits = common.parse_model_arg(arg, MODELS, "paca_tiny")
    if on_digits:
        config = quickstart.get_config()
        config.model.name = model
        _add_model_kwargs(config)
        return config

    config = common.set_imagenet_input(common.get_config(), eval_crop_pct=0.9)
    config.model.name = model
    _add_model_kwargs(config)

    config.optim.base_lr = 5e-4
    config.optim.lr_base_batch_size = 512
    config.optim.warmup_epochs = 5.0
    config.optim.grad_clip_norm = 0.0
    return config
