"""The eval transforms of the input pipelines as TensorFlow graph ops, for a SavedModel that takes encoded images.

Each class holds the constants of one eval transform (``from_transform`` reads them off the trainer's
transform object) and builds, in TF: decode (JPEG/PNG/GIF/BMP bytes -> uint8 RGB), resize, crop or pad to the
model's canvas, normalise. The resize reproduces Pillow 13's ``Image.resize`` (``libImaging/Resample.c``:
separable passes, each rounded to uint8, in Pillow's order; coefficients in 22-bit fixed point; antialiased
when shrinking) so the SavedModel sees the pixels the trainer's eval pipeline sees. JPEGs are decoded with
libjpeg's accurate integer DCT, as Pillow does; decoders may still differ by one level on some pixels.

Imports TensorFlow only (no JAX): the serving side loads this graph without the training stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

PRECISION_BITS = 22  # Pillow Resample.c: 32 - 8 - 2
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _filter(name: str, x: tf.Tensor) -> tf.Tensor:
    """Pillow's bilinear (triangle) and bicubic (Keys, a = -0.5) kernels, float64."""
    x = tf.abs(x)
    if name == "bilinear":
        return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _coefficients(in_size: tf.Tensor, out_size: tf.Tensor, in1: tf.Tensor, method: str) -> tf.Tensor:
    """Fixed-point weights float64 (out_size, in_size) of Pillow's ``precompute_coeffs`` for the box [0, in1)."""
    scale = tf.cast(in1, tf.float64) / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = _SUPPORT[method] * filterscale
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
    xmin = tf.maximum(tf.math.floor(center - support + 0.5), 0.0)  # (int) of a value >= 0 after the clamp
    xmax = tf.minimum(tf.math.floor(center + support + 0.5), tf.cast(in_size, tf.float64))
    x = tf.range(in_size, dtype=tf.float64)[None, :]
    weights = _filter(method, (x - center[:, None] + 0.5) * (1.0 / filterscale))
    weights = tf.where((x >= xmin[:, None]) & (x < xmax[:, None]), weights, tf.zeros_like(weights))
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.where(total != 0.0, weights / tf.where(total != 0.0, total, 1.0), weights)
    return tf.sign(weights) * tf.math.floor(tf.abs(weights) * float(1 << PRECISION_BITS) + 0.5)


def _round_fixed(acc: tf.Tensor) -> tf.Tensor:
    """Pillow's ``clip8``: (2^21 + acc) >> 22, clipped to 0..255 (float64 holds these integers exactly)."""
    half = float(1 << (PRECISION_BITS - 1))
    return tf.clip_by_value(tf.math.floor((acc + half) / float(1 << PRECISION_BITS)), 0.0, 255.0)


def pil_resize(image: tf.Tensor, out_h: tf.Tensor, out_w: tf.Tensor, method: str, box_hw=None) -> tf.Tensor:
    """uint8 (H, W, 3) -> uint8 (out_h, out_w, 3) as ``Image.resize((out_w, out_h), method, box)`` with
    box (0, 0, box_w, box_h) (default the whole image)."""
    shape = tf.shape(image)
    if box_hw is None:
        box_hw = (tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32))
    wx = _coefficients(shape[1], out_w, tf.cast(box_hw[1], tf.float32), method)
    wy = _coefficients(shape[0], out_h, tf.cast(box_hw[0], tf.float32), method)
    pixels = tf.cast(image, tf.float64)

    def horizontal_first():
        return _round_fixed(tf.einsum("hxc,yh->yxc", _round_fixed(tf.einsum("hwc,xw->hxc", pixels, wx)), wy))

    def vertical_first():
        return _round_fixed(tf.einsum("ywc,xw->yxc", _round_fixed(tf.einsum("hwc,yh->ywc", pixels, wy)), wx))

    # Pillow 13 (libImaging/Resample.c, ImagingResampleInner) runs the vertical pass first when the height
    # shrinks by more than twice as many pixels as the width; before 13 it always ran the horizontal one first.
    shrink_h, shrink_w = shape[0] - out_h, shape[1] - out_w
    horizontal = tf.logical_not((shrink_h > 0) & (shrink_h > shrink_w * 2))
    return tf.cast(tf.cond(horizontal, horizontal_first, vertical_first), tf.uint8)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes -> uint8 (H, W, 3) (grey replicated, alpha dropped, GIF: first frame)."""

    def jpeg():
        return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def _normalise(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """``(x - mean) * (1 / std)`` in float32, as ``transforms.Normalize``."""
    inv_std = np.float32(1.0) / np.asarray(std, np.float32)
    return (tf.cast(image, tf.float32) - np.asarray(mean, np.float32)) * inv_std


class ClassificationPreprocess:
    """``pipeline.eval_transforms``: a square resize (``crop_pct`` None) or timm's shorter-side resize to
    ``floor(size / crop_pct)`` and a centred ``size`` crop; then normalisation."""

    def __init__(self, size: int, method: str, mean: Sequence[float], std: Sequence[float], crop_pct=None):
        self.size, self.method, self.crop_pct = int(size), method, crop_pct
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    @classmethod
    def from_transform(cls, transform: Any) -> ClassificationPreprocess:
        resize, normalize = transform.transforms
        method = {2: "bilinear", 3: "bicubic"}[int(resize.resample)]
        std = (np.float32(1.0) / normalize.inv_std).tolist()
        return cls(resize.size, method, normalize.mean.tolist(), std, getattr(resize, "crop_pct", None))

    def constants(self) -> dict[str, Any]:
        return {"kind": "classification", "size": self.size, "method": self.method, "crop_pct": self.crop_pct,
                "mean": self.mean, "std": self.std}  # fmt: skip

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        return {"images": tf.TensorSpec((None, self.size, self.size, 3), tf.float32, name="images")}

    def one(self, encoded: tf.Tensor) -> dict[str, tf.Tensor]:
        image = decode_rgb(encoded)
        size = self.size
        if self.crop_pct is None:
            image = pil_resize(image, size, size, self.method)
        else:
            height, width = tf.shape(image)[0], tf.shape(image)[1]
            scale = int(math.floor(size / self.crop_pct))
            h64, w64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
            new_h = tf.where(height <= width, scale, tf.cast(tf.floor(scale * h64 / w64), tf.int32))
            new_w = tf.where(height <= width, tf.cast(tf.floor(scale * w64 / h64), tf.int32), scale)
            image = pil_resize(image, new_h, new_w, self.method)
            top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)  # half to even, as round()
            left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
            image = image[top : top + size, left : left + size]
        image = tf.ensure_shape(_normalise(image, self.mean, self.std), (size, size, 3))
        return {"images": image}

    @staticmethod
    def host_transform(input_config: Any) -> Any:
        """The trainer's eval transform for ``config.input`` (host side, numpy + Pillow)."""
        from clusterformer_jax.data import pipeline

        return pipeline.eval_transforms(input_config)

    def host(self, rgb: np.ndarray, transform: Any) -> dict[str, np.ndarray]:
        """The trainer's eval transform of one decoded image, as model inputs."""
        return {"images": transform.map({"image": rgb, "label": 0})["image"]}


class DensePreprocess:
    """``dense_pipeline.eval_transform``: scale so the shorter side is ``short_side`` (longer at most
    ``max_size``, all inside the canvas), round half up, Pillow bilinear resize of the window, place it at the
    canvas' top-left, zeros elsewhere; also the pixel mask, source size and exact scale of every image."""

    def __init__(self, canvas: int, short_side: int, max_size: int, mean: Sequence[float], std: Sequence[float]):
        self.canvas, self.short_side, self.max_size = int(canvas), int(short_side), int(max_size)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    @classmethod
    def from_transform(cls, transform: Any) -> DensePreprocess:
        spec = transform.spec
        if spec.out_h != spec.out_w:
            raise ValueError(f"the eval canvas must be square, got {spec.out_h}x{spec.out_w}")
        return cls(spec.out_h, transform.short_side, transform.max_size, spec.mean, spec.std)

    def constants(self) -> dict[str, Any]:
        return {"kind": "dense", "canvas": self.canvas, "short_side": self.short_side, "max_size": self.max_size,
                "method": "bilinear", "mean": self.mean, "std": self.std}  # fmt: skip

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        side = self.canvas
        return {
            "images": tf.TensorSpec((None, side, side, 3), tf.float32, name="images"),
            "pixel_mask": tf.TensorSpec((None, side, side), tf.bool, name="pixel_mask"),
            "orig_size": tf.TensorSpec((None, 2), tf.int32, name="orig_size"),
            "scale": tf.TensorSpec((None, 2), tf.float32, name="scale"),
        }

    def one(self, encoded: tf.Tensor) -> dict[str, tf.Tensor]:
        image = decode_rgb(encoded)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
        side = float(self.canvas)
        scale = tf.reduce_min(
            tf.stack([self.short_side / tf.minimum(h, w), self.max_size / tf.maximum(h, w), side / h, side / w])
        )
        new_h = tf.maximum(tf.floor(h * scale + 0.5), 1.0)  # dense_transforms.round_half_up
        new_w = tf.maximum(tf.floor(w * scale + 0.5), 1.0)
        crop_h, crop_w = tf.minimum(new_h, side), tf.minimum(new_w, side)
        scale_y, scale_x = new_h / h, new_w / w
        resized = pil_resize(
            image,
            tf.cast(crop_h, tf.int32),
            tf.cast(crop_w, tf.int32),
            "bilinear",
            (crop_h / scale_y, crop_w / scale_x),
        )
        pad = [[0, self.canvas - tf.cast(crop_h, tf.int32)], [0, self.canvas - tf.cast(crop_w, tf.int32)]]
        images = tf.pad(_normalise(resized, self.mean, self.std), pad + [[0, 0]])
        mask = tf.pad(tf.ones(tf.shape(resized)[:2], tf.bool), pad)
        return {
            "images": tf.ensure_shape(images, (self.canvas, self.canvas, 3)),
            "pixel_mask": tf.ensure_shape(mask, (self.canvas, self.canvas)),
            "orig_size": tf.stack([height, width]),
            "scale": tf.cast(tf.stack([scale_y, scale_x]), tf.float32),
        }

    @staticmethod
    def host_transform(input_config: Any) -> Any:
        """The trainer's eval transform for ``config.input`` (host side, numpy + Pillow)."""
        from clusterformer_jax.data import dense_pipeline

        return dense_pipeline.eval_transform(input_config)

    def host(self, rgb: np.ndarray, transform: Any) -> dict[str, np.ndarray]:
        """The trainer's eval transform of one decoded image, as model inputs and placement."""
        empty = {"boxes": np.zeros((0, 4), np.float32), "classes": np.zeros((0,), np.int32)}
        empty |= {"is_crowd": np.zeros((0,), bool), "is_thing": np.zeros((0,), bool)}
        out = transform.map({"image": rgb, "image_id": 0, **empty})
        return {"images": out["image"], "pixel_mask": out["image_mask"], "orig_size": out["orig_size"],
                "scale": out["scale"]}  # fmt: skip


KINDS = {"classification": ClassificationPreprocess, "dense": DensePreprocess}


def from_constants(constants: dict[str, Any]) -> ClassificationPreprocess | DensePreprocess:
    """The preprocessing an export's assets describe (``constants()``)."""
    fields = {k: v for k, v in constants.items() if k not in ("kind", "method")}
    if constants["kind"] == "classification":
        fields["method"] = constants["method"]
    return KINDS[constants["kind"]](**fields)


def batch_preprocess(preprocess: Any):
    """A tf.function: string (B,) encoded images -> the model's input dict, each image by ``preprocess.one``."""
    specs = preprocess.input_specs()
    signature = {k: tf.TensorSpec(v.shape[1:], v.dtype) for k, v in specs.items()}

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="encoded_images")])
    def run(encoded):
        return tf.map_fn(preprocess.one, encoded, fn_output_signature=signature)

    return run
