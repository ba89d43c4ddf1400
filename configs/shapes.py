"""The synthetic shapes (128 px, 2000 train / 200 val images) from scratch on a CPU: one recipe per dense task,
for a nano ClusterFormer or a same-sized peer behind the same cluster decoder. The config argument picks the
backbone: 'clusterformer' (default), 'paca' or 'coc'. Each recipe's targets and the measured runs are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import ml_collections

from configs import dense

# Backbones small enough for two CPU cores: the nano ClusterFormer (whole-map clustering with 4x4 centers) and
# two same-sized peers, Context Cluster (point clustering) and PaCa-ViT (patch-to-cluster attention; conv stem
# and depthwise-conv MLPs).
BACKBONES = {
    "clusterformer": ("clusterformer_nano", {}),
    "coc": (
        "coc_tiny",
        dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 192), num_heads=(2, 2, 4, 4), head_dim=16, drop_path_rate=0.0),
    ),
    "paca": (
        "paca_tiny",
        dict(
            depths=(1, 1, 2, 1),
            dims=(32, 64, 128, 192),
            num_heads=(1, 2, 4, 6),
            clusters=(16, 16, 16, 0),
            drop_path_rate=0.0,
        ),
    ),
}


def _base(task: str, backbone: str) -> ml_collections.ConfigDict:
    """What every shapes recipe shares: a 3-layer, 64-wide decoder of 16 free queries, 128 px crops, AdamW
    lr 5e-4 from scratch (no backbone to protect), 2000 steps at batch 16."""
    model, overrides = BACKBONES[backbone]
    config = dense.dense_base(task, "shapes", model)
    config.model.kwargs.update(overrides)
    config.model.decoder.update(
        dim=64, num_queries=16, num_layers=3, layer_strides=(32, 16, 8), num_heads=4, ffn_dim=256, query_init="free"
    )
    # kMaX's convolutional pixel-decoder blocks: telling circle, square and triangle apart takes spatial mixing
    # that the nano ClusterFormer (4x4 patch stem, clustering + 1x1 MLPs) barely has.
    config.model.decoder.pixel_blocks = (1, 2, 1, 1)
    config.input.train_crop_size = 128
    config.input.train_scale_range = (0.75, 1.25)
    config.input.eval_pad_size = 128
    config.input.max_instances = 8
    config.optim.lr_multipliers.backbone = 1.0
    config.optim.base_lr = 5e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = 100
    config.optim.grad_clip_norm = 1.0
    config.batch_size = 16
    config.num_train_steps = 2000
    config.log_every_steps = 50
    config.checkpoint.every_steps = 500
    return config


def _set_prediction(config: ml_collections.ConfigDict, aux_semantic_weight: float) -> None:
    """Detection and instance segmentation: Mask2Former's softmax class loss with the no-object class, 1024
    mask points, and pixel-level class evidence from the shapes' semantic maps."""
    config.detection.num_points = 1024
    config.detection.class_loss = "softmax"
    config.detection.aux_semantic_weight = aux_semantic_weight


def detection(backbone: str) -> ml_collections.ConfigDict:
    config = _base("detection", backbone)
    if backbone == "clusterformer":
        config.model.decoder.query_init = "encoder_centers"  # the paper's transfer design: 4x4 = 16 centers
    _set_prediction(config, aux_semantic_weight=1.0)
    return config


def instance_segmentation(backbone: str) -> ml_collections.ConfigDict:
    """Target: box AP50 >= 0.8, mask AP >= 0.5 for both backbones (benchmarks/RESULTS.md). Free queries: from
    scratch there is no trained encoder whose clusters could be transferred."""
    config = _base("instance_segmentation", backbone)
    _set_prediction(config, aux_semantic_weight=5.0)
    config.model.decoder.mask_prior = True
    # Boxes of the predicted masks' largest piece: regressed boxes sat below them (a sigmoid mask also fires
    # faintly on other objects of its class).
    config.detection.box_source = "mask"
    config.optim.base_lr = 2e-3
    if backbone == "clusterformer":  # 2000 steps met box AP50 0.8 in one of two runs (0.843 / 0.792)
        config.num_train_steps = 3000
    config.eval_every_steps = 500
    return config


def semantic_segmentation(backbone: str) -> ml_collections.ConfigDict:
    """Target: mIoU >= 0.8 for both backbones inside 30 minutes."""
    config = _base("semantic_segmentation", backbone)
    config.model.decoder.num_queries = 6  # one center per class: circle, square, triangle, sky, grass, water
    config.optim.base_lr = 2e-3
    config.num_train_steps = 1500
    config.eval_every_steps = 500
    return config


def panoptic_segmentation(backbone: str) -> ml_collections.ConfigDict:
    """Target: PQ >= 0.6 for both backbones."""
    config = _base("panoptic_segmentation", backbone)
    config.panoptic.upsample = 4  # post-process at the 128 canvas
    config.panoptic.num_samples = 1024  # instance discrimination: every pixel of the 32x32 grid
    # The class head also reads the pixels under each query's (softmax) mask: without it the thing classes
    # stayed at their prior.
    config.model.decoder.mask_pooling = True
    config.optim.base_lr = 1e-3
    config.num_train_steps = 1000
    config.eval_every_steps = 500
    if backbone == "clusterformer":
        config.model.decoder.query_init = "encoder_centers"
        # Its things stay one class until its pixel features tell the shapes apart: a larger step, a 5x
        # auxiliary semantic CE and more steps.
        config.optim.base_lr = 2e-3
        config.panoptic.aux_semantic_weight = 5.0
        config.num_train_steps = 1500
    return config


RECIPES = {
    "detection": detection,
    "instance_segmentation": instance_segmentation,
    "semantic_segmentation": semantic_segmentation,
    "panoptic_segmentation": panoptic_segmentation,
}


def shapes_config(task: str, arg: str | None) -> ml_collections.ConfigDict:
    """The ``task`` recipe on the shapes with the backbone ``arg`` names ('clusterformer' when None)."""
    backbone = (arg or "clusterformer").strip()
    if backbone not in BACKBONES:
        raise ValueError(f"config argument must be one of {sorted(BACKBONES)}, got {arg!r}")
    return RECIPES[task](backbone)
