"""Transforms for dense tasks: detection, instance, semantic and panoptic segmentation.

Every dataset decoder (coco.py, ade20k.py, shapes.py) produces a *dense
example*, a dict of numpy arrays in source-image pixels:

  image      uint8 (H, W, 3)
  image_id   int
  boxes      float32 (N, 4) [ymin, xmin, ymax, xmax] in pixel-edge coordinates
             (an object covering rows r0..r1 has ymin = r0, ymax = r1 + 1)
  classes    int32 (N,) contiguous class index
  is_crowd   bool (N,)
  is_thing   bool (N,)
  masks      optional uint8 (N, H, W) 0/1, one mask per instance; instances
             may overlap (COCO instances)
  segments   optional int32 (H, W): k + 1 where segment k is, 0 for void;
             segments do not overlap (panoptic, ADE20K, shapes)
  semantic   optional uint8 (H, W) class index, 255 = ignore
  ...        any other per-pixel target map the dataset declares (`PixelMap`, e.g. a depth map),
             (H, W) or (H, W, C), rendered exactly like `semantic`

`DenseTrainTransform` and `DenseEvalTransform` turn it into fixed-shape
arrays (see `render` for the keys). Geometry follows detectron2 / Mask2Former:

  * train, 'fit' scale mode (COCO large-scale jitter, paper §4.1.2): draw
    s ~ U(scale_range), resize by s * min(out_h / H, out_w / W) (detectron2
    `ResizeScale`), take a random out_h x out_w window (`FixedSizeCrop`),
    flip with probability 0.5, pad bottom/right.
  * train, 'shorter' scale mode (ADE20K, paper §4.1.3): resize by
    s * min(min(out) / min(H, W), 4 * max(out) / max(H, W)) (mmseg's
    `Resize(img_scale=(4c, c), ratio_range)`), random crop that keeps any one
    class below `cat_max_ratio` of the labelled crop pixels (mmseg, 10 tries),
    flip, pad.
  * eval: shorter side to `short_side` with the longer side at most
    `max_size` (detectron2 `ResizeShortestEdge`), no crop, pad to the canvas.

Sizes are rounded as detectron2 does, `int(x + 0.5)`. The image is resampled
bilinearly with PIL; every label map and mask is sampled by nearest neighbour
at the same pixel centres, so labels stay aligned with the image. Boxes are
mapped arithmetically (scale, shift, clip to the window, mirror). An instance
survives when its clipped box has positive area and, if the dataset has
masks, at least one of its pixels lands in the window (at full output
resolution). Survivors keep their order and fill the first `max_instances`
slots; the rest are dropped.

Randomness comes only from the generator grain passes to `random_map`, so the
output is a pure function of (seed, element position).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from clusterformer_jax.data import transforms as T

IGNORE_LABEL = 255
SCALE_MODES = ("fit", "shorter")
INSTANCE_TARGETS = ("things", "all")

DenseExample = dict[str, Any]


def round_half_up(x: float) -> int:
    """detectron2's size rounding: `int(x + 0.5)` (never below 1)."""
    return max(1, int(x + 0.5))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the source image lands on the output canvas.

    The source (src_h, src_w) is resized to (round(src_h * s), round(src_w * s));
    `scale_y`, `scale_x` are the exact resulting ratios. The window
    [top, top + crop_h) x [left, left + crop_w) of the resized image is copied
    to the canvas's top-left corner, mirrored left-right when `flip`.
    """

    src_h: int
    src_w: int
    scale_y: float
    scale_x: float
    top: int
    left: int
    crop_h: int
    crop_w: int
    flip: bool = False

    @classmethod
    def create(
        cls,
        src_h: int,
        src_w: int,
        scale: float,
        out_h: int,
        out_w: int,
        top_frac: float = 0.0,
        left_frac: float = 0.0,
        flip: bool = False,
    ) -> Placement:
        """Resizes by `scale` and places a window at fractions of the free offset range."""
        resized_h, resized_w = round_half_up(src_h * scale), round_half_up(src_w * scale)
        crop_h, crop_w = min(out_h, resized_h), min(out_w, resized_w)
        top = int(math.floor(top_frac * (resized_h - crop_h + 1)))
        left = int(math.floor(left_frac * (resized_w - crop_w + 1)))
        return cls(
            src_h,
            src_w,
            resized_h / src_h,
            resized_w / src_w,
            min(top, resized_h - crop_h),
            min(left, resized_w - crop_w),
            crop_h,
            crop_w,
            flip,
        )

    def source_rows(self, stride: int = 1) -> np.ndarray:
        """Source row sampled by each output row (at `stride`) inside the window."""
        centres = _grid_centres(self.crop_h, stride)
        return np.clip(np.floor((self.top + centres) / self.scale_y), 0, self.src_h - 1).astype(np.intp)

    def source_cols(self, stride: int = 1) -> np.ndarray:
        """Source column sampled by each output column (at `stride`) inside the window."""
        centres = _grid_centres(self.crop_w, stride)
        if self.flip:
            centres = self.crop_w - centres
        return np.clip(np.floor((self.left + centres) / self.scale_x), 0, self.src_w - 1).astype(np.intp)

    def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Source yxyx boxes -> canvas yxyx boxes, clipped to the window."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        y = np.clip(boxes[:, [0, 2]] * self.scale_y - self.top, 0, self.crop_h)
        x = np.clip(boxes[:, [1, 3]] * self.scale_x - self.left, 0, self.crop_w)
        if self.flip:
            x = self.crop_w - x[:, ::-1]
        return np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=-1).astype(np.float32)

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """Bilinear resample of the window: uint8 (crop_h, crop_w, 3)."""
        box = (
            self.left / self.scale_x,
            self.top / self.scale_y,
            (self.left + self.crop_w) / self.scale_x,
            (self.top + self.crop_h) / self.scale_y,
        )
        pil = Image.fromarray(image)
        if (self.crop_h, self.crop_w) == (self.src_h, self.src_w) and box == (0, 0, self.src_w, self.src_h):
            out = image
        else:
            out = np.asarray(pil.resize((self.crop_w, self.crop_h), Image.Resampling.BILINEAR, box=box))
        if self.flip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


def _grid_centres(extent: int, stride: int) -> np.ndarray:
    """Centres (in output pixels) of the stride-cells whose centre lies inside `extent`."""
    count = (2 * extent + stride - 1) // (2 * stride)
    return np.arange(count, dtype=np.float64) * stride + stride / 2.0


def _sampled(array: np.ndarray, index: np.ndarray, axis: int, scale: float) -> np.ndarray:
    """The source rows/cols that `index` samples along `axis` (a view when upsampling)."""
    if scale >= 1.0:  # Consecutive samples are at most one pixel apart: a contiguous range.
        return array[(slice(None),) * axis + (slice(int(index.min()), int(index.max()) + 1),)]
    return np.take(array, np.unique(index), axis=axis)


def segment_boxes(segments: np.ndarray, num_segments: int) -> np.ndarray:
    """Tight yxyx pixel-edge boxes of segments 1..num_segments of an id map (zeros if absent)."""
    boxes = np.zeros((num_segments, 4), np.float32)
    if num_segments == 0:
        return boxes
    ids = np.arange(1, num_segments + 1)
    row_has = np.zeros((segments.shape[0], num_segments + 1), bool)
    col_has = np.zeros((segments.shape[1], num_segments + 1), bool)
    rows, cols = np.nonzero(segments)
    labels = segments[rows, cols]
    row_has[rows, labels] = True
    col_has[cols, labels] = True
    row_has, col_has = row_has[:, ids], col_has[:, ids]
    present = row_has.any(axis=0)
    h, w = segments.shape
    boxes[:, 0] = np.argmax(row_has, axis=0)
    boxes[:, 2] = h - np.argmax(row_has[::-1], axis=0)
    boxes[:, 1] = np.argmax(col_has, axis=0)
    boxes[:, 3] = w - np.argmax(col_has[::-1], axis=0)
    boxes[~present] = 0
    return boxes


@dataclasses.dataclass(frozen=True)
class PixelMap:
    """How a per-pixel target map of the dense example is rendered: the source map ((H, W) or (H, W, *channels)
    in source pixels) is sampled by nearest neighbour at the image's pixel centres (so it stays aligned with the
    image through scale, crop and flip) onto a canvas of `dtype` holding `fill` in the padding, and everywhere
    when the example has no such map."""

    dtype: Any = np.float32
    fill: float | int = 0
    channels: tuple[int, ...] = ()

    def empty(self, out_h: int, out_w: int) -> np.ndarray:
        return np.full((out_h, out_w, *self.channels), self.fill, self.dtype)

    def render(self, source: np.ndarray | None, rows: np.ndarray, cols: np.ndarray, out_h: int, out_w: int):
        """The canvas with `source[rows, cols]` in its top-left window."""
        canvas = self.empty(out_h, out_w)
        if source is not None:
            canvas[: len(rows), : len(cols)] = np.asarray(source)[rows[:, None], cols[None, :]]
        return canvas


SEMANTIC = PixelMap(np.int32, IGNORE_LABEL)  # class per pixel, 255 = ignore (padding, void, no labels)


def _default_pixel_maps() -> dict[str, PixelMap]:
    return {"semantic": SEMANTIC}


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """Output layout shared by the train and eval transforms; `pixel_maps` names the per-pixel target maps
    rendered (each output key is the example key)."""

    out_h: int
    out_w: int
    max_instances: int
    mask_stride: int = 1
    instance_targets: str = "all"
    mean: Sequence[float] = T.IMAGENET_MEAN
    std: Sequence[float] = T.IMAGENET_STD
    pixel_maps: Mapping[str, PixelMap] = dataclasses.field(default_factory=_default_pixel_maps)

    def __post_init__(self):
        if self.out_h % self.mask_stride or self.out_w % self.mask_stride:
            raise ValueError(f"mask_stride {self.mask_stride} must divide the output size {self.out_h}x{self.out_w}")
        if self.instance_targets not in INSTANCE_TARGETS:
            raise ValueError(f"instance_targets must be one of {INSTANCE_TARGETS}, got {self.instance_targets!r}")
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be positive, got {self.max_instances}")


def _candidates(example: Mapping[str, Any], spec: RenderSpec) -> np.ndarray:
    """Indices of the instances that may fill slots (things only when asked)."""
    n = len(example["classes"])
    if spec.instance_targets == "things":
        return np.flatnonzero(np.asarray(example["is_thing"], bool))
    return np.arange(n)


def render(
    example: Mapping[str, Any], placement: Placement, spec: RenderSpec, normalize: T.Normalize
) -> dict[str, np.ndarray]:
    """Applies `placement` to a dense example; returns the fixed-shape arrays.

    Keys: image float32 (out_h, out_w, 3) normalised, 0 outside the image;
    image_mask bool (out_h, out_w); boxes float32 (M, 4) canvas-pixel yxyx;
    classes int32 (M,) (-1 in empty slots); instance_masks uint8
    (M, out_h / stride, out_w / stride); instance_valid, is_crowd, is_thing
    bool (M,); each of `spec.pixel_maps` (semantic int32 (out_h, out_w), 255 =
    ignore, also in padding and for datasets without semantic labels); panoptic_ids int32
    (out_h, out_w) slot + 1 of the segment at each pixel (0 = void, padding,
    or no segment map); image_id int32; orig_size int32 (2,) source (H, W);
    scale float32 (2,) output pixels per source pixel (y, x).
    """
    p, m, stride = placement, spec.max_instances, spec.mask_stride
    out_h, out_w = spec.out_h, spec.out_w
    masks, segments = example.get("masks"), example.get("segments")
    classes = np.asarray(example["classes"], np.int32)
    n = len(classes)

    candidates = _candidates(example, spec)
    boxes = p.map_boxes(example["boxes"]) if n else np.zeros((0, 4), np.float32)
    keep = np.zeros(n, bool)
    keep[candidates] = True
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

    rows, cols = p.source_rows(), p.source_cols()
    segment_canvas = None
    if segments is not None:
        segment_canvas = segments[rows[:, None], cols[None, :]]
        counts = np.bincount(segment_canvas.ravel(), minlength=n + 1)[1 : n + 1]
        keep &= counts > 0
    elif masks is not None and n:
        keep &= _sampled(_sampled(masks, rows, 1, p.scale_y), cols, 2, p.scale_x).any(axis=(1, 2))
    kept = np.flatnonzero(keep)[:m]
    k = len(kept)

    out: dict[str, np.ndarray] = {}
    image = np.zeros((out_h, out_w, 3), np.float32)
    window = image[: p.crop_h, : p.crop_w]  # Normalised in place: (pixel - mean) / std.
    np.subtract(p.resize_image(example["image"]), normalize.mean, out=window)
    window *= normalize.inv_std
    out["image"] = image
    image_mask = np.zeros((out_h, out_w), bool)
    image_mask[: p.crop_h, : p.crop_w] = True
    out["image_mask"] = image_mask

    out_boxes = np.zeros((m, 4), np.float32)
    out_boxes[:k] = boxes[kept]
    out["boxes"] = out_boxes
    out_classes = np.full((m,), -1, np.int32)
    out_classes[:k] = classes[kept]
    out["classes"] = out_classes

    mh, mw = out_h // stride, out_w // stride
    instance_masks = np.zeros((m, mh, mw), np.uint8)
    if k and (masks is not None or segments is not None):
        rows_s, cols_s = (rows, cols) if stride == 1 else (p.source_rows(stride), p.source_cols(stride))
        if segments is not None:
            low = segment_canvas if stride == 1 else segments[rows_s[:, None], cols_s[None, :]]
            instance_masks[:k, : len(rows_s), : len(cols_s)] = low[None] == (kept + 1)[:, None, None]
        else:
            instance_masks[:k, : len(rows_s), : len(cols_s)] = masks[
                kept[:, None, None], rows_s[None, :, None], cols_s[None, None, :]
            ]
    out["instance_masks"] = instance_masks

    valid = np.zeros((m,), bool)
    valid[:k] = True
    out["instance_valid"] = valid
    for key in ("is_crowd", "is_thing"):
        values = np.zeros((m,), bool)
        values[:k] = np.asarray(example[key], bool)[kept]
        out[key] = values

    for name, pixel_map in spec.pixel_maps.items():
        out[name] = pixel_map.render(example.get(name), rows, cols, out_h, out_w)

    panoptic = np.zeros((out_h, out_w), np.int32)
    if segment_canvas is not None:
        lut = np.zeros(n + 1, np.int32)
        lut[kept + 1] = np.arange(1, k + 1, dtype=np.int32)
        panoptic[: p.crop_h, : p.crop_w] = lut[segment_canvas]
    out["panoptic_ids"] = panoptic

    out["image_id"] = np.int32(example["image_id"])
    out["orig_size"] = np.array([p.src_h, p.src_w], np.int32)
    out["scale"] = np.array([p.scale_y, p.scale_x], np.float32)
    return out


class DenseTrainTransform(grain.transforms.RandomMap):
    """Random scale jitter + fixed-size crop + flip + pad, then `render`."""

    def __init__(
        self,
        spec: RenderSpec,
        scale_range: tuple[float, float] = (0.1, 2.0),
        scale_mode: str = "fit",
        hflip: bool = True,
        cat_max_ratio: float = 1.0,
    ):
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.spec = spec
        self.scale_range = (lo, hi)
        self.scale_mode = scale_mode
        self.hflip = hflip
        self.cat_max_ratio = float(cat_max_ratio)
        self.normalize = T.Normalize(spec.mean, spec.std)

    def base_scale(self, height: int, width: int) -> float:
        """Resize factor at jitter 1.0."""
        out_h, out_w = self.spec.out_h, self.spec.out_w
        if self.scale_mode == "fit":
            return min(out_h / height, out_w / width)
        return min(min(out_h, out_w) / min(height, width), 4 * max(out_h, out_w) / max(height, width))

    def placement(self, example: Mapping[str, Any], rng: np.random.Generator) -> Placement:
        """Draws the jitter, flip and window for one example."""
        height, width = example["image"].shape[:2]
        scale = rng.uniform(*self.scale_range) * self.base_scale(height, width)
        flip = bool(self.hflip and rng.random() < 0.5)
        semantic = example.get("semantic")
        tries = 10 if (self.cat_max_ratio < 1.0 and semantic is not None) else 1
        for _ in range(tries):
            p = Placement.create(
                height, width, scale, self.spec.out_h, self.spec.out_w, rng.random(), rng.random(), flip
            )
            if tries == 1:
                break
            crop = semantic[p.source_rows()[:, None], p.source_cols()[None, :]]
            counts = np.bincount(crop.ravel(), minlength=256)[:IGNORE_LABEL]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return p

    def random_map(self, element: DenseExample, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return render(element, self.placement(element, rng), self.spec, self.normalize)


class DenseEvalTransform(grain.transforms.Map):
    """Shorter side to `short_side` (longer side at most `max_size`), pad to the canvas."""

    def __init__(self, spec: RenderSpec, short_side: int, max_size: int):
        self.spec = spec
        self.short_side = int(short_side)
        self.max_size = int(max_size)
        self.normalize = T.Normalize(spec.mean, spec.std)

    def scale(self, height: int, width: int) -> float:
        """The eval resize factor; also keeps the image inside the canvas."""
        return min(
            self.short_side / min(height, width),
            self.max_size / max(height, width),
            self.spec.out_h / height,
            self.spec.out_w / width,
        )

    def map(self, element: DenseExample) -> dict[str, np.ndarray]:
        height, width = element["image"].shape[:2]
        p = Placement.create(height, width, self.scale(height, width), self.spec.out_h, self.spec.out_w)
        return render(element, p, self.spec, self.normalize)


def empty_output(spec: RenderSpec) -> dict[str, np.ndarray]:
    """An all-padding output with the same keys, shapes and dtypes as `render`."""
    m, stride = spec.max_instances, spec.mask_stride
    return {
        "image": np.zeros((spec.out_h, spec.out_w, 3), np.float32),
        "image_mask": np.zeros((spec.out_h, spec.out_w), bool),
        "boxes": np.zeros((m, 4), np.float32),
        "classes": np.full((m,), -1, np.int32),
        "instance_masks": np.zeros((m, spec.out_h // stride, spec.out_w // stride), np.uint8),
        "instance_valid": np.zeros((m,), bool),
        "is_crowd": np.zeros((m,), bool),
        "is_thing": np.zeros((m,), bool),
        **{name: pixel_map.empty(spec.out_h, spec.out_w) for name, pixel_map in spec.pixel_maps.items()},
        "panoptic_ids": np.zeros((spec.out_h, spec.out_w), np.int32),
        "image_id": np.int32(0),
        "orig_size": np.zeros((2,), np.int32),
        "scale": np.zeros((2,), np.float32),
    }
