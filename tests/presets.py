"""The tiny configs the test files share: one dense, one classification.

Every test that compiles a dense model or a classifier through the trainer starts from one of these, so the
programs it compiles (the init, the train step on a mesh, the one-device predict step) are the same programs
another file compiled, and the run-wide persistent XLA cache (launch/test.sh, tests/conftest.py) serves them. Change a preset and every file that uses it changes.
"""

from __future__ import annotations

import ml_collections

from tests import load_config

# clusterformer_nano cut to one block per stage at width 8 and T = 2 EM iterations: every remat boundary, the
# rolled EM scan and the group-chunk loop of the nano, compiling several times faster (the model tests whose
# properties hold for any width and depth use it)
NANO_CUT = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), head_dim=4, num_iters=2)
DIGITS_INFO = {"num_classes": 10, "num_train": 1437, "num_eval": 360, "image_size": 32}  # the prepared digits
DENSE_BATCH = 8
DENSE_STEPS = 6  # the whole dense run's length


def tiny_dense_config(data_dir: str, filename: str = "shapes_instance.py") -> ml_collections.ConfigDict:
    """ClusterFormer-nano behind a two-layer cluster decoder (dim 32, 8 queries, strides 32 and 16, 2 heads, no
    pixel-decoder blocks) on the 64 px small shapes (48 train / 16 validation images; stage maps 16/8/4/2),
    batch 8 for 6 steps on the 2x4 data x fsdp mesh.

    The decoder's 32x32 kernels are split over fsdp=4 (``fsdp_min_size`` 1024). Adam's eps and two discrete
    choices are set so that different meshes can be compared at 1e-5:

    - Adam's step is lr * g / (|g| + eps): for a gradient that is pure roundoff or near eps (e.g. a bias right
      before a normalisation), summation-order noise of ~1e-8 between meshes would move the parameter by
      ~lr * 1e-8 / eps. eps = 1e-4 keeps that far below the tolerances.
    - The most uncertain mask points (a top-k over |logit|) and the box of each mask (logit > 0) would turn
      last-bit differences between meshes into different losses. Uniform points and boxes refined from the
      previous layer keep every step a continuous function of the parameters; both choices have their own
      value tests.
    """
    config = load_config(filename, "clusterformer")
    config.input.data_dir = data_dir
    config.input.shapes_variant = "small"
    config.input.train_crop_size = 64
    config.input.eval_pad_size = 64
    config.input.eval_short_side = 64
    config.input.eval_max_size = 64
    config.input.max_instances = 4
    config.model.decoder.update(dim=32, num_queries=8, num_layers=2, layer_strides=(32, 16), num_heads=2, ffn_dim=64)
    config.model.decoder.pixel_blocks = (0, 0, 0, 0)  # the plain FPN (the blocks have their own tests)
    config.detection.num_points = 256
    config.batch_size = DENSE_BATCH
    config.num_train_steps = DENSE_STEPS
    config.log_every_steps = 3
    config.eval_every_steps = 3  # one eval mid-run, one at the end
    config.checkpoint.every_steps = DENSE_STEPS
    config.sharding.fsdp_min_size = 1024
    config.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 4})  # data parallel and FSDP at once
    config.optim.warmup_steps = 0  # the full learning rate from the first step
    config.optim.eps = 1e-4
    config.detection.importance_ratio = 0.0
    config.model.decoder.box_reference = "previous"
    return config


def tiny_classification_config(data_dir: str = "") -> ml_collections.ConfigDict:
    """The quickstart (clusterformer_nano on 32 px digits) for 20 steps at batch 16 (eval batch 120), with every
    random op on (drop path, label smoothing, Mixup and CutMix), on the 2x4 data x fsdp mesh with the big
    leaves split over fsdp (``fsdp_min_size`` 1024).

    Adam's first step is lr * g / (|g| + eps): for a gradient near eps, summation-order noise of 1e-10 in g
    moves the parameter by ~lr * 1e-10 / eps. eps = 1e-6 keeps that far below the 1e-5 tolerance between
    meshes.
    """
    config = load_config("quickstart.py")
    config.input.data_dir = data_dir or None
    config.batch_size = 16
    config.eval_batch_size = 120
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.eval_every_steps = 0
    config.checkpoint.every_steps = 10
    config.model.kwargs.drop_path_rate = 0.1
    config.classification.label_smoothing = 0.1
    config.classification.mixup_alpha = 0.8
    config.classification.cutmix_alpha = 1.0
    config.sharding.fsdp_min_size = 1024
    config.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 4})  # data parallel and FSDP at once
    config.optim.warmup_steps = 5
    config.optim.eps = 1e-6
    return config
