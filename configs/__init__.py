"""The configs ``--config`` points at: ``python -m clusterformer_jax.main --config=configs/FILE.py[:ARG]``, run
from the repository root (launch/*.sh change to it), which puts this package on the import path.

One file per (model, task, dataset) with a ``get_config([arg])``; the recipes they share are plain modules:
``common`` (every field the trainer reads, with its default), ``dense`` (the dense sections and the paper's
COCO / ADE20K recipes), ``shapes`` (the synthetic shapes on a CPU), ``imagenet`` and ``ablations.table6``.
"""
