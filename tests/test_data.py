"""Tests for the input pipeline: digits builder, transforms, grain iterators, ImageNet layout."""

from __future__ import annotations

import collections
import functools
import io
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from clusterformer_jax.data import common
from clusterformer_jax.data import dense_transforms as DT
from clusterformer_jax.data import digits as digits_lib
from clusterformer_jax.data import pipeline
from clusterformer_jax.data import transforms as T

# one worker runs this file: its module fixtures are built once
pytestmark = pytest.mark.xdist_group("data")

MEAN = np.asarray(T.IMAGENET_MEAN, np.float32)
STD = np.asarray(T.IMAGENET_STD, np.float32)


def _unnormalize(image: np.ndarray) -> np.ndarray:
    return np.round(image * STD + MEAN).astype(np.uint8)


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


# digits_dir: the session's prepared digits (tests/conftest.py), read-only here


@pytest.fixture(scope="module")
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _digits_cfg(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(dataset="digits", data_dir=data_dir, image_size=16, num_threads=2)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------- digits builder


def _split_contents(data_dir: str) -> dict[str, dict[int, tuple[np.ndarray, int]]]:
    builder = digits_lib.prepare_digits(data_dir)
    out = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split)
        out[split] = {int(ex["id"]): (ex["image"], int(ex["label"])) for ex in source}
    return out


def test_digits_builder_sizes_and_values(digits_dir, sklearn_digits):
    images, labels = sklearn_digits
    contents = _split_contents(digits_dir)
    assert {k: len(v) for k, v in contents.items()} == {"train": 1437, "test": 360}
    train_ids, test_ids = set(contents["train"]), set(contents["test"])
    assert not train_ids & test_ids and train_ids | test_ids == set(range(1797))
    # Stratified: every class has 20% (+-1) of its examples in test.
    test_counts = np.bincount(labels[sorted(test_ids)], minlength=10)
    np.testing.assert_array_less(np.abs(test_counts - 0.2 * np.bincount(labels)), 1.0)
    for i in (0, 1, 5, 1796, *sorted(test_ids)[:3]):
        split = "train" if i in train_ids else "test"
        image, label = contents[split][i]
        expected = np.round(images[i] * 255 / 16).astype(np.uint8)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
        for c in range(3):
            np.testing.assert_array_equal(image[..., c], expected)
        assert label == labels[i]


def test_digits_split_identical_across_builds(tmp_path, digits_dir):
    first = _split_contents(digits_dir)
    second = _split_contents(str(tmp_path / "other"))
    for split in ("train", "test"):
        assert sorted(first[split]) == sorted(second[split])
    # The split is a pure function of the labels.
    _, labels = digits_lib.digit_images_uint8()
    ids = digits_lib.split_ids(labels)
    assert sorted(first["test"]) == ids["test"].tolist()


# ---------------------------------------------------------------- train iterator


def test_train_batches_shapes_and_determinism(digits_dir):
    cfg = _digits_cfg(
        digits_dir, train_augment="inception_crop", randaugment="rand-m9-mstd0.5-inc1", random_erase_prob=0.25
    )
    kwargs = dict(global_batch_size=32, process_index=0, process_count=1)
    a = _take(pipeline.create_train_iterator(cfg, seed=7, **kwargs), 3)
    b = _take(pipeline.create_train_iterator(cfg, seed=7, **kwargs), 3)
    c = _take(pipeline.create_train_iterator(cfg, seed=8, **kwargs), 3)
    assert a[0]["image"].shape == (32, 16, 16, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].shape == (32,) and a[0]["label"].dtype == np.int32
    assert set(a[0]) == {"image", "label"}
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize(
    "augment",
    [
        dict(train_augment="resize"),
        dict(train_augment="inception_crop", randaugment="rand-m9-mstd0.5-inc1", random_erase_prob=0.25),
    ],
)
def test_train_cache_gives_the_same_batches_and_decodes_once(digits_dir, monkeypatch, augment):
    decoded = collections.Counter()
    decode = T.DecodeImage.map

    def counting_decode(self, element):
        decoded["n"] += 1
        return decode(self, element)

    monkeypatch.setattr(T.DecodeImage, "map", counting_decode)
    kwargs = dict(seed=5, global_batch_size=64, process_index=0, process_count=1)
    num_batches = 50 if augment["train_augment"] == "resize" else 3  # 50 * 64 > 2 epochs of 1437
    batches = {}
    for cache in (False, True):
        decoded.clear()
        cfg = _digits_cfg(digits_dir, cache_train=cache, num_threads=0, batch_prefetch=0, **augment)
        batches[cache] = _take(pipeline.create_train_iterator(cfg, **kwargs), num_batches)
        if num_batches * 64 > 1437:
            assert decoded["n"] == (1437 if cache else num_batches * 64)
    for x, y in zip(batches[False], batches[True]):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_train_cache_is_read_only(digits_dir):
    cfg = _digits_cfg(digits_dir)
    prefix, rest = pipeline.train_transforms(cfg).split_deterministic()
    assert [type(t) for t in prefix.transforms] == [T.Resize, T.Normalize] and not rest.transforms
    source = pipeline._CachedSource(pipeline._open_split(cfg, "train"), prefix)
    first = source[3]
    assert first["image"].dtype == np.float32 and source[3] is first
    with pytest.raises(ValueError):
        first["image"][0, 0, 0] = 0.0  # a transform writing into a cached array fails instead of corrupting it


def test_train_checkpoint_resume(digits_dir):
    cfg = _digits_cfg(digits_dir, train_augment="inception_crop", randaugment="rand-m9-mstd0.5-inc1")
    kwargs = dict(seed=3, global_batch_size=16, process_index=0, process_count=1)
    it = pipeline.create_train_iterator(cfg, **kwargs)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = pipeline.create_train_iterator(cfg, **kwargs)
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 2)):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_train_iterator_orbax_round_trip(digits_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = _digits_cfg(digits_dir, train_augment="inception_crop")
    kwargs = dict(seed=5, global_batch_size=16, process_index=0, process_count=1)
    it = pipeline.create_train_iterator(cfg, **kwargs)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 2)
    resumed = pipeline.create_train_iterator(cfg, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for x, y in zip(expected, _take(resumed, 2)):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_train_epochs_reshuffle_and_cover(digits_dir):
    cfg = _digits_cfg(digits_dir, image_size=8)
    it = pipeline.create_train_iterator(cfg, seed=0, global_batch_size=479, process_index=0, process_count=1)
    labels = np.concatenate([next(it)["label"] for _ in range(6)])  # 2 epochs of 1437.
    np.testing.assert_array_equal(np.sort(labels[:1437]), np.sort(labels[1437:]))
    assert not np.array_equal(labels[:1437], labels[1437:])


def test_train_process_sharding_partitions_split(digits_dir, sklearn_digits):
    # image_size 8 + 'resize' is lossless, so each output maps back to one source image.
    cfg = _digits_cfg(digits_dir, image_size=8)
    images, labels = sklearn_digits
    train_ids = digits_lib.split_ids(labels)["train"]
    reference = collections.Counter(
        (np.round(images[i] * 255 / 16).astype(np.uint8).tobytes(), int(labels[i])) for i in train_ids
    )
    seen = collections.Counter()
    for p, shard_size in ((0, 719), (1, 718)):
        it = pipeline.create_train_iterator(cfg, seed=1, global_batch_size=2, process_index=p, process_count=2)
        for _ in range(shard_size):
            batch = next(it)
            image = _unnormalize(batch["image"][0])
            np.testing.assert_array_equal(image[..., 0], image[..., 2])
            seen[(image[..., 0].tobytes(), int(batch["label"][0]))] += 1
    assert seen == reference


def test_train_rejects_indivisible_batch(digits_dir):
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.create_train_iterator(
            _digits_cfg(digits_dir), seed=0, global_batch_size=5, process_index=0, process_count=2
        )


# ---------------------------------------------------------------- eval iterator


def test_eval_single_process_masks(digits_dir):
    batches = list(
        pipeline.create_eval_iterator(_digits_cfg(digits_dir), global_batch_size=64, process_index=0, process_count=1)
    )
    assert len(batches) == 6  # ceil(360 / 64)
    assert all(b["image"].shape == (64, 16, 16, 3) and b["mask"].dtype == np.float32 for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 360 and np.all(mask[:360] == 1) and np.all(mask[360:] == 0)
    last = batches[-1]
    padded = last["mask"] == 0
    assert np.all(last["image"][padded] == 0) and np.all(last["label"][padded] == 0)


def test_eval_two_processes_equal_batches_exact_count(digits_dir, sklearn_digits):
    _, sk_labels = sklearn_digits
    test_ids = digits_lib.split_ids(sk_labels)["test"]
    cfg = _digits_cfg(digits_dir)
    per_process = [
        list(pipeline.create_eval_iterator(cfg, global_batch_size=46, process_index=p, process_count=2)) for p in (0, 1)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 8  # ceil(180 / 23)
    masks = [np.concatenate([b["mask"] for b in batches]) for batches in per_process]
    assert sum(m.sum() for m in masks) == 360
    labels = np.concatenate(
        [np.concatenate([b["label"] for b in batches])[m == 1] for batches, m in zip(per_process, masks)]
    )
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(sk_labels[test_ids], minlength=10))
    # The eval dataset restarts on every iter().
    ds = pipeline.create_eval_iterator(cfg, global_batch_size=46, process_index=1, process_count=2)
    assert len(list(ds)) == len(list(ds)) == 8


# ---------------------------------------------------------------- shared eval pass (common.py)

NUM_RECORDS, BROKEN = 11, 7  # record 7 fails to decode
DENSE_SPEC = DT.RenderSpec(8, 8, 2)


def _decode_record(record: dict) -> dict:
    if record["id"] == BROKEN:
        raise ValueError("unreadable record")
    return {"image": np.full((6, 6, 3), 10 + record["id"], np.uint8), "id": record["id"]}


def _classification_row(element: dict) -> dict:
    return {"image": element["image"].astype(np.float32), "label": np.int32(element["id"])}


def _classification_padding() -> dict:
    return {"image": np.zeros((6, 6, 3), np.float32), "label": np.int32(0)}


def _dense_row(element: dict) -> dict:
    empty = dict(boxes=np.zeros((0, 4), np.float32), classes=np.zeros(0, np.int32), is_crowd=np.zeros(0, bool))
    example = dict(image=element["image"], image_id=element["id"], is_thing=np.zeros(0, bool), **empty)
    return DT.DenseEvalTransform(DENSE_SPEC, short_side=6, max_size=8).map(example)


@pytest.mark.parametrize(
    "kind, transform, padding, id_key",
    [
        ("classification", _classification_row, _classification_padding, "label"),
        ("dense", _dense_row, functools.partial(DT.empty_output, DENSE_SPEC), "image_id"),
    ],
)
def test_padded_eval_dataset_order_mask_and_padding(kind, transform, padding, id_key):
    source = common.DecodedSource([{"id": i} for i in range(NUM_RECORDS)], f"in-memory {kind}", _decode_record)
    skipped = common.skipped_examples()
    seen = []
    for p in (0, 1):
        layout = common.process_layout(8, p, 2)
        assert layout == (p, 2, 4)
        options = common.read_options(0, None, layout.local_batch)
        ds = common.padded_eval_dataset(source, layout, transform=transform, padding=padding, options=options)
        batches = list(ds)
        assert len(batches) == 2  # ceil(ceil(11 / 2) / 4)
        rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        assert rows["mask"].dtype == np.float32 and set(np.unique(rows["mask"])) <= {0.0, 1.0}
        real = rows["mask"] == 1
        # Process p reads p, p + 2, ... in order; the broken record and positions past the end are padding.
        expected = [i for i in range(p, NUM_RECORDS, 2) if i != BROKEN]
        assert rows[id_key][real].tolist() == expected
        seen += expected
        for key, value in padding().items():
            np.testing.assert_array_equal(rows[key][~real], np.broadcast_to(value, rows[key][~real].shape))
        assert not rows["image"][~real].any()
    # Over both processes every readable record is a real row exactly once.
    assert sorted(seen) == [i for i in range(NUM_RECORDS) if i != BROKEN]
    assert common.skipped_examples() == skipped + 1


# ---------------------------------------------------------------- config errors


def test_unknown_dataset_is_one_line_value_error():
    cfg = ml_collections.ConfigDict(dict(dataset="mnist_typo", data_dir="/nonexistent"))
    for call in (
        lambda: pipeline.get_dataset_info(cfg),
        lambda: pipeline.create_train_iterator(cfg, seed=0, global_batch_size=8, process_index=0, process_count=1),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert "mnist_typo" in str(err.value) and "\n" not in str(err.value)


def test_missing_split_is_one_line_value_error(digits_dir):
    cfg = _digits_cfg(digits_dir, eval_split="validation")
    with pytest.raises(ValueError) as err:
        pipeline.create_eval_iterator(cfg, global_batch_size=8, process_index=0, process_count=1)
    message = str(err.value)
    assert "'validation'" in message and "'digits'" in message and digits_dir in message
    assert "python -m clusterformer_jax.data.pipeline" in message and "\n" not in message


def test_hflip_rejected_for_digits(digits_dir):
    with pytest.raises(ValueError, match="hflip"):
        pipeline.create_train_iterator(
            _digits_cfg(digits_dir, hflip=True), seed=0, global_batch_size=8, process_index=0, process_count=1
        )


def test_process_layout_defaults_to_jax(digits_dir):
    import jax

    assert (jax.process_index(), jax.process_count()) == (0, 1)
    batches = list(pipeline.create_eval_iterator(_digits_cfg(digits_dir), global_batch_size=64))
    assert len(batches) == 6 and sum(b["mask"].sum() for b in batches) == 360


def test_dataset_info(digits_dir):
    assert pipeline.get_dataset_info(_digits_cfg(digits_dir, image_size=24)) == {
        "num_classes": 10,
        "num_train": 1437,
        "num_eval": 360,
        "image_size": 24,
    }


# ---------------------------------------------------------------- transforms


def _ramp(height: int, width: int) -> np.ndarray:
    """uint8 image whose pixel (y, x) encodes its own coordinates."""
    y, x = np.mgrid[:height, :width]
    return np.stack([y, x, (y + x) % 256], axis=-1).astype(np.uint8)


def test_resize_shorter_center_crop():
    t = T.ResizeShorterCenterCrop(224, crop_pct=224 / 248)
    assert t.resized_shape(300, 400) == (248, 330)
    assert t.resized_shape(500, 250) == (496, 248)
    out = t.apply(np.zeros((300, 400, 3), np.uint8))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # No resize needed (shorter side already 8 / 0.5 = 16): pure centre crop.
    image = _ramp(16, 20)
    out = T.ResizeShorterCenterCrop(8, crop_pct=0.5).apply(image)
    np.testing.assert_array_equal(out, image[4:12, 6:14])


def test_resize_fixed():
    out = T.Resize(32, "bilinear").apply(_ramp(8, 12))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    image = _ramp(8, 8)
    np.testing.assert_array_equal(T.Resize(8).apply(image), image)


def test_normalize_arithmetic():
    image = np.array([[[0, 128, 255]]], np.uint8)
    out = T.Normalize().apply(image)
    expected = (np.array([0, 128, 255]) - np.array(T.IMAGENET_MEAN)) / np.array(T.IMAGENET_STD)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)


def test_random_resized_crop_deterministic_and_in_bounds():
    t = T.RandomResizedCrop(24)
    image = _ramp(60, 90)
    a = t.apply(image, np.random.default_rng(5))
    b = t.apply(image, np.random.default_rng(5))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = t.crop_box(60, 90, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90 and h > 0 and w > 0
        assert 0.08 * 5400 * 0.9 <= h * w <= 5400
    # Too wide for any try: falls back to a centred crop clamped to ratio 4/3.
    wide = T.RandomResizedCrop(8, scale=(0.99, 1.0), ratio=(0.75, 1.3333))
    assert wide.crop_box(10, 100, np.random.default_rng(0)) == (0, 43, 10, 13)


def test_horizontal_flip():
    image = _ramp(4, 6)
    np.testing.assert_array_equal(T.RandomHorizontalFlip(1.0).apply(image, np.random.default_rng(0)), image[:, ::-1])
    np.testing.assert_array_equal(T.RandomHorizontalFlip(0.0).apply(image, np.random.default_rng(0)), image)


def test_randaugment_deterministic_and_all_ops():
    ra = T.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, len(ra.op_names)) == (2, 9.0, 0.5, 15)
    assert "PosterizeIncreasing" in ra.op_names
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = ra.apply(image, np.random.default_rng(11))
    b = ra.apply(image, np.random.default_rng(11))
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    outputs = [ra.apply(image, np.random.default_rng(s)) for s in range(20)]
    assert any(not np.array_equal(o, image) for o in outputs)
    always = T.RandAugment(prob=1.0)
    for name in always.op_names:
        out = np.asarray(always.apply_op(Image.fromarray(image), name, np.random.default_rng(0)))
        assert out.shape == image.shape and out.dtype == np.uint8, name
    inverted = np.asarray(always.apply_op(Image.fromarray(image), "Invert", np.random.default_rng(0)))
    np.testing.assert_array_equal(inverted, 255 - image)
    # Extreme levels of both op sets stay valid; level 10 posterize keeps 0 bits (black).
    for increasing in (True, False):
        for level in (0.0, 10.0):
            ra = T.RandAugment(magnitude=level, magnitude_std=0.0, prob=1.0, increasing=increasing)
            for name in ra.op_names:
                out = ra.apply_op(Image.fromarray(image), name, np.random.default_rng(0))
                assert np.asarray(out).shape == image.shape, (name, level)
    strongest = T.RandAugment(magnitude=10.0, magnitude_std=0.0, prob=1.0)
    posterized = strongest.apply_op(Image.fromarray(image), "PosterizeIncreasing", np.random.default_rng(0))
    assert not np.asarray(posterized).any()
    weakest = T.RandAugment(magnitude=0.0, magnitude_std=0.0, prob=1.0)
    posterized = weakest.apply_op(Image.fromarray(image), "PosterizeIncreasing", np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(posterized), image & 0xF0)  # 4 bits kept.


def test_random_erasing():
    image = np.zeros((32, 32, 3), np.float32)
    out = T.RandomErasing(p=1.0, mode="rand").apply(image, np.random.default_rng(0))
    erased = np.any(out != 0, axis=-1)
    assert 0.02 * 1024 * 0.5 <= erased.sum() <= 1024 / 3 * 1.5
    rows, cols = np.nonzero(erased)
    box = out[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    np.testing.assert_array_equal(box, np.broadcast_to(box[:1, :1], box.shape))  # One colour.
    assert T.RandomErasing(p=0.0).apply(image, np.random.default_rng(0)) is image


def test_decode_image_variants():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for raw in (grey, grey[..., None]):
        out = T.DecodeImage().map({"image": raw, "label": 3})
        assert out["image"].shape == (3, 4, 3) and out["label"] == 3 and out["label"].dtype == np.int32
    buffer = io.BytesIO()
    Image.fromarray(_ramp(5, 7)).save(buffer, format="PNG")
    np.testing.assert_array_equal(T.DecodeImage.to_rgb(buffer.getvalue()), _ramp(5, 7))
    with pytest.raises(Exception):
        T.DecodeImage.to_rgb(b"not an image")


# ---------------------------------------------------------------- imagenet2012 (tiny real layout)

SYNSETS = ("n01440764", "n01443537", "n01484850")
NUM_VAL = 6


def _jpeg(rng: np.random.Generator, height: int, width: int, grey: bool = False) -> bytes:
    shape = (height, width) if grey else (height, width, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def imagenet_dirs(tmp_path_factory) -> tuple[str, str]:
    """ILSVRC2012_img_{train,val}.tar in the real layout; one corrupt and one greyscale JPEG in each."""
    manual = tmp_path_factory.mktemp("imagenet_manual")
    rng = np.random.default_rng(0)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in SYNSETS:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for k in range(4):
                    corrupt = synset == SYNSETS[1] and k == 2
                    data = b"\xff\xd8 truncated" if corrupt else _jpeg(rng, 40 + 10 * k, 60, grey=k == 1)
                    _add(inner, f"{synset}_{k + 1}.JPEG", data)
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for k in range(1, NUM_VAL + 1):
            data = b"garbage" if k == 3 else _jpeg(rng, 50, 30 + 10 * k, grey=k == 5)
            _add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", data)
    return str(manual), str(tmp_path_factory.mktemp("imagenet_data"))


def test_imagenet2012_tiny_manual_layout(imagenet_dirs):
    manual_dir, data_dir = imagenet_dirs
    cfg = ml_collections.ConfigDict(
        dict(
            dataset="imagenet2012",
            data_dir=data_dir,
            manual_dir=None,
            image_size=32,
            randaugment="rand-m9-mstd0.5-inc1",
            random_erase_prob=0.25,
            eval_crop_pct=224 / 248,
        )
    )
    with pytest.raises(ValueError) as err:  # Not prepared and no manual_dir.
        pipeline.get_dataset_info(cfg)
    assert "imagenet2012" in str(err.value) and "--manual_dir" in str(err.value)
    assert "\n" not in str(err.value)

    cfg.manual_dir = manual_dir
    info = pipeline.get_dataset_info(cfg)
    assert info == {"num_classes": 1000, "num_train": 12, "num_eval": NUM_VAL, "image_size": 32}

    names = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    val_synsets = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()[:NUM_VAL]
    expected = sorted(names.index(s) for k, s in enumerate(val_synsets) if k != 2)  # val 3 corrupt.
    skipped_before = pipeline.skipped_examples()
    batches = list(pipeline.create_eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 2 and batches[0]["image"].shape == (4, 32, 32, 3)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == NUM_VAL - 1
    assert sorted(labels[mask == 1].tolist()) == expected
    assert pipeline.skipped_examples() == skipped_before + 1

    # Training replaces the corrupt record by the next readable one, every epoch (reader threads may run ahead).
    skipped_before = pipeline.skipped_examples()
    it = pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4, process_index=0, process_count=1)
    labels = np.concatenate([next(it)["label"] for _ in range(6)])  # 24 = 2 epochs of 12.
    assert set(labels.tolist()) == {0, 1, 2}
    extra = np.bincount(labels[:12], minlength=3) - [4, 3, 4]  # First epoch: the 11 readable ones, one twice.
    assert sorted(extra.tolist()) == [0, 0, 1]
    assert pipeline.skipped_examples() >= skipped_before + 2
    it.close()
