"""Panoptic segmentation on the synthetic shapes (3 thing + 3 stuff classes), from scratch on a CPU (ClusterFormer nano or a
same-sized PaCa-ViT or Context Cluster behind the same cluster decoder).

python -m clusterformer_jax.main --config=configs/shapes_panoptic.py[:clusterformer|paca|coc] --workdir=runs/shapes_panoptic
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dense.py")
    spec = importlib.util.spec_from_file_location("clusterformer_configs_dense", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shapes_config("panoptic_segmentation", arg)
