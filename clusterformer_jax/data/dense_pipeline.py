"""Input pipelines for dense tasks: tfds array_record data sources read with grain.

Same contract as the classification pipeline (`pipeline.py`): the trainer calls
`get_dataset_info`, `create_train_iterator` and `create_eval_iterator` with the
`config.input` ConfigDict. Process sharding, seeding, skipped-record counting
(`skipped_examples()` counts both pipelines) and the padded eval pass come from
common.py, shared with that pipeline.

Datasets (`config.input.dataset`, the table in dense_datasets.py; `register_dataset` adds one):
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
  (pixel maps)    any other per-pixel map the dataset's entry declares (`pixel_maps`),
                  (B, S, S, ...) of its dtype, its fill value in padding.
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
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from clusterformer_jax.data import common
from clusterformer_jax.data import dense_datasets as datasets
from clusterformer_jax.data import dense_transforms as DT
from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.errors import ConfigError

skipped_examples = common.skipped_examples
prepare_command = datasets.prepare_command
_field = datasets.field


def _builder(cfg: Mapping[str, Any]) -> tuple[tfds.core.DatasetBuilder, datasets.Decoder]:
    """The prepared builder for `cfg.dataset` and its record decoder (preparing if possible)."""
    return datasets.entry(cfg).open(cfg)


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


def _open_split(cfg: Mapping[str, Any], split: str) -> common.DecodedSource:
    builder, decoder = _builder(cfg)
    _num_examples(builder, cfg, split)
    description = f'{cfg["dataset"]}:{split} in {builder.data_dir}'
    # Stored JPEG bytes: the decoder converts them with PIL (``to_rgb``), so a CMYK or greyscale JPEG becomes RGB;
    # tfds' own decoding returns CMYK as a 4-channel array indistinguishable from RGBA.
    decoders = {"image": tfds.decode.SkipDecoding()} if datasets.entry(cfg).image_bytes else None
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
        pixel_maps={"semantic": DT.SEMANTIC, **datasets.entry(cfg).pixel_maps},
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


_EVAL_FILES = ("instances_json", "panoptic_json", "panoptic_png_dir")


def _eval_files(cfg: Mapping[str, Any], builder: tfds.core.DatasetBuilder) -> dict[str, str | None]:
    """Original annotation files of the eval split, for COCO-style evaluators (None if unknown)."""
    eval_files = datasets.entry(cfg).eval_files
    found = eval_files(cfg, builder, str(_field(cfg, "eval_split")).split("[")[0]) if eval_files else {}
    return {key: found.get(key) for key in _EVAL_FILES}


def _info(config: Mapping[str, Any], class_table: datasets.ClassTable, sizes: tuple[int, int]) -> dict[str, Any]:
    names, thing, ids = class_table
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
    }


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
    sizes = (
        _num_examples(builder, config, _field(config, "train_split")),
        _num_examples(builder, config, _field(config, "eval_split")),
    )
    info = _info(config, datasets.entry(config).class_table(config, builder), sizes)
    return {**info, **_eval_files(config, builder)}


def offline_dataset_info(config: Mapping[str, Any]) -> dict[str, Any]:
    """``get_dataset_info`` without opening the dataset (for the ahead-of-time compile check): class tables
    from the code, published split sizes (the entry's ``sizes``), no annotation files."""
    entry = datasets.entry(config)
    if entry.sizes is None:
        raise ConfigError(f'dataset {config["dataset"]!r} does not state its split sizes (DenseDataset.sizes)')
    info = _info(config, entry.class_table(config, None), entry.sizes(config))
    return {**info, **{key: None for key in _EVAL_FILES}}


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
    known = set(DT.empty_output(_spec(cfg, 1))) | {"mask"}
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
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS))
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
    entry = datasets.entry(cfg)
    if entry.prepare is not None:
        entry.prepare(cfg)
    builder, _ = entry.open(cfg)
    print(f"{builder.info.full_name} ready in {builder.data_dir}:")
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples")
    for split in builder.info.splits if entry.eval_files else ():
        files = {k: v for k, v in entry.eval_files(cfg, builder, split).items() if k in _EVAL_FILES and v}
        if files:
            print(f'  annotation files {split}: {", ".join(files.values())}')


if __name__ == "__main__":
    main()
