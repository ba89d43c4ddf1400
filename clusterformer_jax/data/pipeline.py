"""Input pipeline: tfds array_record data sources read with grain.

The trainer calls `get_dataset_info`, `create_train_iterator` and
`create_eval_iterator` with the `config.input` ConfigDict. Fields read (all
optional except `dataset`):

  dataset            'digits' | 'imagenet2012'.
  data_dir           tfds data dir; None -> tfds default ($TFDS_DATA_DIR or
                     ~/tensorflow_datasets). '~' is expanded.
  manual_dir         imagenet2012 only: directory holding
                     ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar;
                     None -> the dataset must already be prepared.
  train_split        default 'train'; tfds slicing ('train[:99%]') works.
  eval_split         default 'test' (digits) / 'validation' (imagenet2012).
  image_size         output height = width; default 32 (digits) / 224.
  train_augment      'inception_crop' (RandomResizedCrop, scale (0.08, 1)) or
                     'resize' (plain resize to image_size); default 'resize'
                     (digits) / 'inception_crop'. Eval uses a plain resize
                     when this is 'resize', else shorter-side resize + crop.
  eval_crop_pct      default 0.875; the ClusterFormer recipe uses 224 / 248 = 0.903.
  resize_method      'bicubic' (default) | 'bilinear'.
  hflip              random horizontal flip in training; default True
                     (imagenet2012) / False (digits, where True is an error).
  randaugment        None (default) or a timm spec like 'rand-m9-mstd0.5-inc1';
                     geometric ops fill with round(mean).
  random_erase_prob  default 0.0 (off); mode 'rand', area (0.02, 1/3).
  mean, std          per channel on the 0..255 scale; default ImageNet
                     (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375).
  num_threads        grain reader threads per process; default 2 (imagenet2012) /
                     0 (digits: examples come from the in-memory cache, where
                     reader threads cost more than they save).
  prefetch_buffer_size  elements grain prefetches; default 2 * local batch.
  batch_prefetch     whole train batches a background thread assembles ahead of
                     the trainer; default 2 (0: assemble in the trainer's thread).
  cache_train        keep every decoded train example in memory, after the
                     transform steps that come before the first random one
                     (for digits: the resize and the normalisation, so an epoch
                     after the first costs only indexing). Default True for
                     digits, False for imagenet2012; only for splits that fit
                     in RAM. Same batches either way.

Elements are `{'image': float32 (B, H, W, 3), 'label': int32 (B,)}` (plus
`'mask': float32 (B,)` in eval), with B = global_batch_size // process_count.

Preparing ImageNet (once, before training; needs the two ILSVRC2012 tars):

  python -m clusterformer_jax.data.pipeline --dataset=imagenet2012 \
      --data_dir=DATA_DIR --manual_dir=MANUAL_DIR

(`tfds build` would do the same but its CLI needs apache_beam.) If the
dataset is missing and `manual_dir` is set, the pipeline prepares it itself;
on a multi-host job prepare it beforehand so hosts do not race.

Records that fail to read or decode are skipped (train) or masked out (eval),
counted in `skipped_examples()` and logged. The source wrapper, process layout,
seeds and the padded eval pass are shared with the dense pipeline (common.py).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from clusterformer_jax.data import common
from clusterformer_jax.data import digits as digits_lib
from clusterformer_jax.data import transforms as T
from clusterformer_jax.errors import ConfigError

DATASETS = ("digits", "imagenet2012")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(
        eval_split="test", image_size=32, train_augment="resize", hflip=False, cache_train=True, num_threads=0
    ),
    "imagenet2012": dict(eval_split="validation", image_size=224, train_augment="inception_crop", hflip=True),
}

skipped_examples = common.skipped_examples


def _dataset_name(cfg: Mapping[str, Any]) -> str:
    name = cfg.get("dataset")
    if name not in DATASETS:
        raise ConfigError(
            f'Unknown dataset {name!r} (data_dir={cfg.get("data_dir")!r}); set'
            f' config.input.dataset to one of {", ".join(DATASETS)}.'
        )
    return name


def _field(cfg: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """`cfg[name]`, else the dataset's default, else `default`."""
    value = cfg.get(name)
    if value is not None:
        return value
    return _DEFAULTS[_dataset_name(cfg)].get(name, default)


def _prepare_command(cfg: Mapping[str, Any]) -> str:
    return (
        f'python -m clusterformer_jax.data.pipeline --dataset={cfg["dataset"]}'
        f' --data_dir={cfg.get("data_dir") or "DATA_DIR"}'
        + (" --manual_dir=MANUAL_DIR" if cfg["dataset"] == "imagenet2012" else "")
    )


def _data_dir(cfg: Mapping[str, Any]) -> str | None:
    data_dir = cfg.get("data_dir")
    return os.path.expanduser(data_dir) if data_dir else None


def _check_manual_dir(cfg: Mapping[str, Any], manual_dir: str, data_dir: str) -> None:
    """A one-line error for a manual_dir that is missing or empty (tfds would stop with a traceback)."""
    problem = "does not exist" if not os.path.exists(manual_dir) else "is not a directory"
    if os.path.isdir(manual_dir):
        if os.listdir(manual_dir):
            return
        problem = "is empty"
    raise ConfigError(
        f'config.input.manual_dir={cfg.get("manual_dir")!r} {problem}; dataset {cfg["dataset"]!r} is not prepared'
        f" in {data_dir}: put the original files there and run: {_prepare_command(cfg)}"
    )


def _builder(cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
    """Returns the prepared (array_record) builder for `cfg.dataset`."""
    name = _dataset_name(cfg)
    data_dir = _data_dir(cfg)
    if name == "digits":
        return digits_lib.prepare_digits(data_dir)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        manual_dir = cfg.get("manual_dir")
        if not manual_dir:
            raise ConfigError(
                f"Dataset {name!r} is not prepared in {builder.data_dir} and"
                f" config.input.manual_dir is unset; run: {_prepare_command(cfg)}"
            )
        _check_manual_dir(cfg, os.path.expanduser(manual_dir), builder.data_dir)
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir)),
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ConfigError(
            f"Dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value},"
            f" not array_record (needed for random access); re-prepare it with:"
            f" {_prepare_command(cfg)}"
        )
    return builder


def _num_examples(builder: tfds.core.DatasetBuilder, cfg: Mapping[str, Any], split: str) -> int:
    try:
        num = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError):
        num = 0
    if not num:
        raise ConfigError(
            f'Split {split!r} of dataset {cfg["dataset"]!r} is missing or empty in'
            f' {builder.data_dir} (available: {", ".join(builder.info.splits)});'
            f" prepare it with: {_prepare_command(cfg)}"
        )
    return num


class _CachedSource:
    """`source[i]` passed through the deterministic `prefix` transform, computed once per index.

    Cached arrays are read-only, so a later transform that wrote into its input
    would fail loudly instead of corrupting the cache. Failed records (None) are
    not cached: they are retried, and counted, on every access as without a cache.
    """

    def __init__(self, source: common.DecodedSource, prefix: T.Compose):
        self._source = source
        self._prefix = prefix
        self._cache: list[dict[str, Any] | None] = [None] * len(source)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        element = self._cache[index]
        if element is None:
            element = self._source[index]
            if element is None:
                return None
            element = self._prefix.map(element)
            for value in element.values():
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            self._cache[index] = element  # two threads may both fill it: same value
        return element


def _open_split(cfg: Mapping[str, Any], split: str) -> common.DecodedSource:
    builder = _builder(cfg)
    _num_examples(builder, cfg, split)
    source = builder.as_data_source(split)
    return common.DecodedSource(source, f'{cfg["dataset"]}:{split} in {builder.data_dir}', T.DecodeImage().map)


def _read_options(cfg: Mapping[str, Any], local_batch: int) -> grain.ReadOptions:
    return common.read_options(_field(cfg, "num_threads", 2), _field(cfg, "prefetch_buffer_size"), local_batch)


def _check_config(cfg: Mapping[str, Any]) -> None:
    if _dataset_name(cfg) == "digits" and _field(cfg, "hflip"):
        raise ConfigError("hflip must be False for digits (mirrored digits change meaning).")
    augment = _field(cfg, "train_augment")
    if augment not in ("inception_crop", "resize"):
        raise ConfigError(f"train_augment must be 'inception_crop' or 'resize', got {augment!r}")


def train_transforms(cfg: Mapping[str, Any]) -> T.Compose:
    """The per-example training transform for `cfg` (uint8 in, float32 out)."""
    _check_config(cfg)
    size = int(_field(cfg, "image_size"))
    method = _field(cfg, "resize_method", "bicubic")
    mean = tuple(_field(cfg, "mean", T.IMAGENET_MEAN))
    steps: list[Any] = []
    if _field(cfg, "train_augment") == "inception_crop":
        steps.append(T.RandomResizedCrop(size, method=method))
    else:
        steps.append(T.Resize(size, method=method))
    if _field(cfg, "hflip"):
        steps.append(T.RandomHorizontalFlip(0.5))
    spec = _field(cfg, "randaugment")
    if spec:
        fill = tuple(int(round(m)) for m in mean)
        steps.append(T.RandAugment.from_string(spec, fill=fill, method=method))
    steps.append(T.Normalize(mean, _field(cfg, "std", T.IMAGENET_STD)))
    erase_prob = float(_field(cfg, "random_erase_prob", 0.0))
    if erase_prob > 0:
        steps.append(T.RandomErasing(erase_prob, mode="rand"))
    return T.Compose(steps)


def eval_transforms(cfg: Mapping[str, Any]) -> T.Compose:
    """The deterministic eval transform for `cfg` (uint8 in, float32 out)."""
    _check_config(cfg)
    size = int(_field(cfg, "image_size"))
    method = _field(cfg, "resize_method", "bicubic")
    if _field(cfg, "train_augment") == "resize":
        resize = T.Resize(size, method=method)
    else:
        resize = T.ResizeShorterCenterCrop(size, float(_field(cfg, "eval_crop_pct", 0.875)), method)
    normalize = T.Normalize(_field(cfg, "mean", T.IMAGENET_MEAN), _field(cfg, "std", T.IMAGENET_STD))
    return T.Compose([resize, normalize])


def get_dataset_info(config: Mapping[str, Any]) -> dict[str, int]:
    """Returns {'num_classes', 'num_train', 'num_eval', 'image_size'} (global counts)."""
    builder = _builder(config)
    return {
        "num_classes": int(builder.info.features["label"].num_classes),
        "num_train": _num_examples(builder, config, _field(config, "train_split", "train")),
        "num_eval": _num_examples(builder, config, _field(config, "eval_split")),
        "image_size": int(_field(config, "image_size")),
    }


# Published split sizes (train, eval) for planning a run without the data (``offline_dataset_info``).
_PUBLISHED_SIZES = {"digits": (1437, 360, 10), "imagenet2012": (1_281_167, 50_000, 1000)}  # + num_classes


def offline_dataset_info(config: Mapping[str, Any]) -> dict[str, int]:
    """``get_dataset_info`` from published split sizes, without opening the dataset (the ahead-of-time
    compile check plans runs whose data lives elsewhere). Assumes the standard full splits."""
    num_train, num_eval, num_classes = _PUBLISHED_SIZES[_dataset_name(config)]
    return {
        "num_classes": num_classes,
        "num_train": num_train,
        "num_eval": num_eval,
        "image_size": int(_field(config, "image_size")),
    }


def example_spec(config: Mapping[str, Any], eval_mode: bool) -> dict[str, np.ndarray]:
    """One all-zero example with the keys, shapes and dtypes of a train (or eval) batch row."""
    example = _blank_example(int(_field(config, "image_size")))
    return {**example, "mask": np.float32(0)} if eval_mode else example


def create_train_iterator(
    config: Mapping[str, Any],
    *,
    seed: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of augmented training batches for this process.

    One global stream, reshuffled every epoch from `seed`, with augmentation a function of (seed, position);
    process p of P takes rows [p * B/P, (p + 1) * B/P) of each global batch of B (`common.LocalRows`), so
    the global batches do not depend on P, and `get_state`/`set_state` resume exactly.
    """
    layout = common.process_layout(global_batch_size, process_index, process_count)
    local_batch = layout.local_batch
    transform = train_transforms(config)
    source = _open_split(config, _field(config, "train_split", "train"))
    if _field(config, "cache_train", False):
        prefix, transform = transform.split_deterministic()
        source = _CachedSource(source, prefix)
    shuffle_seed, augment_seed = common.derive_seeds(seed)
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    # Unreadable records are None here; LocalRows replaces them.
    if transform.is_random:
        ds = ds.random_map(transform, seed=augment_seed)
    elif transform.transforms:
        ds = ds.map(transform.map)
    it_ds = common.LocalRows(ds, layout).to_iter_dataset(_read_options(config, local_batch))
    it_ds = it_ds.batch(local_batch, drop_remainder=True)
    # Batches are stacked in a background thread so the trainer's thread only dispatches steps. The
    # iterator state still counts consumed batches only, so checkpoints resume exactly.
    ahead = int(_field(config, "batch_prefetch", 2))
    if ahead > 0:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=ahead)
    return iter(it_ds)


def _image_label(transform: T.Compose, element: dict[str, Any]) -> dict[str, np.ndarray]:
    element = transform.map(element)
    return {"image": element["image"], "label": element["label"]}


def _blank_example(size: int) -> dict[str, np.ndarray]:
    return {"image": np.zeros((size, size, 3), np.float32), "label": np.int32(0)}


def create_eval_iterator(
    config: Mapping[str, Any],
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """One pass over the eval split for this process, as full, masked batches.

    Process p takes examples p, p + P, ...; every process yields
    ceil(ceil(N / P) / local_batch) batches, padded with zero rows of mask 0, so
    the masks over all processes sum to N (minus unreadable records). Each
    `iter()` of the result starts a fresh pass (`common.padded_eval_dataset`).
    """
    layout = common.process_layout(global_batch_size, process_index, process_count)
    transform = eval_transforms(config)
    return common.padded_eval_dataset(
        _open_split(config, _field(config, "eval_split")),
        layout,
        transform=functools.partial(_image_label, transform),
        padding=functools.partial(_blank_example, int(_field(config, "image_size"))),
        options=_read_options(config, layout.local_batch),
    )


def main(argv: list[str] | None = None) -> None:
    """Prepares a dataset in array_record format (see the module docstring)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--manual_dir", default=None)
    args = parser.parse_args(argv)
    cfg = {"dataset": args.dataset, "data_dir": args.data_dir, "manual_dir": args.manual_dir}
    builder = _builder(cfg)
    print(f"{builder.info.full_name} ready in {builder.data_dir}:")
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples")


if __name__ == "__main__":
    main()
