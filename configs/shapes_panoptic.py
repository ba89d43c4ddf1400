"""Panoptic segmentation on the synthetic shapes (3 thing + 3 stuff classes), from scratch on a CPU (ClusterFormer nano or a
same-sized PaCa-ViT or Context Cluster behind the same cluster decoder).

python -m clusterformer_jax.main --config=configs/shapes_panoptic.py[:clusterformer|paca|coc] --workdir=runs/shapes_panoptic
"""

from __future__ import annotations

import ml_collections

from configs import shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return shapes.shapes_config("panoptic_segmentation", arg)
