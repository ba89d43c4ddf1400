"""ClusterFormer-Small on ImageNet-1k: the paper's recipe, or the released one with `:official`.

  python -m clusterformer_jax.main --config=configs/clusterformer_small_imagenet.py \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=MANUAL_DIR --workdir=WORKDIR
  python -m clusterformer_jax.main --config=configs/clusterformer_small_imagenet.py:official ...

See configs/imagenet.py for both recipes.
"""

from __future__ import annotations

import ml_collections

from configs import imagenet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return imagenet.imagenet_config("small", arg)
