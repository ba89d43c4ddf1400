"""Per-example image transforms (numpy + PIL) used by the grain pipeline.

Every transform works on an element dict `{'image': ..., 'label': ...}` and changes only `'image'`; its
`apply` method takes and returns the bare image so it can be tested on its own. Images are uint8 HxWx3
arrays until `Normalize` turns them into float32. Randomised transforms draw every random number from
the `np.random.Generator` grain hands to `random_map`, so a pipeline is a pure function of (seed, element
index).

The geometry and augmentation follow torchvision / timm:
  * `RandomResizedCrop`: the Inception crop (torchvision `RandomResizedCrop`).
  * `ResizeShorterCenterCrop`: timm's eval transform (`Resize(int(size / crop_pct))` + `CenterCrop(size)`).
  * `RandAugment`: timm's `rand-m{M}-n{N}-mstd{S}-inc{0,1}` policy.
  * `RandomErasing`: timm's random erasing, applied to the normalised image.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

Element = dict[str, Any]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def resample_filter(method: str) -> Image.Resampling:
    """Maps 'bicubic' | 'bilinear' | 'nearest' to the PIL filter."""
    try:
        return _RESAMPLE[method]
    except KeyError:
        raise ValueError(f"Unknown resize method {method!r}; expected one of {sorted(_RESAMPLE)}.") from None


class ImageMap(grain.transforms.Map):
    """Deterministic transform of `element['image']`."""

    def apply(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def map(self, element: Element) -> Element:
        return {**element, "image": self.apply(element["image"])}


class ImageRandomMap(grain.transforms.RandomMap):
    """Randomised transform of `element['image']`."""

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        return {**element, "image": self.apply(element["image"], rng)}


class Compose(grain.transforms.RandomMap):
    """Runs transforms in order, sharing one rng (one grain `random_map` call).

    Chaining several `random_map` calls with the same seed would hand each of
    them the same random stream; composing them avoids that correlation.
    """

    def __init__(self, transforms: Sequence[grain.transforms.Map | grain.transforms.RandomMap]):
        self.transforms = list(transforms)

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        for t in self.transforms:
            if isinstance(t, grain.transforms.RandomMap):
                element = t.random_map(element, rng)
            else:
                element = t.map(element)
        return element

    @property
    def is_random(self) -> bool:
        return any(isinstance(t, grain.transforms.RandomMap) for t in self.transforms)

    def split_deterministic(self) -> tuple["Compose", "Compose"]:
        """(leading non-random steps, the rest): the first part's output depends on the element only."""
        cut = next(
            (i for i, t in enumerate(self.transforms) if isinstance(t, grain.transforms.RandomMap)),
            len(self.transforms),
        )
        return Compose(self.transforms[:cut]), Compose(self.transforms[cut:])

    def map(self, element: Element) -> Element:
        """Applies the transforms when none of them is random."""
        for t in self.transforms:
            if isinstance(t, grain.transforms.RandomMap):
                raise TypeError(f"{type(t).__name__} needs an rng; use random_map.")
            element = t.map(element)
        return element


class DecodeImage(grain.transforms.Map):
    """Brings a record to `{'image': uint8 (H, W, 3), 'label': int32}`.

    Accepts an already decoded array (what tfds data sources return: HxW,
    HxWx1, HxWx3 or HxWx4) or encoded bytes (JPEG/PNG/...). Grey is replicated
    to three channels, alpha and CMYK are converted to RGB. Raises `ValueError`
    for anything it cannot turn into a non-empty RGB image.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label"):
        self.image_key = image_key
        self.label_key = label_key

    @staticmethod
    def to_rgb(image: Any) -> np.ndarray:
        if isinstance(image, (bytes, np.bytes_)):
            with Image.open(io.BytesIO(bytes(image))) as pil:
                pil.load()
                image = np.asarray(pil.convert("RGB"))
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        elif image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise ValueError(f"cannot use an image of shape {image.shape}")
        return np.ascontiguousarray(image)

    def map(self, element: Element) -> Element:
        return {
            "image": self.to_rgb(element[self.image_key]),
            "label": np.int32(element[self.label_key]),
        }


class Resize(ImageMap):
    """Resizes to a fixed (size, size), ignoring the aspect ratio."""

    def __init__(self, size: int, method: str = "bicubic"):
        self.size = size
        self.resample = resample_filter(method)

    def apply(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (self.size, self.size):
            return image
        pil = Image.fromarray(image)
        return np.asarray(pil.resize((self.size, self.size), self.resample))


class ResizeShorterCenterCrop(ImageMap):
    """Eval transform: shorter side to `int(size / crop_pct)`, then a centred `size` crop.

    The longer side keeps the aspect ratio (`int(long * scale / short)`, as
    torchvision's `Resize(int)`); the crop offset is `round((dim - size) / 2)`
    like torchvision's `CenterCrop`.
    """

    def __init__(self, size: int, crop_pct: float = 0.875, method: str = "bicubic"):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = size
        self.crop_pct = crop_pct
        self.resample = resample_filter(method)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        scale = int(math.floor(self.size / self.crop_pct))
        if height <= width:
            return scale, int(scale * width / height)
        return int(scale * height / width), scale

    def apply(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        new_h, new_w = self.resized_shape(height, width)
        if (new_h, new_w) != (height, width):
            image = np.asarray(Image.fromarray(image).resize((new_w, new_h), self.resample))
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return np.ascontiguousarray(image[top : top + self.size, left : left + self.size])


class RandomResizedCrop(ImageRandomMap):
    """Inception-style crop: random area/aspect box, resized to (size, size).

    Same algorithm as torchvision: up to 10 tries of area ~ U(scale) * H * W and
    log-aspect ~ U(log ratio); the first box that fits is used. Otherwise a
    centred crop of the whole image, clamped to the ratio bounds.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        method: str = "bicubic",
    ):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.resample = resample_filter(method)

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Returns (top, left, crop_height, crop_width)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            h, w = height, width
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = self.crop_box(image.shape[0], image.shape[1], rng)
        pil = Image.fromarray(image)
        out = pil.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))
        return np.asarray(out)


class RandomHorizontalFlip(ImageRandomMap):
    """Mirrors left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.p:
            return np.ascontiguousarray(image[:, ::-1])
        return image


class Normalize(ImageMap):
    """`(image - mean) / std` per channel, as float32 (mean/std on the 0..255 scale)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, np.float32)
        self.inv_std = np.float32(1.0) / np.asarray(std, np.float32)

    def apply(self, image: np.ndarray) -> np.ndarray:
        out = image.astype(np.float32)
        out -= self.mean
        out *= self.inv_std
        return out


class RandomErasing(ImageRandomMap):
    """timm random erasing on a normalised float32 HxWxC image.

    With probability `p`, one box of area ~ U(area) * H * W and log-aspect
    ~ U(log(0.3), log(1/0.3)) (10 tries) is replaced by N(0, 1) values: one per
    channel ('rand'), one per pixel ('pixel') or zeros ('const').
    """

    def __init__(
        self,
        p: float = 0.25,
        area: tuple[float, float] = (0.02, 1 / 3),
        min_aspect: float = 0.3,
        mode: str = "rand",
    ):
        if mode not in ("rand", "pixel", "const"):
            raise ValueError(f"RandomErasing mode must be 'rand', 'pixel' or 'const', got {mode!r}")
        self.p = p
        self.area = area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.mode = mode

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        height, width, channels = image.shape
        for _ in range(10):
            target_area = rng.uniform(*self.area) * height * width
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                if self.mode == "pixel":
                    fill = rng.standard_normal((h, w, channels))
                elif self.mode == "rand":
                    fill = rng.standard_normal((1, 1, channels))
                else:
                    fill = 0.0
                image = image.copy()
                image[top : top + h, left : left + w] = fill
                return image
        return image


# ----------------------------------------------------------------------------
# RandAugment (timm semantics, PIL ops).

_LEVEL_DENOM = 10.0


def _affine(img: Image.Image, matrix: tuple[float, ...], resample, fill) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keeps the top `bits` bits per channel; 0 bits gives black (Pillow rejects 0)."""
    if bits >= 8:
        return img
    shift = 8 - max(bits, 0)
    lut = [(i >> shift) << shift for i in range(256)]
    return img.point(lut * len(img.getbands()))


# Each op: (image, resample filter, fill colour, *level args) -> image.
_OPS: dict[str, Callable[..., Image.Image]] = {
    "AutoContrast": lambda img, r, f: ImageOps.autocontrast(img),
    "Equalize": lambda img, r, f: ImageOps.equalize(img),
    "Invert": lambda img, r, f: ImageOps.invert(img),
    "Rotate": lambda img, r, f, deg: img.rotate(deg, resample=r, fillcolor=f),
    "Posterize": lambda img, r, f, bits: _posterize(img, bits),
    "Solarize": lambda img, r, f, thresh: ImageOps.solarize(img, thresh),
    "SolarizeAdd": lambda img, r, f, add: _solarize_add(img, add),
    "Color": lambda img, r, f, x: ImageEnhance.Color(img).enhance(x),
    "Contrast": lambda img, r, f, x: ImageEnhance.Contrast(img).enhance(x),
    "Brightness": lambda img, r, f, x: ImageEnhance.Brightness(img).enhance(x),
    "Sharpness": lambda img, r, f, x: ImageEnhance.Sharpness(img).enhance(x),
    "ShearX": lambda img, r, f, x: _affine(img, (1, x, 0, 0, 1, 0), r, f),
    "ShearY": lambda img, r, f, x: _affine(img, (1, 0, 0, x, 1, 0), r, f),
    "TranslateXRel": lambda img, r, f, x: _affine(img, (1, 0, x * img.size[0], 0, 1, 0), r, f),
    "TranslateYRel": lambda img, r, f, x: _affine(img, (1, 0, 0, 0, 1, x * img.size[1]), r, f),
}
for _name in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    _OPS[_name + "Increasing"] = _OPS[_name]


def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def _enhance_increasing(level: float, rng: np.random.Generator) -> tuple[float]:
    return (max(0.1, 1.0 + _negate(level / _LEVEL_DENOM * 0.9, rng)),)


# Each level fn: (magnitude level in [0, 10], rng) -> op args.
_LEVEL_FNS: dict[str, Callable[[float, np.random.Generator], tuple]] = {
    "AutoContrast": lambda lv, rng: (),
    "Equalize": lambda lv, rng: (),
    "Invert": lambda lv, rng: (),
    "Rotate": lambda lv, rng: (_negate(lv / _LEVEL_DENOM * 30.0, rng),),
    "Posterize": lambda lv, rng: (int(lv / _LEVEL_DENOM * 4),),
    "PosterizeIncreasing": lambda lv, rng: (4 - int(lv / _LEVEL_DENOM * 4),),
    "Solarize": lambda lv, rng: (int(lv / _LEVEL_DENOM * 256),),
    "SolarizeIncreasing": lambda lv, rng: (256 - int(lv / _LEVEL_DENOM * 256),),
    "SolarizeAdd": lambda lv, rng: (min(128, int(lv / _LEVEL_DENOM * 110)),),
    "Color": lambda lv, rng: (lv / _LEVEL_DENOM * 1.8 + 0.1,),
    "Contrast": lambda lv, rng: (lv / _LEVEL_DENOM * 1.8 + 0.1,),
    "Brightness": lambda lv, rng: (lv / _LEVEL_DENOM * 1.8 + 0.1,),
    "Sharpness": lambda lv, rng: (lv / _LEVEL_DENOM * 1.8 + 0.1,),
    "ColorIncreasing": _enhance_increasing,
    "ContrastIncreasing": _enhance_increasing,
    "BrightnessIncreasing": _enhance_increasing,
    "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda lv, rng: (_negate(lv / _LEVEL_DENOM * 0.3, rng),),
    "ShearY": lambda lv, rng: (_negate(lv / _LEVEL_DENOM * 0.3, rng),),
    "TranslateXRel": lambda lv, rng: (_negate(lv / _LEVEL_DENOM * 0.45, rng),),
    "TranslateYRel": lambda lv, rng: (_negate(lv / _LEVEL_DENOM * 0.45, rng),),
}

RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


class RandAugment(ImageRandomMap):
    """timm RandAugment on uint8 HxWx3 images.

    Draws `num_ops` ops uniformly with replacement; each runs with probability
    `prob`, at level N(magnitude, magnitude_std) clipped to [0, magnitude_max]
    (magnitude_std = inf means U(0, magnitude)). Geometric ops fill with `fill`
    (RGB, default round(255 * ImageNet mean)) and resample with `method`.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        magnitude_max: float = _LEVEL_DENOM,
        prob: float = 0.5,
        increasing: bool = True,
        fill: tuple[int, int, int] = (124, 116, 104),
        method: str = "bicubic",
    ):
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.prob = prob
        self.op_names = RAND_INCREASING_OPS if increasing else RAND_OPS
        self.fill = tuple(int(v) for v in fill)
        self.resample = resample_filter(method)

    @classmethod
    def from_string(cls, spec: str, **kwargs: Any) -> RandAugment:
        """Parses timm's 'rand-m9-n2-mstd0.5-mmax10-p0.5-inc1' notation."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
        args: dict[str, Any] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([\d.]+|inf)", part)
            if match is None:
                raise ValueError(f"Unknown RandAugment option {part!r} in {spec!r}")
            key, value = match.groups()
            if key == "m":
                args["magnitude"] = float(value)
            elif key == "n":
                args["num_ops"] = int(value)
            elif key == "mstd":
                args["magnitude_std"] = float(value)
            elif key == "mmax":
                args["magnitude_max"] = float(value)
            elif key == "p":
                args["prob"] = float(value)
            else:
                args["increasing"] = bool(int(value))
        return cls(**{**args, **kwargs})

    def apply_op(self, img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
        if self.prob < 1.0 and rng.random() > self.prob:
            return img
        level = self.magnitude
        if self.magnitude_std == float("inf"):
            level = rng.uniform(0.0, level)
        elif self.magnitude_std > 0:
            level = rng.normal(level, self.magnitude_std)
        level = max(0.0, min(level, self.magnitude_max))
        return _OPS[name](img, self.resample, self.fill, *_LEVEL_FNS[name](level, rng))

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = Image.fromarray(image)
        for k in rng.integers(0, len(self.op_names), size=self.num_ops):
            img = self.apply_op(img, self.op_names[int(k)], rng)
        return np.asarray(img)
