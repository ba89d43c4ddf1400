"""Drawing detections for inspection PNGs: translucent instance masks, box outlines, 'name score' labels.

Pure PIL on uint8 images, so it runs on any host after `jax.device_get`; `side_by_side` puts a prediction
next to its ground truth in one PNG.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class index (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    masks: np.ndarray | None = None,
    score_threshold: float = 0.3,
    mask_alpha: float = 0.45,
) -> np.ndarray:
    """Draws the instances scoring >= `score_threshold` on a copy of `image`.

    image uint8 (H, W, 3); boxes (N, 4) [ymin, xmin, ymax, xmax] pixels; labels (N,) class index (< 0 is
    skipped); scores (N,); masks bool (N, H, W) or None. Returns uint8 (H, W, 3).
    """
    out = np.asarray(image, np.uint8).copy()
    labels, scores = np.asarray(labels), np.asarray(scores)
    keep = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold and labels[i] >= 0]
    if masks is not None:
        masks = np.asarray(masks, bool)
        for i in keep[::-1]:  # highest score painted last, on top
            colour = np.array(palette(int(labels[i])), np.float32)
            region = masks[i]
            out[region] = np.round((1 - mask_alpha) * out[region] + mask_alpha * colour).astype(np.uint8)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in keep:
        ymin, xmin, ymax, xmax = (float(v) for v in boxes[i])
        colour = palette(int(labels[i]))
        draw.rectangle([xmin, ymin, max(xmin, xmax - 1), max(ymin, ymax - 1)], outline=colour, width=1)
        label = int(labels[i])
        name = class_names[label] if label < len(class_names) else str(label)
        text = f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((xmin + 1, ymin), text, font=font)
        draw.rectangle([left - 1, top, right, bottom], fill=colour)
        draw.text((xmin + 1, ymin), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, np.uint8)


def side_by_side(a: np.ndarray, b: np.ndarray, gap: int = 4) -> np.ndarray:
    """uint8 images next to each other (e.g. prediction | ground truth), white gap, bottom padded."""
    a, b = np.asarray(a, np.uint8), np.asarray(b, np.uint8)
    height = max(a.shape[0], b.shape[0])
    out = np.full((height, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    out[: a.shape[0], : a.shape[1]] = a
    out[: b.shape[0], a.shape[1] + gap :] = b
    return out


def draw_label_map(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The image with each pixel blended with ``colours[label]``; labels < 0 (void / ignore) stay unblended.

    image uint8 (H, W, 3); labels int (H, W); colours uint8 (K, 3)."""
    labels = np.asarray(labels)
    known = (labels >= 0) & (labels < len(colours))
    tint = np.asarray(colours, np.float32)[np.where(known, labels, 0)]
    out = image.astype(np.float32)
    out[known] = (1 - alpha) * out[known] + alpha * tint[known]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
