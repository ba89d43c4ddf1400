"""mmseg's sliding-window test as a module: a segmentation model run on crop-sized windows of a fixed eval
canvas, the stride-4 logits of overlapping windows averaged (``config.semantic.inference='slide'``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ConfigError

LOGIT_STRIDE = 4  # the segmentation heads predict on the stride-4 grid of their input


def window_starts(extent: jax.Array, size: int, crop: int, stride: int, cell: int) -> tuple[jax.Array, jax.Array]:
    """Window starts along one axis of a ``size`` canvas whose valid part is [0, extent) per row, as mmseg.

    mmseg over an image of length E: n = max(E - crop + stride - 1, 0) // stride + 1 windows, window i at
    max(min(i * stride, E - crop), 0). Here ``stride`` and ``crop`` are multiples of ``cell`` (the logit grid's
    cell) and the last window's start E - crop is rounded up to a cell, so windows tile whole cells; it then
    reaches at most cell - 1 pixels past E (into masked padding). With static shapes there are always
    N = n(size) windows: rows needing fewer get inactive ones (parked on the last window, weight 0).

    extent (B,) int -> (starts (N, B) int32, active (N, B) bool).
    """
    count = max(size - crop + stride - 1, 0) // stride + 1
    index = jnp.arange(count, dtype=jnp.int32)[:, None]
    extent = jnp.asarray(extent, jnp.int32)[None]
    needed = jnp.maximum(extent - crop + stride - 1, 0) // stride + 1
    last = jnp.clip(-(-(extent - crop) // cell) * cell, 0, size - crop)
    return jnp.minimum(index * stride, last), index < needed


def valid_extent(pixel_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows, cols) (B,) of each row's valid top-left region: one past the last row / column with a real pixel."""

    def last(any_valid: jax.Array) -> jax.Array:
        return jnp.max(jnp.where(any_valid, jnp.arange(1, any_valid.shape[-1] + 1), 0), axis=-1)

    return last(jnp.any(pixel_mask, axis=2)), last(jnp.any(pixel_mask, axis=1))


def slide_plan(
    pixel_mask: jax.Array, crop: tuple[int, int], stride: tuple[int, int], cell: int = LOGIT_STRIDE
) -> tuple[jax.Array, jax.Array, tuple[int, int], tuple[int, int]]:
    """The windows of a (B, H, W) canvas: (starts (N, B, 2) int32 pixels, active (N, B) bool, crop, stride).

    The crop is cut to the canvas (mmseg: to the image) and the stride rounded down to whole ``cell``s
    (at least one): mmseg's 426 becomes 424 on the stride-4 logit grid. Windows in row-major order.
    """
    _, height, width = pixel_mask.shape
    if height % cell or width % cell:
        raise ConfigError(f"sliding-window inference: canvas {height}x{width} is not a multiple of {cell}")
    crop = (min(int(crop[0]), height), min(int(crop[1]), width))
    if crop[0] % cell or crop[1] % cell:
        raise ConfigError(f"config.semantic.slide_crop={crop} must be a multiple of the logit stride {cell}")
    stride = tuple(max(cell, int(s) // cell * cell) for s in stride)
    rows, cols = valid_extent(pixel_mask)
    ys, y_active = window_starts(rows, height, crop[0], stride[0], cell)
    xs, x_active = window_starts(cols, width, crop[1], stride[1], cell)
    ny, nx = ys.shape[0], xs.shape[0]
    starts = jnp.stack([jnp.repeat(ys, nx, 0), jnp.tile(xs, (ny, 1))], axis=-1)
    active = jnp.repeat(y_active, nx, 0) & jnp.tile(x_active, (ny, 1))
    return starts, active, crop, stride


def _crop(values: jax.Array, start: jax.Array, size: tuple[int, int]) -> jax.Array:
    """values[y:y + size[0], x:x + size[1]] of one row (H, W[, C]) at a traced start (y, x)."""
    return jax.lax.dynamic_slice(values, (start[0], start[1]) + (0,) * (values.ndim - 2), size + values.shape[2:])


def _add_window(total: jax.Array, window: jax.Array, start: jax.Array) -> jax.Array:
    """total (g_H, g_W[, K]) with window (g_h, g_w[, K]) added at cell `start` (y, x)."""
    current = _crop(total, start, window.shape[:2])
    index = (start[0], start[1]) + (0,) * (total.ndim - 2)
    return jax.lax.dynamic_update_slice(total, current + window, index)


class SlidingWindow(nn.Module):
    """``model`` at eval as mmseg's sliding-window test: windows of ``crop`` every ``stride`` pixels (h, w),
    the final logits (``select`` of its outputs) of the windows covering a stride-4 cell summed and divided
    by their count.

    Static shapes over the fixed eval canvas: every row gets the canvas's window count (`slide_plan`), placed
    per row over its *valid* region (from ``pixel_mask``) exactly as mmseg places them over the image, so no
    window reaches into padding except by < 4 px at the far edge (rounding to the logit grid; those pixels
    stay masked). Windows a row does not need weigh 0; a window needed by no row of the batch is skipped
    (``nn.cond``), so a batch of small images costs its own windows only. Windows run one at a time over the
    batch (``nn.scan``), so memory is that of one crop-sized batch. An image shorter than the crop is seen
    in one window with its padding masked (mmseg runs the smaller image itself).

    The inner model's variables are this module's (``nn.share_scope``): the same tree as without the
    wrapper, so checkpoints move freely between 'whole' and 'slide'. Training (``train=True``) and
    ``init`` call the model unchanged. Eval returns {'semantic_logits': (B, H/4, W/4, K) float32}, 0 on
    cells no window covers (padding only). Tools that reach into the model's fields (visualize's
    --decoder_layer) need ``inference='whole'``.
    """

    model: nn.Module
    num_classes: int
    select: Callable[[Any], jax.Array]  # the model's outputs -> (B, h/4, w/4, K) final logits
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, images: jax.Array, pixel_mask: jax.Array | None = None, train: bool = False) -> Any:
        if train or self.is_initializing():
            return self.model(images, pixel_mask, train)
        b, height, width, _ = images.shape
        mask = jnp.ones((b, height, width), bool) if pixel_mask is None else pixel_mask.astype(bool)
        starts, active, crop, _ = slide_plan(mask, self.crop, self.stride)
        cell, k = LOGIT_STRIDE, self.num_classes
        grid = (crop[0] // cell, crop[1] // cell)

        def run(mdl, carry, start, weight):
            total, count = carry
            window_images = jax.vmap(lambda x, s: _crop(x, s, crop))(images, start)
            window_mask = jax.vmap(lambda x, s: _crop(x, s, crop))(mask, start)
            logits = self.select(mdl(window_images, window_mask, False)).astype(jnp.float32)
            if logits.shape[1:] != grid + (k,):
                raise ConfigError(f"sliding window: a {crop} crop gave logits {logits.shape[1:]}, not {grid + (k,)}")
            cells = start // cell
            total = jax.vmap(_add_window)(total, logits * weight[:, None, None, None], cells)
            ones = jnp.broadcast_to(weight[:, None, None], (b,) + grid)
            return total, jax.vmap(_add_window)(count, ones, cells)

        def body(mdl, carry, window):
            start, on = window
            carry = nn.cond(jnp.any(on), run, lambda mdl, c, s, w: c, mdl, carry, start, on.astype(jnp.float32))
            return carry, None

        init = (
            jnp.zeros((b, height // cell, width // cell, k), jnp.float32),
            jnp.zeros((b, height // cell, width // cell), jnp.float32),
        )
        scan = nn.scan(body, variable_broadcast=True, split_rngs={"params": False, "dropout": False})
        (total, count), _ = scan(self.model, init, (starts, active))
        logits = total / jnp.maximum(count, 1.0)[..., None]
        return {"semantic_logits": logits}
