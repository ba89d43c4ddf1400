"""The dense-task configs: the input section of the dense pipeline, the cluster decoder, the set-prediction,
semantic and panoptic sections, one small recipe per task, and the paper's COCO (§4.1.2, §4.1.4, §4.1.5) and
ADE20K (§4.1.3) recipes.

The paper's recipe: AdamW, lr 1e-5, 50 epochs, batch 16, crop 1024, scale jitter [0.1, 2.0], test shorter
side 800, 100 queries, L1 (5) + GIoU (2) box losses, a binary-cross-entropy-type class loss, six decoder
layers of T=3 recurrent cross-attention clustering. lr 1e-5 looks low against Mask2Former's 1e-4 (whose
protocol the paper says it follows) and is one flag: --config.optim.base_lr=1e-4.

Each default is written once: the decoder's and the losses' fields are their dataclasses' defaults
(``DecoderConfig``, ``SetLossConfig``, ``PanopticLossConfig``); the fields only the tasks read (prediction,
post-processing, the semantic head) are written here, and the tasks read them without fallbacks.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from clusterformer_jax.data.dense_datasets import COMMON_DEFAULTS
from clusterformer_jax.models.decoder import DecoderConfig
from clusterformer_jax.tasks.panoptic_losses import PanopticLossConfig
from clusterformer_jax.tasks.set_losses import SetLossConfig
from configs import common

COCO_TRAIN_IMAGES = 117_266  # COCO 2017 train images with at least one annotation (the detection recipes' set)
ADE20K_TRAIN_IMAGES = 20_210
COCO_PANOPTIC_TRAIN_IMAGES = 118_287
# Decoder fields that change speed and memory, not numbers: resolved for the machine by the trainer.
_DECODER_EXECUTION = ("em_unroll",)


def _defaults(cls, *names: str) -> dict:
    """The defaults of dataclass ``cls``'s fields ``names`` (all fields without names)."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    return {name: fields[name] for name in names or fields}


def dense_input(dataset: str) -> ml_collections.ConfigDict:
    """``config.input`` for clusterformer_jax/data/dense_pipeline.py: None is the dataset's default, the splits,
    flip, normalisation and readers are what every dataset shares (data/dense_datasets.py, COMMON_DEFAULTS)."""
    return ml_collections.ConfigDict(
        dict(
            COMMON_DEFAULTS,
            dataset=dataset,
            data_dir=placeholder(str),
            manual_dir=placeholder(str),
            shapes_variant="default",
            train_crop_size=placeholder(int),
            train_scale_range=placeholder(tuple),
            train_scale_mode=placeholder(str),
            cat_max_ratio=placeholder(float),
            eval_short_side=placeholder(int),
            eval_max_size=placeholder(int),
            eval_pad_size=placeholder(int),
            max_instances=placeholder(int),
            mask_stride=placeholder(int),
            instance_targets="things",
            prefetch_buffer_size=placeholder(int),
            outputs=placeholder(tuple),
        )
    )


def decoder_config() -> ml_collections.ConfigDict:
    """``config.model.decoder``: every field of the cluster decoder (clusterformer_jax/models/decoder.py,
    ``DecoderConfig``: 6 layers of T=3 EM steps, 100 queries from the encoder's centers, paper §3.3) but the
    execution ones."""
    fields = _defaults(DecoderConfig)
    return ml_collections.ConfigDict({k: v for k, v in fields.items() if k not in _DECODER_EXECUTION})


def detection_config() -> ml_collections.ConfigDict:
    """``config.detection``: the set criterion's weights (clusterformer_jax/tasks/set_losses.py,
    ``SetLossConfig``: paper §4.1.2 and Mask2Former) and the prediction fields of tasks/detection.py."""
    loss = _defaults(SetLossConfig, "class_loss", "class_weight", "box_l1_weight", "giou_weight")
    loss.update(_defaults(SetLossConfig, "mask_bce_weight", "dice_weight", "num_points"))
    loss.update(_defaults(SetLossConfig, "oversample_ratio", "importance_ratio"))
    return ml_collections.ConfigDict(
        dict(
            loss,
            aux_semantic_weight=0.0,  # > 0: kMaX's auxiliary pixel cross-entropy on the semantic labels
            top_k=100,  # detections kept per image
            mask_threshold=0.5,
            # 'head': the box head's boxes; 'mask' (instance segmentation): the box around the largest connected
            # piece of each predicted mask, as Mask2Former derives its boxes from masks
            box_source="head",
            eval_backend="pycocotools",  # 'pycocotools' | 'faster_coco_eval'
        )
    )


def semantic_config() -> ml_collections.ConfigDict:
    """``config.semantic``: the head and loss weights of clusterformer_jax/tasks/semantic.py."""
    return ml_collections.ConfigDict(
        dict(
            head="cluster",  # 'cluster': one decoder query per class (paper §4.1.3) | 'paca': PaCa-ViT's head
            ce_weight=5.0,  # paper §4.1.3: cross-entropy 5, dice 1
            dice_weight=1.0,
            paca_channels=256,
            paca_dropout=0.1,
            paca_aux_weight=0.4,  # PaCa's CE on the cluster logits
            inference="whole",  # 'whole' (the paper's: one pass over the eval canvas) | 'slide' (mmseg's windows)
            slide_crop=(512, 512),  # (h, w) windows of 'slide'; mmseg's ADE20K 512 recipes: crop 512, stride 341
            slide_stride=(341, 341),  # rounded down to the stride-4 logit grid (341 -> 340)
            source_size_ground_truth=True,  # ADE20K: mIoU at the original size from input.manual_dir's PNGs
        )
    )


def panoptic_config() -> ml_collections.ConfigDict:
    """``config.panoptic``: Eq. 7's weights and kMaX's auxiliary weights (clusterformer_jax/tasks/panoptic_losses.py,
    ``PanopticLossConfig``: paper §4.1.5, λth, λst, λaux = 5, 3, 1; its other kMaX terms keep their published
    weights there), and kMaX's post-processing of tasks/panoptic.py."""
    loss = _defaults(PanopticLossConfig, "lambda_thing", "lambda_stuff", "lambda_aux")
    loss.update(_defaults(PanopticLossConfig, "aux_semantic_weight", "insdis_weight"))
    return ml_collections.ConfigDict(
        dict(
            loss,
            thing_threshold=0.7,  # kMaX: class score of a kept thing / stuff segment
            stuff_threshold=0.5,
            pixel_threshold=0.4,  # a pixel's mask confidence below this is void
            overlap_threshold=0.8,  # a segment keeps >= 80% of its pixels after the higher-scored ones
            min_thing_area=0,
            min_stuff_area=0,
            upsample=2,  # mask logits upsampled from stride 4 before post-processing (1: none; 4: the canvas)
            eval_backend="numpy",  # 'numpy' | 'hotcoco' | 'panopticapi' (PQ; all tested equal)
            compute_ap=True,  # mAP^Th_pan with pycocotools
        )
    )


# ------------------------------------------------------------------------------------ one recipe per task
def _detection(config: ml_collections.ConfigDict) -> None:
    config.detection = detection_config()
    config.detection.mask_bce_weight = 0.0  # boxes only: no mask losses
    config.detection.dice_weight = 0.0


def _instance_segmentation(config: ml_collections.ConfigDict) -> None:
    config.detection = detection_config()
    config.model.decoder.box_reference = "mask"  # each layer refines the box around its own mask
    config.model.decoder.mask_pooling = True


def _semantic_segmentation(config: ml_collections.ConfigDict) -> None:
    config.semantic = semantic_config()
    config.model.decoder.query_init = "free"  # one learned center per class; no set loss


def _panoptic_segmentation(config: ml_collections.ConfigDict) -> None:
    config.panoptic = panoptic_config()
    config.input.instance_targets = "all"  # stuff segments are clusters too


TASK_RECIPES = {
    "detection": _detection,
    "instance_segmentation": _instance_segmentation,
    "semantic_segmentation": _semantic_segmentation,
    "panoptic_segmentation": _panoptic_segmentation,
}
DENSE_TASKS = tuple(TASK_RECIPES)


def dense_base(task: str, dataset: str, model: str) -> ml_collections.ConfigDict:
    """The common config with the decoder, the dense input and the task's section in place: the backbone at
    0.1x lr, AdamW wd 0.05, gradient clipping 0.1, 1000 warm-up steps (Mask2Former's), one eval at the end."""
    if task not in TASK_RECIPES:
        raise ValueError(f"dense task must be one of {DENSE_TASKS}, got {task!r}")
    config = common.get_config()
    config.task = task
    config.model.name = model
    config.model.decoder = decoder_config()
    config.input = dense_input(dataset)
    TASK_RECIPES[task](config)
    config.optim.lr_multipliers = ml_collections.ConfigDict({"backbone": 0.1})
    config.optim.weight_decay = 0.05
    config.optim.grad_clip_norm = 0.1
    config.optim.warmup_epochs = 0.0
    config.optim.warmup_steps = 1000
    config.optim.warmup_start_ratio = 1e-3
    config.optim.min_lr_ratio = 0.01
    config.eval_every_steps = 0
    return config


# ------------------------------------------------------------------------------------ the paper's recipes
def _paper_schedule(config: ml_collections.ConfigDict, train_images: int) -> None:
    """What the paper's dense recipes share: batch 16, 50 epochs, AdamW lr 1e-5 as printed (Mask2Former uses
    1e-4: --config.optim.base_lr=1e-4), an eval every 5 epochs, the backbone from an ImageNet run."""
    config.input.num_threads = 16
    config.batch_size = 16
    config.num_epochs = 50.0
    config.optim.base_lr = 1e-5
    config.log_every_steps = 100
    config.checkpoint.every_steps = 2000
    config.eval_every_steps = 5 * train_images // 16
    config.init_from = ""  # an ImageNet workdir or converted .safetensors of the backbone preset


# task -> (COCO dataset, its training images, decoder queries); panoptic: kMaX's 128 queries
_COCO = {
    "detection": ("coco_instances", COCO_TRAIN_IMAGES, 100),
    "instance_segmentation": ("coco_instances", COCO_TRAIN_IMAGES, 100),
    "panoptic_segmentation": ("coco_panoptic", COCO_PANOPTIC_TRAIN_IMAGES, 128),
}


def _variant(variant: str) -> str:
    if variant not in ("tiny", "small"):
        raise ValueError(f"variant must be 'tiny' or 'small', got {variant!r}")
    return f"clusterformer_{variant}"


def coco_config(task: str, variant: str) -> ml_collections.ConfigDict:
    """The paper's COCO recipe for ClusterFormer-``variant`` (tiny or small), initialised from ImageNet: crop
    1024 with scale jitter [0.1, 2.0], test shorter side 800. Panoptic segmentation (§4.1.5) reads COCO
    panoptic with 128 queries (kMaX's, whose losses the paper adopts; kMaX's lr is 5e-4 at batch 64)."""
    if task not in _COCO:
        raise ValueError(f"COCO task must be one of {tuple(_COCO)}, got {task!r}")
    dataset, train_images, queries = _COCO[task]
    config = dense_base(task, dataset, _variant(variant))
    config.model.decoder.num_queries = queries
    # Window counts must divide the stage maps of both the 1024 train crop (256/128/64/32) and the 1344 eval
    # canvas (336/168/84/42): 16x16-token windows in training, 21x21 at eval (the classifier's 7x7 at 224).
    config.model.kwargs.window_counts = (16, 8, 4, 2)
    config.input.train_crop_size = 1024
    config.input.train_scale_range = (0.1, 2.0)
    config.input.eval_short_side = 800
    config.input.eval_max_size = 1333
    config.input.eval_pad_size = 1344
    _paper_schedule(config, train_images)
    return config


def ade20k_config(variant: str) -> ml_collections.ConfigDict:
    """The paper's ADE20K recipe (§4.1.3) for ClusterFormer-``variant`` (tiny or small), from ImageNet: 150
    cluster centers (one per class), CE 5 + dice 1, crop 640 with scale jitter [0.5, 2.0], whole-image test at
    shorter side 640. 50 epochs of the 20,210 training images at batch 16 = 63,157 iterations (mmseg's ADE
    schedules are 80k or 160k iterations; the paper states epochs)."""
    config = dense_base("semantic_segmentation", "ade20k", _variant(variant))
    config.model.decoder.num_queries = 150
    # Window counts dividing the 640 crop's stage maps (160/80/40/20) and the 1280 eval canvas's (320/.../40).
    config.model.kwargs.window_counts = (8, 4, 2, 1)
    config.input.train_crop_size = 640
    config.input.train_scale_range = (0.5, 2.0)
    config.input.eval_short_side = 640
    config.input.eval_pad_size = 1280
    config.semantic.slide_crop = (640, 640)  # mmseg's 640 ADE20K recipes, for --config.semantic.inference=slide
    config.semantic.slide_stride = (426, 426)
    _paper_schedule(config, ADE20K_TRAIN_IMAGES)
    return config


def paca_ade20k_config() -> ml_collections.ConfigDict:
    """PaCa-ViT-Tiny with its own segmentation head, PaCa's published ADE20K recipe (upstream iVMCL/PaCaViT,
    segmentation configs): 160k iterations at batch 16, crop 512, AdamW lr 6e-5 wd 0.01, 1500 warm-up
    iterations from 1e-6, the head at 10x lr; backbone clusters (200, 200, 200, 0) as the upstream fine-tune.
    Published: 45.65 mIoU. Differences: cosine decay instead of poly (power 1), and the x10 covers the whole
    head (upstream: the head's clustering conv and conv_seg)."""
    config = dense_base("semantic_segmentation", "ade20k", "paca_tiny")
    del config.model.decoder
    config.semantic.head = "paca"
    config.model.kwargs.clusters = (200, 200, 200, 0)
    config.input.train_crop_size = 512
    config.input.eval_short_side = 512
    config.input.eval_pad_size = 1024
    config.input.eval_max_size = 2048
    config.input.num_threads = 16
    config.batch_size = 16
    config.num_train_steps = 160_000
    config.optim.base_lr = 6e-5
    config.optim.weight_decay = 0.01
    config.optim.warmup_steps = 1500
    config.optim.warmup_start_ratio = 1e-6 / 6e-5
    config.optim.min_lr_ratio = 0.0
    config.optim.lr_multipliers = ml_collections.ConfigDict({"backbone": 1.0, "head": 10.0})
    config.log_every_steps = 100
    config.checkpoint.every_steps = 4000
    config.eval_every_steps = 16_000
    config.init_from = ""  # a paca_tiny ImageNet workdir or converted .safetensors
    return config
