"""ClusterFormer-Small on ImageNet-1k: the paper's recipe, or the released one with `:official`.

  python -m clusterformer_jax.main --config=configs/clusterformer_small_imagenet.py \
      --config.input.data_dir=DATA_DIR --config.input.manual_dir=MANUAL_DIR --workdir=WORKDIR
  python -m clusterformer_jax.main --config=configs/clusterformer_small_imagenet.py:official ...

See configs/imagenet.py for both recipes.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet.py")
    spec = importlib.util.spec_from_file_location("clusterformer_configs_imagenet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.imagenet_config("small", arg)
