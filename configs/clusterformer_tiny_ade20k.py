"""ClusterFormer-Tiny on ADE20K semantic segmentation (paper §4.1.3, Table 3): the paper's recipe (configs/dense.py).

  python -m clusterformer_jax.main --config=configs/clusterformer_tiny_ade20k.py \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=ADE_DIR \
      --config.init_from=IMAGENET_WORKDIR_OR_SAFETENSORS --workdir=WORKDIR
"""

from __future__ import annotations

import ml_collections

from configs import dense


def get_config() -> ml_collections.ConfigDict:
    return dense.ade20k_config("tiny")
