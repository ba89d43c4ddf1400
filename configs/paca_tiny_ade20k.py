"""PaCa-ViT-Tiny with the PaCa segmentation head on ADE20K, PaCa's published recipe (configs/dense.py).

  python -m clusterformer_jax.main --config=configs/paca_tiny_ade20k.py \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=ADE_DIR \
      --config.init_from=PACA_IMAGENET_WORKDIR_OR_SAFETENSORS --workdir=WORKDIR
"""

from __future__ import annotations

import ml_collections

from configs import dense


def get_config() -> ml_collections.ConfigDict:
    return dense.paca_ade20k_config()
