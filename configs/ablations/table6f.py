"""Table 6f of the paper as configs: `--config=configs/ablations/table6f.py:ROW`, ROW a decoder query
initialisation (see table6.py); the COCO instance-segmentation recipe of configs/dense.py."""

from __future__ import annotations

import ml_collections

from configs.ablations import table6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return table6.query_init_config(arg)
