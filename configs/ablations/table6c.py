"""Table 6c of the paper as configs: `--config=configs/ablations/table6c.py:ROW[,quickstart]` (see table6.py)."""

from __future__ import annotations

import ml_collections

from configs.ablations import table6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return table6.classification_config("c", arg)
