"""Shared pieces of the dense-task configs (detection, instance segmentation): the input section of the dense
pipeline, the cluster decoder and the set-prediction loss, and the paper's COCO recipe (§4.1.2, §4.1.4).

The paper's recipe: AdamW, lr 1e-5, 50 epochs, batch 16, crop 1024, scale jitter [0.1, 2.0], test shorter
side 800, 100 queries, L1 (5) + GIoU (2) box losses, a binary-cross-entropy-type class loss, six decoder
layers of T=3 recurrent cross-attention clustering. lr 1e-5 looks low against Mask2Former's 1e-4 (whose
protocol the paper says it follows) and is one flag: --config.optim.base_lr=1e-4.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections.config_dict import placeholder

COCO_TRAIN_IMAGES = 117_266  # COCO 2017 train images with at least one annotation (the detection recipes' set)


def _common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("clusterformer_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dense_input(dataset: str) -> ml_collections.ConfigDict:
    """``config.input`` for clusterformer_jax/data/dense_pipeline.py (None: the dataset's default)."""
    common = _common()
    return ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            data_dir=placeholder(str),
            manual_dir=placeholder(str),
            shapes_variant="default",
            train_split="train",
            eval_split="validation",
            train_crop_size=placeholder(int),
            train_scale_range=placeholder(tuple),
            train_scale_mode=placeholder(str),
            cat_max_ratio=placeholder(float),
            hflip=True,
            eval_short_side=placeholder(int),
            eval_max_size=placeholder(int),
            eval_pad_size=placeholder(int),
            max_instances=placeholder(int),
            mask_stride=placeholder(int),
            instance_targets="things",
            mean=common.IMAGENET_MEAN,
            std=common.IMAGENET_STD,
            num_threads=2,
            prefetch_buffer_size=placeholder(int),
            num_workers=0,
            outputs=placeholder(tuple),
        )
    )


def decoder_config() -> ml_collections.ConfigDict:
    """``config.model.decoder``: the cluster decoder (clusterformer_jax/models/decoder.py, DecoderConfig)."""
    return ml_collections.ConfigDict(
        dict(
            dim=256,
            num_queries=100,
            num_layers=6,
            num_iters=3,  # T EM steps of recurrent cross-attention per decoder layer (§3.3)
            layer_strides=(32, 32, 16, 16, 8, 8),
            num_heads=8,
            ffn_dim=2048,
            # Table 6f: 'encoder_centers' (the paper's) | 'free' | 'feature_embedding' | 'mixed_selection'
            # | 'scene_adaptive'
            query_init="encoder_centers",
            box_refine=True,  # Deformable DETR's iterative refinement
            box_reference="previous",  # 'mask': refine the box of the layer's own mask (set when masks train)
            mask_pooling=False,  # heads also read the pixel features pooled inside the query's mask
            mask_prior=False,  # E-step logits + the previous prediction's mask logits (masked-attention-like)
            dropout=0.0,
        )
    )


def detection_config() -> ml_collections.ConfigDict:
    """``config.detection``: set-prediction loss (clusterformer_jax/tasks/set_losses.py) and prediction."""
    return ml_collections.ConfigDict(
        dict(
            class_loss="focal",  # 'focal' | 'bce' (sigmoid classification either way)
            class_weight=2.0,
            box_l1_weight=5.0,
            giou_weight=2.0,
            mask_bce_weight=5.0,
            dice_weight=5.0,
            num_points=12544,  # mask loss points per matched pair (112^2, Mask2Former)
            oversample_ratio=3.0,
            importance_ratio=0.75,
            top_k=100,  # detections kept per image
            mask_threshold=0.5,
            eval_backend="pycocotools",  # 'pycocotools' | 'faster_coco_eval'
        )
    )


def dense_base(task: str, dataset: str, model: str) -> ml_collections.ConfigDict:
    """The common config with the dense sections in place (everything overridable by flag)."""
    if task not in ("detection", "instance_segmentation"):
        raise ValueError(f"dense task must be 'detection' or 'instance_segmentation', got {task!r}")
    config = _common().get_config()
    config.task = task
    config.model.name = model
    config.model.decoder = decoder_config()
    config.input = dense_input(dataset)
    config.detection = detection_config()
    config.optim.lr_multipliers = ml_collections.ConfigDict({"backbone": 0.1})
    config.optim.weight_decay = 0.05
    config.optim.grad_clip_norm = 0.1
    config.optim.warmup_epochs = 0.0
    config.optim.warmup_steps = 1000
    config.optim.warmup_start_ratio = 1e-3
    config.optim.min_lr_ratio = 0.01
    config.eval_every_steps = 0
    if task == "detection":  # boxes only: no mask losses, so boxes cannot be refined from masks
        config.detection.mask_bce_weight = 0.0
        config.detection.dice_weight = 0.0
    else:
        config.model.decoder.box_reference = "mask"
        config.model.decoder.mask_pooling = True
    return config


def coco_config(task: str, variant: str) -> ml_collections.ConfigDict:
    """The paper's COCO recipe for ClusterFormer-``variant`` (tiny or small), initialised from ImageNet."""
    if variant not in ("tiny", "small"):
        raise ValueError(f"variant must be 'tiny' or 'small', got {variant!r}")
    config = dense_base(task, "coco_instances", f"clusterformer_{variant}")
    # Window counts must divide the stage maps of both the 1024 train crop (256/128/64/32) and the 1344 eval
    # canvas (336/168/84/42): 16x16-token windows in training, 21x21 at eval (the classifier's 7x7 at 224).
    config.model.kwargs.window_counts = (16, 8, 4, 2)
    config.input.train_crop_size = 1024
    config.input.train_scale_range = (0.1, 2.0)
    config.input.eval_short_side = 800
    config.input.eval_max_size = 1333
    config.input.eval_pad_size = 1344
    config.input.num_threads = 16
    config.batch_size = 16
    config.num_epochs = 50.0
    config.optim.base_lr = 1e-5  # as the paper states; Mask2Former uses 1e-4 (--config.optim.base_lr=1e-4)
    config.log_every_steps = 100
    config.checkpoint.every_steps = 2000
    config.eval_every_steps = 5 * COCO_TRAIN_IMAGES // 16  # every 5 epochs
    config.init_from = ""  # an ImageNet workdir or converted .safetensors of clusterformer_{variant}
    return config


# Backbones small enough for the synthetic shapes on two CPU cores: the nano ClusterFormer (whole-map
# clustering with 4x4 centers) and the same-sized Context Cluster (the peer with point clustering).
SHAPES_BACKBONES = {
    "clusterformer": ("clusterformer_nano", {}),
    "coc": (
        "coc_tiny",
        dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 192), num_heads=(2, 2, 4, 4), head_dim=16, drop_path_rate=0.0),
    ),
}


def shapes_config(task: str, arg: str | None) -> ml_collections.ConfigDict:
    """The synthetic shapes (128 px, 2000 train / 200 val images) from scratch on a CPU; ``arg`` picks the
    backbone: 'clusterformer' (default) or 'coc'."""
    name = (arg or "clusterformer").strip()
    if name not in SHAPES_BACKBONES:
        raise ValueError(f"config argument must be one of {sorted(SHAPES_BACKBONES)}, got {arg!r}")
    model, overrides = SHAPES_BACKBONES[name]
    config = dense_base(task, "shapes", model)
    for key, value in overrides.items():
        config.model.kwargs[key] = value
    config.model.decoder.update(
        dim=64, num_queries=16, num_layers=3, layer_strides=(32, 16, 8), num_heads=4, ffn_dim=256, query_init="free"
    )
    if name == "clusterformer":
        config.model.decoder.query_init = "encoder_centers"  # the paper's transfer design: 4x4 = 16 centers
    config.input.train_crop_size = 128
    config.input.train_scale_range = (0.75, 1.25)
    config.input.eval_pad_size = 128
    config.input.max_instances = 8
    config.detection.num_points = 1024
    # The measured shapes runs (benchmarks/RESULTS.md) used the mask prior on top of the instance options.
    config.model.decoder.mask_prior = task != "detection"
    config.optim.lr_multipliers.backbone = 1.0  # from scratch: no pretrained backbone to protect
    config.optim.base_lr = 5e-4
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = 100
    config.optim.grad_clip_norm = 1.0
    config.batch_size = 16
    config.num_train_steps = 2000
    config.log_every_steps = 50
    config.checkpoint.every_steps = 500
    return config
