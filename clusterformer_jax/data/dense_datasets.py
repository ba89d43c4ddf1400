"""The dense dataset table: ``config.input.dataset`` -> how to open, decode, describe and prepare it.

``dense_pipeline.py`` reads every dense dataset through this table and never branches on a dataset's name, so
a new dataset is one ``register_dataset(name, DenseDataset(...))``: a function returning the prepared tfds
builder and its record decoder (record -> dense example, see ``dense_transforms.py``), its class table, the
``config.input`` defaults it sets, the flags of its prepare command, and any per-pixel target maps its decoder
adds (rendered like ``semantic``, see ``dense_transforms.PixelMap``).

Built in: coco_instances (own builder, coco.py), coco_panoptic (tfds coco/2017_panoptic), ade20k (ade20k.py)
and shapes (shapes.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow_datasets as tfds

from clusterformer_jax.data import ade20k as ade20k_lib
from clusterformer_jax.data import coco as coco_lib
from clusterformer_jax.data import dense_transforms as DT
from clusterformer_jax.data import shapes as shapes_lib
from clusterformer_jax.data import transforms as T
from clusterformer_jax.errors import ConfigError

Decoder = Callable[[Mapping[str, Any]], DT.DenseExample]  # must pickle: grain may call it in worker processes
Builder = tfds.core.DatasetBuilder
ClassTable = tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]  # names, is-thing flags, dataset ids


@dataclasses.dataclass(frozen=True)
class DenseDataset:
    """One entry of the table. ``cfg`` below is ``config.input``."""

    open: Callable[[Mapping[str, Any]], tuple[Builder, Decoder]]  # prepared builder + decoder (preparing if it can)
    # In contiguous class order; the builder is None for a table read without opening the data.
    class_table: Callable[[Mapping[str, Any], Builder | None], ClassTable]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # for config.input fields left None
    prepare_flags: str = ""  # prepare-command flags after --data_dir; '{field}' is the resolved config.input field
    # (cfg, builder, eval split) -> any of instances_json, panoptic_json, panoptic_png_dir (original annotations)
    eval_files: Callable[[Mapping[str, Any], Builder, str], Mapping[str, str | None]] | None = None
    image_bytes: bool = False  # records hold encoded JPEGs that the decoder converts (tfds decoding skipped)
    pixel_maps: Mapping[str, DT.PixelMap] = dataclasses.field(default_factory=dict)  # besides 'semantic'
    prepare: Callable[[Mapping[str, Any]], None] | None = None  # extra preparation only the command line does
    sizes: Callable[[Mapping[str, Any]], tuple[int, int]] | None = None  # published (train, eval) sizes


DATASETS: dict[str, DenseDataset] = {}

# Defaults of every dataset (an entry's `defaults` override them).
COMMON_DEFAULTS: dict[str, Any] = dict(
    train_split="train",
    eval_split="validation",
    hflip=True,
    mean=T.IMAGENET_MEAN,
    std=T.IMAGENET_STD,
    num_threads=2,
    num_workers=0,
)


def register_dataset(name: str, dataset: DenseDataset) -> None:
    """Adds (or replaces) ``name`` in the table; ``config.input.dataset = name`` then reads it."""
    DATASETS[name] = dataset


def entry(cfg: Mapping[str, Any]) -> DenseDataset:
    """The table entry of ``cfg.dataset``, with a one-line error naming the known ones."""
    name = cfg.get("dataset")
    if name not in DATASETS:
        raise ConfigError(
            f'Unknown dense dataset {name!r} (data_dir={cfg.get("data_dir")!r}); set'
            f' config.input.dataset to one of {", ".join(DATASETS)}.'
        )
    return DATASETS[name]


def field(cfg: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``cfg[name]``, else the dataset's default, else the common default, else ``default``."""
    value = cfg.get(name)
    if value is not None:
        return value
    defaults = entry(cfg).defaults
    if name in defaults:
        return defaults[name]
    return COMMON_DEFAULTS.get(name, default)


def data_dir(cfg: Mapping[str, Any]) -> str | None:
    value = cfg.get("data_dir")
    return os.path.expanduser(value) if value else None


def manual_dir(cfg: Mapping[str, Any]) -> str | None:
    value = cfg.get("manual_dir")
    return os.path.expanduser(value) if value else None


def prepare_command(cfg: Mapping[str, Any]) -> str:
    """The one-line shell command that prepares ``cfg.dataset``."""
    name = cfg["dataset"]
    flags = DATASETS[name].prepare_flags if name in DATASETS else ""
    flags = flags.format(**{key: field(cfg, key) for key in re.findall(r"{(\w+)}", flags)})
    return (
        f"python -m clusterformer_jax.data.dense_pipeline --dataset={name}"
        f' --data_dir={cfg.get("data_dir") or "DATA_DIR"}{flags}'
    )


def prepare_manual(cfg: Mapping[str, Any], builder: Builder) -> None:
    """Builds ``builder`` from the original files in ``cfg.manual_dir`` (one-line errors when unusable)."""
    directory = manual_dir(cfg)
    if not directory:
        raise ConfigError(
            f'Dataset {cfg["dataset"]!r} is not prepared in {builder.data_dir} and'
            f" config.input.manual_dir is unset; run: {prepare_command(cfg)}"
        )
    if not os.path.isdir(directory) or not os.listdir(directory):
        raise ConfigError(
            f'config.input.manual_dir={cfg.get("manual_dir")!r} is missing or empty; dataset {cfg["dataset"]!r}'
            f" needs the original files there; run: {prepare_command(cfg)}"
        )
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=directory)
    )


def _prepared(cfg: Mapping[str, Any], builder: Builder) -> Builder:
    if not builder.is_prepared():
        prepare_manual(cfg, builder)
    return builder


# ---------------------------------------------------------------------------- built-in entries

# Published split sizes (train, eval): COCO 2017 train/val, ADEChallengeData2016 training/validation.
_COCO_SIZES, _ADE20K_SIZES = (118_287, 5_000), (20_210, 2_000)

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


def _coco_eval_files(keys: Mapping[str, str]) -> Callable[[Mapping[str, Any], Builder, str], dict[str, str | None]]:
    """Files under ``manual_dir`` (``{folder}``: train2017 / val2017), None where absent."""

    def files(cfg: Mapping[str, Any], builder: Builder, split: str) -> dict[str, str | None]:
        del builder
        root = manual_dir(cfg)
        if not root or split not in coco_lib.INSTANCE_SPLITS:
            return {}
        paths = {k: os.path.join(root, rel.format(folder=coco_lib.INSTANCE_SPLITS[split])) for k, rel in keys.items()}
        return {k: path if os.path.exists(path) else None for k, path in paths.items()}

    return files


def _open_coco_instances(cfg: Mapping[str, Any]) -> tuple[Builder, Decoder]:
    builder = coco_lib.CocoInstances(data_dir=data_dir(cfg), file_format="array_record")
    return _prepared(cfg, builder), coco_lib.decode_instances


def _coco_instances_classes(cfg: Mapping[str, Any], builder: Builder) -> ClassTable:
    categories = coco_lib.COCO_THING_CATEGORIES
    return tuple(n for _, n in categories), (True,) * len(categories), tuple(i for i, _ in categories)


def _open_coco_panoptic(cfg: Mapping[str, Any]) -> tuple[Builder, Decoder]:
    directory = coco_lib.panoptic_builder_dir(data_dir(cfg))
    if directory is None:
        if not manual_dir(cfg):
            raise ConfigError(
                f"Dataset 'coco_panoptic' is not prepared in"
                f" {data_dir(cfg) or tfds.core.constants.DATA_DIR} and config.input.manual_dir is"
                f" unset; run: {prepare_command(cfg)}"
            )
        coco_lib.prepare_coco_panoptic(data_dir(cfg), manual_dir(cfg))
        directory = coco_lib.panoptic_builder_dir(data_dir(cfg))
    builder = tfds.builder_from_directory(directory)
    names = builder.info.features["panoptic_objects"]["label"].names
    return builder, coco_lib.PanopticDecoder(names).map


def _download_coco_panoptic(cfg: Mapping[str, Any]) -> None:
    if coco_lib.panoptic_builder_dir(data_dir(cfg)) is None:
        coco_lib.prepare_coco_panoptic(data_dir(cfg), manual_dir(cfg))  # Downloads without manual_dir.


def _coco_panoptic_classes(cfg: Mapping[str, Any], builder: Builder | None) -> ClassTable:
    if builder is None:  # the prepared builder's label order is the canonical category order
        table = [(n, thing, i) for i, n, thing in coco_lib.COCO_PANOPTIC_CATEGORIES]
        names, thing, ids = (tuple(column) for column in zip(*table))
        return names, thing, ids
    names = tuple(builder.info.features["panoptic_objects"]["label"].names)
    ids, thing = coco_lib.panoptic_class_table(names)
    return names, tuple(thing), tuple(ids)


def _open_ade20k(cfg: Mapping[str, Any]) -> tuple[Builder, Decoder]:
    builder = ade20k_lib.Ade20k(data_dir=data_dir(cfg), file_format="array_record")
    return _prepared(cfg, builder), ade20k_lib.decode


def _ade20k_classes(cfg: Mapping[str, Any], builder: Builder) -> ClassTable:
    return ade20k_lib.ADE20K_CLASSES, (False,) * ade20k_lib.NUM_CLASSES, tuple(range(1, ade20k_lib.NUM_CLASSES + 1))


def _open_shapes(cfg: Mapping[str, Any]) -> tuple[Builder, Decoder]:
    return shapes_lib.prepare_shapes(data_dir(cfg), field(cfg, "shapes_variant")), shapes_lib.decode


def _shapes_classes(cfg: Mapping[str, Any], builder: Builder) -> ClassTable:
    classes = shapes_lib.CLASSES
    return (
        classes,
        tuple(c < shapes_lib.NUM_THING_CLASSES for c in range(len(classes))),
        tuple(range(1, len(classes) + 1)),
    )


def _shapes_sizes(cfg: Mapping[str, Any]) -> tuple[int, int]:
    variant = shapes_lib.VARIANTS[field(cfg, "shapes_variant")]
    return variant.num_train, variant.num_validation


def _shapes_eval_files(cfg: Mapping[str, Any], builder: Builder, split: str) -> dict[str, str]:
    return shapes_lib.export_coco(builder, split)  # writes the COCO-format export once


register_dataset(
    "coco_instances",
    DenseDataset(
        open=_open_coco_instances,
        class_table=_coco_instances_classes,
        defaults=dict(_COCO, instance_targets="things"),
        prepare_flags=" --manual_dir=MANUAL_DIR",
        eval_files=_coco_eval_files({"instances_json": "annotations/instances_{folder}.json"}),
        image_bytes=True,
        sizes=lambda cfg: _COCO_SIZES,
    ),
)
register_dataset(
    "coco_panoptic",
    DenseDataset(
        open=_open_coco_panoptic,
        class_table=_coco_panoptic_classes,
        defaults=dict(_COCO, instance_targets="all"),
        prepare_flags=" [--manual_dir=MANUAL_DIR]",
        eval_files=_coco_eval_files(
            {
                "panoptic_json": "annotations/panoptic_{folder}.json",
                "panoptic_png_dir": "annotations/panoptic_{folder}",
            }
        ),
        image_bytes=True,
        prepare=_download_coco_panoptic,
        sizes=lambda cfg: _COCO_SIZES,
    ),
)
register_dataset(
    "ade20k",
    DenseDataset(
        open=_open_ade20k,
        class_table=_ade20k_classes,
        defaults=dict(
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
        prepare_flags=" --manual_dir=MANUAL_DIR",
        image_bytes=True,
        sizes=lambda cfg: _ADE20K_SIZES,
    ),
)
register_dataset(
    "shapes",
    DenseDataset(
        open=_open_shapes,
        class_table=_shapes_classes,
        defaults=dict(
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
        prepare_flags=" --shapes_variant={shapes_variant}",
        eval_files=_shapes_eval_files,
        sizes=_shapes_sizes,
    ),
)
