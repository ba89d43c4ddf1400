"""GroupMixFormer on ImageNet-1k with the published recipe; the config argument picks the model.

  python -m clusterformer_jax.main --config=configs/gmf_imagenet.py:gmf_small \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=MANUAL_DIR --workdir=WORKDIR

Arguments: gmf_miny | gmf_tiny | gmf_small (default) | gmf_base | gmf_large (or miny, tiny, ...).

Recipe (upstream config.py / train.py, Swin code base; seed_systems.md §5.4): AdamW lr 5e-4 at global batch 512
(scaled linearly with the batch), betas (0.9, 0.999), eps 1e-8, weight decay 0.05 except on biases and 1-D
parameters, gradient clipping 5.0, 300 epochs with 20 linear warm-up epochs from 5e-7, cosine to 5e-6,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0 (switch 0.5), label smoothing
0.1, bicubic inception crop + flip, eval resize 256 -> centre crop 224. No EMA. Drop-path is the preset's
(0.1 / 0.1 / 0.2 / 0.5 / 0.1).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

VARIANTS = ('gmf_miny', 'gmf_tiny', 'gmf_small', 'gmf_base', 'gmf_large')


def _common():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py')
  spec = importlib.util.spec_from_file_location('clusterformer_configs_common', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = (arg or 'gmf_small').strip().lower()
  if not name.startswith('gmf_'):
    name = f'gmf_{name}'
  if name not in VARIANTS:
    raise ValueError(f"config argument must be one of {', '.join(VARIANTS)}, got {arg!r}")
  config = _common().get_config()
  config.model.name = name

  config.input.dataset = 'imagenet2012'
  config.input.train_split = 'train'
  config.input.eval_split = 'validation'
  config.input.image_size = 224
  config.input.train_augment = 'inception_crop'
  config.input.hflip = True
  config.input.randaugment = 'rand-m9-mstd0.5-inc1'
  config.input.random_erase_prob = 0.25
  config.input.eval_crop_pct = 224 / 256
  config.input.resize_method = 'bicubic'
  config.input.num_threads = 16

  config.batch_size = 512  # 8 GPUs x 64
  config.num_epochs = 300.0
  config.num_train_steps = -1
  config.log_every_steps = 100
  config.eval_every_steps = -1
  config.checkpoint.every_steps = 1000

  config.optim.base_lr = 5e-4
  config.optim.lr_base_batch_size = 512
  config.optim.warmup_epochs = 20.0
  config.optim.warmup_start_ratio = 1e-3  # 5e-7
  config.optim.min_lr_ratio = 1e-2  # 5e-6
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.amsgrad = False
  config.optim.weight_decay = 0.05
  config.optim.weight_decay_mask = 'no_bias_norm'
  config.optim.grad_clip_norm = 5.0

  config.classification.label_smoothing = 0.1
  config.classification.mixup_alpha = 0.8
  config.classification.cutmix_alpha = 1.0
  config.classification.mix_prob = 1.0
  config.classification.switch_prob = 0.5
  return config
