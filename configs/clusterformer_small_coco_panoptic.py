"""ClusterFormer-Small on COCO panoptic segmentation (paper §4.1.5, Table 5): the paper's recipe (configs/dense.py).

  python -m clusterformer_jax.main --config=configs/clusterformer_small_coco_panoptic.py \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=COCO_DIR \
      --config.init_from=IMAGENET_WORKDIR_OR_SAFETENSORS --workdir=WORKDIR
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dense.py")
    spec = importlib.util.spec_from_file_location("clusterformer_configs_dense", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.coco_config("panoptic_segmentation", "small")
