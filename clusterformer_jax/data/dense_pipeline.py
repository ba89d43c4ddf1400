"""Input pipelines for dense tasks: tfds array_record data sources read with grain.

Same contract as the classification pipeline (`pipeline.py`): the trainer calls
`get_dataset_info`, `create_train_iterator` and `create_eval_iterator` with the
`config.input` ConfigDict. Process sharding, seeding, skipped-record counting
(`skipped_examples()` counts both pipelines) and the padded eval pass come from
common.py, shared with that pipeline.

Datasets (`config.input.dataset`):
  coco_instances  COCO 2017 detection + instance segmentation, 80 classes
                  (own builder, coco.py).
  coco_panoptic   COCO 2017 panoptic, 80 things + 53 stuff (tfds coco/2017_panoptic).
  ade20k          ADE20K SceneParsing, 150 classes, 0 -> ignore (ade20k.py).
  shapes          procedural shapes on landscapes, 3 things + 3 stuff (shapes.py).

Preparing (once; `tfds build` would need apache_beam, so use this):

  python -m clusterformer_jax.data.dense_pipeline --dataset=coco_instances \
      --data_dir=DATA_DIR --manual_dir=COCO_DIR    # train2017/ val2017/ annotations/
  python -m clusterformer_jax.data.dense_pipeline --dataset=coco_panoptic \
      --data_dir=DATA_DIR [--manual_dir=COCO_DIR]  # without it tfds downloads COCO
  python -m clusterformer_jax.data.dense_pipeline --dataset=ade20k \
      --data_dir=DATA_DIR --manual_dir=ADE_DIR     # holds ADEChallengeData2016/
  python -m clusterformer_jax.data.dense_pipeline --dataset=shapes \
      --data_dir=DATA_DIR [--shapes_variant=small] # also writes the COCO-format export

A dataset that is missing but has `manual_dir` set (shapes: always) is
prepared on first use; on a multi-host job prepare it beforehand.

Config fields (all optional except `dataset`; None -> the dataset default,
listed as coco / ade20k / shapes where they differ):
  data_dir, manual_dir   as in pipeline.py ('~' expanded).
  shapes_variant         'default' (128 px, 2000/200 images) | 'small' (64 px, 48/16).
  train_split            default 'train'; eval_split default 'validation' (tfds slicing works).
  train_crop_size        output side in training: 1024 / 640 / 128.
  train_scale_range      jitter factors: (0.1, 2.0) / (0.5, 2.0) / (0.5, 2.0).
  train_scale_mode       'fit' (LSJ: factor times the fit-in-crop scale) / 'shorter'
                         (factor times the scale that brings the shorter side to the crop size,
                         long side at most 4x) / 'fit'. See dense_transforms.py.
  cat_max_ratio          ADE crop constraint (mmseg): 1.0 (off) / 0.75 / 1.0.
  hflip                  random horizontal flip in training; default True.
  eval_short_side        800 / 640 / 128.
  eval_max_size          longest side at eval: 1333 / 2560 / 128.
  eval_pad_size          eval canvas side (static shape): 1344 / 1280 / 128; the eval scale is
                         also capped so the image fits it.
  max_instances          instance slots per image: 100 / 100 / 16.
  mask_stride            instance masks are (side / stride)^2: 4 / 4 / 1.
  instance_targets       'things' | 'all' (stuff segments too): things for coco_instances,
                         all for the others.
  mean, std              per channel on 0..255; default ImageNet.
  num_threads            grain reader threads per process; default 2.
  prefetch_buffer_size   default 2 * local batch.
  num_workers            grain worker processes (mp_prefetch before batching; batches are
                         identical to the threads-only ones); default 0 (threads only).
  outputs                keys to keep (None: all, see below).

Batches are dicts of numpy arrays with static shapes, B = global_batch_size //
process_count, S = train_crop_size (train) or eval_pad_size (eval), M =
max_instances, s = mask_stride:
  image           float32 (B, S, S, 3) normalised; 0 in padding.
  image_mask      bool (B, S, S) True on image pixels.
  boxes           float32 (B, M, 4) [ymin, xmin, ymax, xmax] in pixels of the S x S canvas
                  (pixel edges: a box around rows 2..5 is 2 .. 6); 0 in empty slots.
  classes         int32 (B, M) contiguous class index; -1 in empty slots.
  instance_masks  uint8 (B, M, S / s, S / s), sampled at the centres of s x s cells.
  instance_valid  bool (B, M); is_crowd, is_thing bool (B, M).
  semantic        int32 (B, S, S) class per pixel, 255 = ignore (padding, void, and
                  everywhere for coco_instances, which has no semantic labels).
  panoptic_ids    int32 (B, S, S) slot index + 1 of the segment at each pixel, 0 = void /
                  padding / dataset without a segment map (coco_instances).
  image_id        int32 (B,) dataset image id (COCO id; ADE file number; shapes index + 1).
  orig_size       int32 (B, 2) source (H, W); scale float32 (B, 2) canvas pixels per
                  source pixel, so source = canvas / scale (eval has no offset).
  mask            float32 (B,) eval only: 1 for real examples, 0 for padding rows.

In eval, labels are resampled to the canvas (nearest); for the official
metrics compare predictions mapped back with `scale` to the original
annotations named by `get_dataset_info` (COCO jsons / panoptic PNGs).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from clusterformer_jax.data import ade20k as ade20k_lib
from clusterformer_jax.data import coco as coco_lib
from clusterformer_jax.data import common
from clusterformer_jax.data import dense_transforms as DT
from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.data import transforms as T
from clusterformer_jax.errors import ConfigError

DATASETS = ("coco_instances", "coco_panoptic", "ade20k", "shapes")
_COCO = dict(
    train_crop_size=1024,
    train_scale_range=(0.1, 2.0),
    train_scale_mode="fit",
    cat_max_ratio=1.0,
    eval_short_side=800,
    eval_max_size=1333,
    eval_pad_size=1344,
    max_instances=100,
    mask_stride=4,
)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "coco_instances": dict(_COCO, instance_targets="things"),
    "coco_panoptic": dict(_COCO, instance_targets="all"),
    "ade20k": dict(
        train_crop_size=640,
        train_scale_range=(0.5, 2.0),
        train_scale_mode="shorter",
        cat_max_ratio=0.75,
        eval_short_side=640,
        eval_max_size=2560,
        eval_pad_size=1280,
        max_instances=100,
        mask_stride=4,
        instance_targets="all",
    ),
    "shapes": dict(
        train_crop_size=128,
        train_scale_range=(0.5, 2.0),
        train_scale_mode="fit",
        cat_max_ratio=1.0,
        eval_short_side=128,
        eval_max_size=128,
        eval_pad_size=128,
        max_instances=16,
        mask_stride=1,
        instance_targets="all",
        shapes_variant="default",
    ),
}
_COMMON = dict(
    train_split="train",
    eval_split="validation",
    hflip=True,
    mean=T.IMAGENET_MEAN,
    std=T.IMAGENET_STD,
    num_threads=2,
    num_workers=0,
)

skipped_examples = common.skipped_examples


def _dataset_name(cfg: Mapping[str, Any]) -> str:
    name = cfg.get("dataset")
    if name not in DATASETS:
        raise ConfigError(
            f'Unknown dense dataset {name!r} (data_dir={cfg.get("data_dir")!r}); set'
            f' config.input.dataset to one of {", ".join(DATASETS)}.'
        )
    return name


def _field(cfg: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """`cfg[name]`, else the dataset's default, else the common default, else `default`."""
    value = cfg.get(name)
    if value is not None:
        return value
    dataset_defaults = _DEFAULTS[_dataset_name(cfg)]
    if name in dataset_defaults:
        return dataset_defaults[name]
    return _COMMON.get(name, default)


def _data_dir(cfg: Mapping[str, Any]) -> str | None:
    data_dir = cfg.get("data_dir")
    return os.path.expanduser(data_dir) if data_dir else None


def _manual_dir(cfg: Mapping[str, Any]) -> str | None:
    manual_dir = cfg.get("manual_dir")
    return os.path.expanduser(manual_dir) if manual_dir else None


def prepare_command(cfg: Mapping[str, Any]) -> str:
    """The one-line shell command that prepares `cfg.dataset`."""
    name = cfg["dataset"]
    command = (
        f"python -m clusterformer_jax.data.dense_pipeline --dataset={name}"
        f' --data_dir={cfg.get("data_dir") or "DATA_DIR"}'
    )
    if name in ("coco_instances", "ade20k"):
        command += " --manual_dir=MANUAL_DIR"
    elif name == "coco_panoptic":
        command += " [--manual_dir=MANUAL_DIR]"
    elif name == "shapes":
        command += f' --shapes_variant={_field(cfg, "shapes_variant")}'
    return command


# Record -> dense example; must pickle (grain may call it in worker processes).
Decoder = Callable[[Mapping[str, Any]], DT.DenseExample]


def _prepare_manual(cfg: Mapping[str, Any], builder: tfds.core.DatasetBuilder) -> None:
    manual_dir = _manual_dir(cfg)
    if not manual_dir:
        raise ConfigError(
            f'Dataset {cfg["dataset"]!r} is not prepared in {builder.data_dir} and'
            f" config.input.manual_dir is unset; run: {prepare_command(cfg)}"
        )
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        raise ConfigError(
            f'config.input.manual_dir={cfg.get("manual_dir")!r} is missing or empty; dataset {cfg["dataset"]!r}'
            f" needs the original files there; run: {prepare_command(cfg)}"
        )
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )


def _builder(cfg: Mapping[str, Any]) -> tuple[tfds.core.DatasetBuilder, Decoder]:
    """The prepared builder for `cfg.dataset` and its record decoder (preparing if possible)."""
    name = _dataset_name(cfg)
    data_dir = _data_dir(cfg)
    if name == "shapes":
        return shapes_lib.prepare_shapes(data_dir, _field(cfg, "shapes_variant")), shapes_lib.decode
    if name == "coco_panoptic":
        directory = coco_lib.panoptic_builder_dir(data_dir)
        if directory is None:
            if not _manual_dir(cfg):
                raise ConfigError(
                    f"Dataset 'coco_panoptic' is not prepared in"
                    f" {data_dir or tfds.core.constants.DATA_DIR} and config.input.manual_dir is"
                    f" unset; run: {prepare_command(cfg)}"
                )
            coco_lib.prepare_coco_panoptic(data_dir, _manual_dir(cfg))
            directory = coco_lib.panoptic_builder_dir(data_dir)
        builder = tfds.builder_from_directory(directory)
        names = builder.info.features["panoptic_objects"]["label"].names
        return builder, coco_lib.PanopticDecoder(names).map
    if name == "coco_instances":
        builder = coco_lib.CocoInstances(data_dir=data_dir, file_format="array_record")
        decoder: Decoder = coco_lib.decode_instances
    else:
        builder = ade20k_lib.Ade20k(data_dir=data_dir, file_format="array_record")
        decoder = ade20k_lib.decode
    if not builder.is_prepared():
        _prepare_manual(cfg, builder)
    return builder, decoder


def _num_examples(builder: tfds.core.DatasetBuilder, cfg: Mapping[str, Any], split: str) -> int:
    try:
        num = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError):
        num = 0
    if not num:
        raise ConfigError(
            f'Split {split!r} of dataset {cfg["dataset"]!r} is missing or empty in'
            f' {builder.data_dir} (available: {", ".join(builder.info.splits) or "none"});'
            f" prepare it with: {prepare_command(cfg)}"
        )
    return num


# Datasets whose JPEGs come as stored bytes: the decoder converts them with PIL (``to_rgb``), so a CMYK or
# greyscale JPEG becomes RGB; tfds' own decoding returns CMYK as a 4-channel array indistinguishable from RGBA.
_IMAGE_BYTES = ("coco_instances", "coco_panoptic", "ade20k")


def _open_split(cfg: Mapping[str, Any], split: str) -> common.DecodedSource:
    builder, decoder = _builder(cfg)
    _num_examples(builder, cfg, split)
    description = f'{cfg["dataset"]}:{split} in {builder.data_dir}'
    decoders = {"image": tfds.decode.SkipDecoding()} if cfg["dataset"] in _IMAGE_BYTES else None
    return common.DecodedSource(builder.as_data_source(split, decoders=decoders), description, decoder)


def _side(value: Any) -> int:
    value = int(value)
    if value <= 0:
        raise ConfigError(f"image sizes must be positive, got {value}")
    return value


def _spec(cfg: Mapping[str, Any], side: int) -> DT.RenderSpec:
    return DT.RenderSpec(
        out_h=side,
        out_w=side,
        max_instances=int(_field(cfg, "max_instances")),
        mask_stride=int(_field(cfg, "mask_stride")),
        instance_targets=_field(cfg, "instance_targets"),
        mean=tuple(_field(cfg, "mean")),
        std=tuple(_field(cfg, "std")),
    )


def train_transform(cfg: Mapping[str, Any]) -> DT.DenseTrainTransform:
    """The per-example training transform for `cfg` (dense example in, fixed-shape arrays out)."""
    return DT.DenseTrainTransform(
        _spec(cfg, _side(_field(cfg, "train_crop_size"))),
        scale_range=tuple(_field(cfg, "train_scale_range")),
        scale_mode=_field(cfg, "train_scale_mode"),
        hflip=bool(_field(cfg, "hflip")),
        cat_max_ratio=float(_field(cfg, "cat_max_ratio")),
    )


def eval_transform(cfg: Mapping[str, Any]) -> DT.DenseEvalTransform:
    """The deterministic eval transform for `cfg`."""
    return DT.DenseEvalTransform(
        _spec(cfg, _side(_field(cfg, "eval_pad_size"))),
        short_side=_side(_field(cfg, "eval_short_side")),
        max_size=_side(_field(cfg, "eval_max_size")),
    )


def _eval_files(cfg: Mapping[str, Any], builder: tfds.core.DatasetBuilder) -> dict[str, str | None]:
    """Original annotation files of the eval split, for COCO-style evaluators (None if unknown)."""
    files: dict[str, str | None] = {"instances_json": None, "panoptic_json": None, "panoptic_png_dir": None}
    name, split = cfg["dataset"], str(_field(cfg, "eval_split")).split("[")[0]
    manual_dir = _manual_dir(cfg)
    if name == "shapes":
        paths = shapes_lib.export_coco(builder, split)
        files.update({k: paths[k] for k in files})
    elif manual_dir and split in coco_lib.INSTANCE_SPLITS:
        folder = coco_lib.INSTANCE_SPLITS[split]
        candidates = {
            "coco_instances": {"instances_json": f"annotations/instances_{folder}.json"},
            "coco_panoptic": {
                "panoptic_json": f"annotations/panoptic_{folder}.json",
                "panoptic_png_dir": f"annotations/panoptic_{folder}",
            },
        }.get(name, {})
        for key, rel in candidates.items():
            path = os.path.join(manual_dir, rel)
            files[key] = path if os.path.exists(path) else None
    return files


def _class_table(
    cfg: Mapping[str, Any], builder: tfds.core.DatasetBuilder
) -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    """(class names, is-thing flags, dataset category ids) in contiguous class order."""
    name = cfg["dataset"]
    if name == "coco_instances":
        return (
            tuple(n for _, n in coco_lib.COCO_THING_CATEGORIES),
            (True,) * 80,
            tuple(i for i, _ in coco_lib.COCO_THING_CATEGORIES),
        )
    if name == "coco_panoptic":
        names = tuple(builder.info.features["panoptic_objects"]["label"].names)
        ids, thing = coco_lib.panoptic_class_table(names)
        return names, tuple(thing), tuple(ids)
    if name == "ade20k":
        return ade20k_lib.ADE20K_CLASSES, (False,) * ade20k_lib.NUM_CLASSES, tuple(range(1, 151))
    classes = shapes_lib.CLASSES
    return (
        classes,
        tuple(c < shapes_lib.NUM_THING_CLASSES for c in range(len(classes))),
        tuple(range(1, len(classes) + 1)),
    )


def get_dataset_info(config: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset facts for building the model and evaluators.

    Keys: num_classes, num_thing_classes, class_names, is_thing, category_ids
    (dataset id of each contiguous class: COCO category id, ADE label value,
    shapes class + 1), num_train, num_eval (global counts), image_size (train
    crop side), eval_image_size (eval canvas side), max_instances, mask_size
    (train mask side), ignore_label, and the eval split's original annotation
    files instances_json, panoptic_json, panoptic_png_dir (None when unknown).
    """
    builder, _ = _builder(config)
    names, thing, ids = _class_table(config, builder)
    crop = _side(_field(config, "train_crop_size"))
    return {
        "num_classes": len(names),
        "num_thing_classes": int(sum(thing)),
        "class_names": names,
        "is_thing": thing,
        "category_ids": ids,
        "num_train": _num_examples(builder, config, _field(config, "train_split")),
        "num_eval": _num_examples(builder, config, _field(config, "eval_split")),
        "image_size": crop,
        "eval_image_size": _side(_field(config, "eval_pad_size")),
        "max_instances": int(_field(config, "max_instances")),
        "mask_size": crop // int(_field(config, "mask_stride")),
        "ignore_label": DT.IGNORE_LABEL,
        **_eval_files(config, builder),
    }


# Published split sizes (train, eval): COCO 2017 train/val, ADEChallengeData2016 training/validation.
_PUBLISHED_SIZES = {"coco_instances": (118_287, 5_000), "coco_panoptic": (118_287, 5_000), "ade20k": (20_210, 2_000)}


def offline_dataset_info(config: Mapping[str, Any]) -> dict[str, Any]:
    """``get_dataset_info`` without opening the dataset (for the ahead-of-time compile check): class tables
    from the code, published split sizes (shapes: its variant's), no annotation files."""
    name = _dataset_name(config)
    if name == "shapes":
        variant = shapes_lib.VARIANTS[_field(config, "shapes_variant")]
        sizes = (variant.num_train, variant.num_validation)
    else:
        sizes = _PUBLISHED_SIZES[name]
    if name == "coco_panoptic":  # the prepared builder's label order is the canonical category order
        table = [(n, thing, i) for i, n, thing in coco_lib.COCO_PANOPTIC_CATEGORIES]
        names, thing, ids = (tuple(column) for column in zip(*table))
    else:
        names, thing, ids = _class_table(config, None)
    crop = _side(_field(config, "train_crop_size"))
    return {
        "num_classes": len(names),
        "num_thing_classes": int(sum(thing)),
        "class_names": names,
        "is_thing": thing,
        "category_ids": ids,
        "num_train": sizes[0],
        "num_eval": sizes[1],
        "image_size": crop,
        "eval_image_size": _side(_field(config, "eval_pad_size")),
        "max_instances": int(_field(config, "max_instances")),
        "mask_size": crop // int(_field(config, "mask_stride")),
        "ignore_label": DT.IGNORE_LABEL,
        "instances_json": None,
        "panoptic_json": None,
        "panoptic_png_dir": None,
    }


def example_spec(config: Mapping[str, Any], eval_mode: bool) -> dict[str, np.ndarray]:
    """One all-padding example with the keys, shapes and dtypes of a train (or eval) batch row."""
    spec = (eval_transform(config) if eval_mode else train_transform(config)).spec
    example = DT.empty_output(spec)
    keys = _outputs(config, eval_mode)
    if eval_mode:
        example["mask"] = np.float32(0)
    return {k: example[k] for k in keys} if keys else example


def _read_options(cfg: Mapping[str, Any], local_batch: int) -> grain.ReadOptions:
    return common.read_options(_field(cfg, "num_threads"), _field(cfg, "prefetch_buffer_size"), local_batch)


def _outputs(cfg: Mapping[str, Any], eval_mode: bool) -> tuple[str, ...] | None:
    keys = cfg.get("outputs")
    if keys is None:
        return None
    keys = tuple(keys) + (("mask",) if eval_mode and "mask" not in keys else ())
    known = set(DT.empty_output(DT.RenderSpec(1, 1, 1))) | {"mask"}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ConfigError(f"config.input.outputs has unknown keys {unknown}; known: {sorted(known)}")
    return keys


def create_train_iterator(
    config: Mapping[str, Any],
    *,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of augmented training batches for this process.

    One global stream, reshuffled every epoch from `seed`, with augmentation a
    function of (seed, position); process p of P takes rows [p * B/P, (p + 1) * B/P)
    of each global batch of B (`common.LocalRows`), so the global batches do not
    depend on P, and `get_state` / `set_state` resume exactly. Unreadable records
    are replaced by the next readable one and counted in `skipped_examples()`.
    """
    layout = common.process_layout(global_batch_size, process_index, process_count)
    local_batch = layout.local_batch
    transform = train_transform(config)
    keys = _outputs(config, eval_mode=False)
    source = _open_split(config, _field(config, "train_split"))
    shuffle_seed, augment_seed = common.derive_seeds(seed)
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    ds = ds.random_map(transform, seed=augment_seed)  # Unreadable (None) records pass through ...
    if keys:
        ds = ds.map(common.SelectKeys(keys))
    ds = common.LocalRows(ds, layout)  # ... and are replaced here.
    it_ds = ds.to_iter_dataset(_read_options(config, local_batch))
    return iter(common.batch_local(it_ds, local_batch, int(_field(config, "num_workers"))))


def create_eval_iterator(
    config: Mapping[str, Any],
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """One pass over the eval split for this process, as full batches with a padding `mask`.

    Process p takes examples p, p + P, ...; every process yields
    ceil(ceil(N / P) / local_batch) batches, padded with `DT.empty_output` rows of
    mask 0, so the masks of all processes sum to N minus unreadable records. Each
    `iter()` starts a fresh pass (`common.padded_eval_dataset`).
    """
    layout = common.process_layout(global_batch_size, process_index, process_count)
    transform = eval_transform(config)
    keys = _outputs(config, eval_mode=True)
    return common.padded_eval_dataset(
        _open_split(config, _field(config, "eval_split")),
        layout,
        transform=transform.map,
        padding=functools.partial(DT.empty_output, transform.spec),
        options=_read_options(config, layout.local_batch),
        outputs=keys,
        num_workers=int(_field(config, "num_workers")),
    )


def main(argv: list[str] | None = None) -> None:
    """Prepares a dense dataset in array_record format (see the module docstring)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--manual_dir", default=None)
    parser.add_argument("--shapes_variant", default="default", choices=sorted(shapes_lib.VARIANTS))
    args = parser.parse_args(argv)
    cfg = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "manual_dir": args.manual_dir,
        "shapes_variant": args.shapes_variant,
    }
    if args.dataset == "coco_panoptic" and coco_lib.panoptic_builder_dir(_data_dir(cfg)) is None:
        coco_lib.prepare_coco_panoptic(_data_dir(cfg), _manual_dir(cfg))  # Downloads without manual_dir.
    builder, _ = _builder(cfg)
    print(f"{builder.info.full_name} ready in {builder.data_dir}:")
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples")
    if args.dataset == "shapes":
        for split in builder.info.splits:
            paths = shapes_lib.export_coco(builder, split)
            print(f'  COCO-format {split}: {paths["instances_json"]}, {paths["panoptic_json"]}')


if __name__ == "__main__":
    main()
