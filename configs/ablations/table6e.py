"""Table 6e of the paper as configs: `--config=configs/ablations/table6e.py:ROW[,quickstart]` (see table6.py)."""

from __future__ import annotations

import importlib.util
import os


def get_config(arg: str | None = None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table6.py")
    spec = importlib.util.spec_from_file_location("clusterformer_ablation_table6", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.classification_config("e", arg)
