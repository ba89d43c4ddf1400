"""The scikit-learn handwritten digits as a small tfds dataset.

`load_digits()` ships 1,797 real 8x8 greyscale digits (pixel values 0..16,
10 classes) inside scikit-learn, so this dataset needs no network access. It
is the smoke-test dataset for the full ImageNet input path: every image is
stored as an 8x8x3 uint8 PNG (value `round(v * 255 / 16)`, grey replicated to
three channels), so the RGB transforms apply unchanged.

Split (identical on every machine, independent of library versions):
  * The test split holds ceil(0.2 * 1797) = 360 examples: floor(0.2 * n_c)
    from each class c, plus one more for the classes with the largest
    fractional remainder (ties go to the lower class id) until there are 360.
  * Within class c, the examples (in sklearn order) are permuted with
    `np.random.RandomState(c).permutation(n_c)`; the first k_c go to 'test',
    the rest to 'train'.
  * Result: 'train' 1,437 and 'test' 360 examples. Each example's `id` is its
    row index in `load_digits()` (tfds stores records in its own
    deterministic, key-hashed order).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SIZES = {"train": 1437, "test": 360}


def digit_images_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 8, 8, 3) in 0..255, labels int64 (N,))."""
    from sklearn.datasets import load_digits  # Imported lazily: it is slow.

    digits = load_digits()
    grey = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


def split_ids(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Deterministic stratified 80/20 split; returns sorted ids per split."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    quotas = counts * TEST_FRACTION
    test_counts = np.floor(quotas).astype(np.int64)
    missing = math.ceil(len(labels) * TEST_FRACTION) - int(test_counts.sum())
    # Largest remainder first; stable sort keeps the lower class id on ties.
    order = np.argsort(-(quotas - test_counts), kind="stable")
    test_counts[order[:missing]] += 1

    test_ids = []
    for c in range(NUM_CLASSES):
        ids_c = np.flatnonzero(labels == c)
        perm = np.random.RandomState(c).permutation(len(ids_c))
        test_ids.append(ids_c[perm[: test_counts[c]]])
    test = np.sort(np.concatenate(test_ids))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class Digits(tfds.core.GeneratorBasedBuilder):
    """tfds builder for scikit-learn's 8x8 handwritten digits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: fixed stratified 1437/360 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits(): 8x8 handwritten digits.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything comes from scikit-learn.
        images, labels = digit_images_uint8()
        ids = split_ids(labels)
        sizes = {name: len(split) for name, split in ids.items()}
        if sizes != SPLIT_SIZES:
            raise RuntimeError(f"digits split sizes {sizes} differ from the documented {SPLIT_SIZES}")
        return {name: self._generate_examples(images, labels, split_ids_) for name, split_ids_ in ids.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        for i in ids:
            i = int(i)
            yield i, {
                "image": _png_bytes(images[i]),
                "label": int(labels[i]),
                "id": i,
            }


def prepare_digits(data_dir: str | None = None) -> Digits:
    """Builds the digits dataset (array_record) under `data_dir` once; returns the builder.

    `data_dir=None` means the tfds default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    if data_dir is not None:
        data_dir = os.path.expanduser(data_dir)
    builder = Digits(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    return builder
