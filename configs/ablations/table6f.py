"""Table 6f of the paper as configs: `--config=configs/ablations/table6f.py:ROW`, ROW a decoder query
initialisation (see table6.py); the COCO instance-segmentation recipe of configs/dense.py."""

from __future__ import annotations

import importlib.util
import os


def get_config(arg: str | None = None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table6.py")
    spec = importlib.util.spec_from_file_location("clusterformer_ablation_table6", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.query_init_config(arg)
