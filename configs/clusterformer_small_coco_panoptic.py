"""ClusterFormer-Small on COCO panoptic segmentation (paper §4.1.5, Table 5): the paper's recipe (configs/dense.py).

  python -m clusterformer_jax.main --config=configs/clusterformer_small_coco_panoptic.py \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=COCO_DIR \
      --config.init_from=IMAGENET_WORKDIR_OR_SAFETENSORS --workdir=WORKDIR
"""

from __future__ import annotations

import ml_collections

from configs import dense


def get_config() -> ml_collections.ConfigDict:
    return dense.coco_config("panoptic_segmentation", "small")
