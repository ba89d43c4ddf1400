"""COCO's annotation encodings: polygon and RLE masks, PNG bytes and panoptic RGB segment ids.

Polygons are filled by the pixel-centre rule (a pixel belongs to the mask when its centre lies inside,
even-odd); pycocotools rasterises outlines its own way, so on small random polygons about 2% of mask
pixels, all on the outline, differ from its masks (axis-aligned integer rectangles agree exactly). RLE
decoding and `rle_encode` are bit-exact with pycocotools (compressed counts strings included), so exported
masks score as written. Panoptic PNGs encode segment id = R + 256 G + 256^2 B (panopticapi's
`rgb2id` / `id2rgb`). Used by the COCO builders (coco.py) and the shapes dataset's COCO-format export.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image


def polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Fills one COCO polygon [x0, y0, x1, y1, ...] (pixel-edge coordinates).

    A pixel is set when its centre lies inside the polygon (even-odd rule).
    """
    mask = np.zeros((height, width), np.uint8)
    pts = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return mask
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    centres = np.arange(height, dtype=np.float64)[:, None] + 0.5
    crosses = ((y0 <= centres) & (centres < y1)) | ((y1 <= centres) & (centres < y0))
    rows, edges = np.nonzero(crosses)
    if not len(rows):
        return mask
    t = (centres[rows, 0] - y0[edges]) / (y1[edges] - y0[edges])
    xs = x0[edges] + t * (x1[edges] - x0[edges])
    # Pixel c is inside when an odd number of crossings lie at or left of its centre c + 0.5.
    first = np.clip(np.ceil(xs - 0.5), 0, width).astype(np.intp)
    toggles = np.zeros((height, width + 1), np.int32)
    np.add.at(toggles, (rows, first), 1)
    mask[:] = (np.cumsum(toggles[:, :width], axis=1) & 1).astype(np.uint8)
    return mask


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (uncompressed `counts` list or compressed string) -> uint8 (h, w) mask."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    counts = np.asarray(counts, np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {height} * {width}")
    values = (np.arange(len(counts)) % 2).astype(np.uint8)
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """uint8/bool (h, w) mask -> COCO compressed RLE {'size': [h, w], 'counts': str}."""
    mask = np.asarray(mask).astype(bool)
    height, width = mask.shape
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [height, width], "counts": _counts_to_rle_string(counts)}


def _counts_to_rle_string(counts: Sequence[int]) -> str:
    """pycocotools' rleToString: delta to the run two back, 5-bit groups, offset 48."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _rle_string_to_counts(s: str) -> list[int]:
    """Inverse of `_counts_to_rle_string` (pycocotools' rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygon list or RLE) -> uint8 (height, width) 0/1 mask."""
    if isinstance(segmentation, list):
        mask = np.zeros((height, width), np.uint8)
        for polygon in segmentation:
            mask |= polygon_mask(polygon, height, width)
        return mask
    mask = rle_decode(segmentation)
    if mask.shape != (height, width):
        raise ValueError(f"RLE of size {mask.shape} on a {height}x{width} image")
    return mask


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8/bool array (bool and 0/1 masks as 1-bit PNGs)."""
    buffer = io.BytesIO()
    image = Image.fromarray(array.astype(bool)) if array.dtype == bool else Image.fromarray(array)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """A 0/1 (or bool) mask as a 1-bit PNG."""
    return png_bytes(np.asarray(mask).astype(bool))


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) -> segment ids R + 256 G + 256^2 B (int32)."""
    rgb = np.asarray(rgb).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_id`: uint8 (H, W, 3)."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def segments_from_ids(id_map: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Per-pixel k + 1 for the pixels of `segment_ids[k]`, 0 elsewhere (void)."""
    segments = np.zeros(id_map.shape, np.int32)
    for k, sid in enumerate(np.asarray(segment_ids).tolist()):
        segments[id_map == sid] = k + 1
    return segments
