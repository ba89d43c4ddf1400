"""The paper's Table 6 ablations (§4.2) as rows of model options, with the paper's numbers beside them.

``table6a.py`` ... ``table6f.py`` are the configs: ``--config=configs/ablations/table6c.py:kmeans`` is
ClusterFormer-Tiny on ImageNet-1k (the paper recipe) with Table 6c's k-means center update;
``:kmeans,quickstart`` puts the same option on the quickstart's nano model (with the paper's head on the
centers) and digits: the small-scale Table 6 of ``python -m clusterformer_jax.ablations --train``. Table 6f
varies the dense decoder's query initialisation on the COCO instance-segmentation recipe (configs/dense.py).
"""

from __future__ import annotations

import ml_collections

from configs import dense, imagenet, quickstart

# table -> row -> (model.kwargs overrides, paper #params in M (None: not reported), paper top-1, top-5);
# the row that is the default ClusterFormer-Tiny has no overrides
CLASSIFICATION = {
    "a": {  # key components
        "baseline": (dict(center_update="none", dispatch="none"), 21.73, 74.59, 91.73),
        "recurrent": (dict(dispatch="none"), 26.27, 80.57, 95.22),
        "dispatch": (dict(center_update="none"), 23.46, 78.58, 94.68),
        "both": ({}, 27.85, 81.31, 96.32),
    },
    "b": {  # number of EM steps T
        "T1": (dict(num_iters=1), 27.85, 81.06, 96.23),
        "T2": (dict(num_iters=2), None, 81.22, 96.29),
        "T3": ({}, None, 81.31, 96.32),
        "T4": (dict(num_iters=4), None, 81.33, 96.33),
    },
    "c": {  # center update
        "cosine": (dict(center_update="cosine"), 23.88, 78.79, 94.36),
        "vanilla": (dict(center_update="vanilla"), 35.48, 79.67, 94.95),
        "criss_cross": (dict(center_update="criss_cross"), 34.16, 79.91, 95.24),
        "kmeans": (dict(center_update="kmeans"), 27.71, 80.96, 95.57),
        "recurrent": ({}, 27.85, 81.31, 96.32),
    },
    "d": {  # head dimension
        "e16": (dict(head_dim=16), 17.25, 71.69, 90.16),
        "e24": (dict(head_dim=24), 22.88, 75.37, 92.45),
        "e32": ({}, 27.85, 81.31, 96.32),
        "e40": (dict(head_dim=40), 32.81, 82.21, 97.09),
        "e48": (dict(head_dim=48), 38.14, 82.40, 97.22),
    },
    "e": {  # feature dispatching
        "none": (dict(dispatch="none"), 26.27, 80.57, 95.22),
        "fc": (dict(dispatch="fc"), 27.14, 80.83, 95.47),
        "confidence": (dict(dispatch="confidence"), 26.81, 80.69, 95.30),
        "fc_similarity": (dict(dispatch="fc_similarity"), 27.46, 80.96, 95.84),
        "eq6": ({}, 27.85, 81.31, 96.32),
    },
}

# Table 6f: decoder query initialisation -> paper COCO test-dev (mask AP, AP50, AP75), ClusterFormer-Tiny
QUERY_INIT_AP = {
    "free": (44.2, 66.3, 46.4),
    "feature_embedding": (44.5, 67.3, 47.2),
    "mixed_selection": (44.9, 67.9, 47.8),
    "scene_adaptive": (45.1, 67.8, 48.0),
    "encoder_centers": (45.9, 69.1, 49.5),
}


def _parse(table: str, arg: str | None, rows) -> tuple[str, str]:
    row, _, base = (arg or "").partition(",")
    if row not in rows:
        raise ValueError(f"Table 6{table}: config argument must name a row of {sorted(rows)}, got {arg!r}")
    return row, base


def classification_config(table: str, arg: str | None) -> ml_collections.ConfigDict:
    """Row ``arg`` ('ROW' or 'ROW,quickstart') of Table 6 ``table`` in (a)-(e)."""
    rows = CLASSIFICATION[table]
    row, base = _parse(table, arg, rows)
    if base == "quickstart":
        config = quickstart.get_config()
        # the paper's head on the last block's centers: without it, rows that drop the dispatch would leave
        # the centers out of the output (the quickstart's neck pools the tokens only)
        config.model.kwargs.head = "paper_centers"
    elif base == "":
        config = imagenet.imagenet_config("tiny", "paper")
    else:
        raise ValueError(f"config argument base must be empty or 'quickstart', got {base!r}")
    for field, value in rows[row][0].items():
        config.model.kwargs[field] = value
    return config


def query_init_config(arg: str | None) -> ml_collections.ConfigDict:
    """Row ``arg`` of Table 6f: the COCO instance-segmentation recipe with that decoder query initialisation."""
    row, base = _parse("f", arg, QUERY_INIT_AP)
    if base:
        raise ValueError(f"Table 6f has no small-scale base, got {arg!r}")
    config = dense.coco_config("instance_segmentation", "tiny")
    config.model.decoder.query_init = row
    return config
