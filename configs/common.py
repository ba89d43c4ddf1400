"""Defaults shared by every config; every field the trainer, task, optimizer and input pipeline read exists
here, so the locked config rejects a mistyped override (``--config.optim.lrr=1``) with a one-line error.

``placeholder`` fields default to None, meaning "the dataset's / model preset's own default".
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from clusterformer_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # 0..255 scale


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "classification"  # a key of TASKS in clusterformer_jax/tasks/registry.py
    config.seed = 0
    # Call jax.distributed.initialize() (also triggered by CLUSTERFORMER_DISTRIBUTED=1 from launch/*).
    config.distributed = False
    # Persistent XLA compilation cache (e.g. a bucket or shared disk); '' leaves JAX's setting alone.
    config.compilation_cache_dir = ""

    config.model = ml_collections.ConfigDict()
    config.model.name = "clusterformer_tiny"  # a name from models.registry.list_models()
    # Constructor overrides passed to create_model (None = the preset's value). Config files may add more.
    config.model.kwargs = ml_collections.ConfigDict()
    config.model.kwargs.drop_path_rate = placeholder(float)
    config.model.kwargs.drop_rate = placeholder(float)
    config.model.kwargs.num_iters = placeholder(int)
    config.model.kwargs.dtype = placeholder(str)  # 'float32' | 'bfloat16' | 'float16'
    config.model.kwargs.remat = placeholder(bool)
    # ClusterFormer: windows per side in each of the 4 stages, e.g. '(8,4,2,1)' for 224 inputs; each must divide
    # its stage's feature map (input / 4, / 8, / 16, / 32).
    config.model.kwargs.window_counts = placeholder(tuple)
    # Execution settings: same numbers, different speed and memory. None: chosen for this machine at start-up
    # (clusterformer_jax/runtime.py) for the models that have the field.
    config.model.kwargs.em_unroll = placeholder(int)  # ClusterFormer: EM steps per scan-loop iteration
    config.model.kwargs.group_chunk = placeholder(int)  # ClusterFormer: groups per iteration of the clustering loop
    config.model.kwargs.group_chunk_bytes = placeholder(int)  # ClusterFormer: clustering chunks of about this size
    config.model.kwargs.depthwise_impl = placeholder(str)  # 'shifted' (fast on XLA CPU) | 'grouped' (cuDNN, TPU)
    config.model.kwargs.remat_impl = placeholder(str)  # 'tied' (XLA CPU) | 'barrier' (nn.remat); with remat=True
    config.model.kwargs.norm_impl = placeholder(str)  # GroupNorm(1): 'grouped' (fast on XLA CPU) | 'ungrouped' (TPU)
    config.model.kwargs.dispatch_impl = placeholder(str)  # hard dispatch: 'scatter' (CPU, GPU) | 'onehot' (TPU)
    # What a rematerialised block keeps for its backward pass (models/remat.py REMAT_POLICIES), with remat=True.
    config.model.kwargs.remat_policy = placeholder(str)

    config.input = ml_collections.ConfigDict()
    config.input.dataset = "digits"  # 'digits' | 'imagenet2012'
    config.input.data_dir = placeholder(str)  # tfds data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.input.manual_dir = placeholder(str)  # imagenet2012: directory with the ILSVRC2012 tars
    config.input.train_split = "train"
    config.input.eval_split = placeholder(str)  # None: 'test' (digits) / 'validation' (imagenet2012)
    config.input.image_size = placeholder(int)  # None: 32 (digits) / 224 (imagenet2012)
    config.input.train_augment = placeholder(str)  # 'inception_crop' | 'resize'
    config.input.eval_crop_pct = placeholder(float)  # centre-crop fraction for non-'resize' eval
    config.input.resize_method = "bicubic"  # 'bicubic' | 'bilinear'
    config.input.hflip = placeholder(bool)
    config.input.randaugment = placeholder(str)  # e.g. 'rand-m9-mstd0.5-inc1'
    config.input.random_erase_prob = 0.0
    config.input.mean = IMAGENET_MEAN
    config.input.std = IMAGENET_STD
    config.input.num_threads = 2
    config.input.prefetch_buffer_size = placeholder(int)  # None: 2 * local batch
    config.input.batch_prefetch = 2  # train batches stacked ahead in a background thread (0: off)

    config.batch_size = 1024  # global, over all processes
    # Micro-batches per step: the step averages the gradients of batch_size / grad_accum_steps rows at a time
    # (the global batch on fewer chips, in the same jitted step; BatchNorm then normalises per micro-batch).
    config.grad_accum_steps = 1
    config.eval_batch_size = -1  # -1: batch_size
    config.num_epochs = 300.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.log_every_steps = 100
    config.eval_every_steps = -1  # -1: once per epoch; 0: only at the end

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    config.resume = ""  # another run's workdir / checkpoints dir / step dir: full state + data position
    config.init_from = ""  # same forms: parameters (and BatchNorm statistics) only, for fine-tuning
    # init_from of another model (backbone parameters missing or shaped differently) stops the run; True loads
    # the leaves that fit, lists what was loaded and what was not, and trains on.
    config.init_from_partial = False
    # A workdir whose only checkpoints are unreadable ones moved aside (<step>.corrupt-<n>) stops the run; True
    # starts over beside them.
    config.restart_from_scratch = False

    # Device mesh; -1 takes the remaining devices. The batch is split over both axes; parameters and optimizer
    # state over 'fsdp' (no tensor parallelism).
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated under fsdp

    config.optim = ml_collections.ConfigDict()
    config.optim.base_lr = 1e-3
    config.optim.lr_base_batch_size = 0  # > 0: lr = base_lr * batch_size / lr_base_batch_size
    config.optim.warmup_epochs = 20.0
    config.optim.warmup_steps = -1  # >= 0 overrides warmup_epochs
    config.optim.warmup_start_ratio = 1e-3  # warmup starts at lr * this
    config.optim.min_lr_ratio = 1e-2  # cosine ends at lr * this
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.amsgrad = False  # True: PyTorch AdamW(amsgrad=True) semantics
    config.optim.weight_decay = 0.05
    config.optim.weight_decay_mask = "no_bias_norm"  # 'all' | 'no_bias_norm'
    config.optim.grad_clip_norm = 5.0  # <= 0: off
    # Learning-rate (and weight-decay) factor per parameter group, by path prefix: dense recipes train the
    # pretrained backbone slower ({'backbone': 0.1}); 1.0 leaves a group alone. Config files may add groups.
    config.optim.lr_multipliers = ml_collections.ConfigDict({"backbone": 1.0})

    # Task 'classification'.
    config.classification = ml_collections.ConfigDict()
    config.classification.label_smoothing = 0.1
    config.classification.mixup_alpha = 0.8  # 0: off
    config.classification.cutmix_alpha = 1.0  # 0: off
    config.classification.mix_prob = 1.0  # probability a batch is mixed at all
    config.classification.switch_prob = 0.5  # probability of CutMix instead of Mixup when both are on
    return config


def parse_model_arg(arg: str | None, models: tuple[str, ...], default: str) -> tuple[str, bool]:
    """A recipe's config argument MODEL[,quickstart] -> (model, whether to train on the quickstart digits)."""
    parts = [p.strip() for p in (arg or default).split(",") if p.strip()]
    model, modes = parts[0], parts[1:]
    if model not in models or any(m != "quickstart" for m in modes):
        raise ValueError(f"config argument must be MODEL[,quickstart] with MODEL in {', '.join(models)}; got {arg!r}")
    return model, bool(modes)


def set_imagenet_input(config: ml_collections.ConfigDict, eval_crop_pct: float) -> ml_collections.ConfigDict:
    """tfds imagenet2012 with the augmentation every published recipe here shares: bicubic inception crop,
    flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; eval resize + centre crop ``eval_crop_pct``.
    (The optimizer, schedule and Mixup/CutMix defaults above are already the DeiT/Swin ImageNet ones.)"""
    config.input.dataset = "imagenet2012"
    config.input.train_split = "train"
    config.input.eval_split = "validation"
    config.input.image_size = 224
    config.input.train_augment = "inception_crop"
    config.input.hflip = True
    config.input.randaugment = "rand-m9-mstd0.5-inc1"
    config.input.random_erase_prob = 0.25
    config.input.eval_crop_pct = eval_crop_pct
    config.input.resize_method = "bicubic"
    config.input.num_threads = 16
    return config
