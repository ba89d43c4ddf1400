"""FPN pixel decoder for the cluster decoder: four backbone stage maps -> features at strides 32, 16, 8 and a
stride-4 mask feature, all with ``dim`` channels.

[ASSUMPTION] The paper releases no decoder code. kMaX-DeepLab's pixel decoder uses axial attention and
Mask2Former's multi-scale deformable attention; this one is a plain FPN (lateral 1x1 projections, top-down
nearest upsampling + add, then 3x3 conv -> GroupNorm -> GELU per level), chosen because it is fast and
numerically identical on every backend (no gather-heavy deformable sampling, no axial attention over long
rows). Upsampling resizes to the finer map's explicit shape, so any aspect ratio and odd-sized maps work.
``blocks`` adds kMaX's convolutional part: residual bottleneck blocks (1x1 reduce -> 3x3 -> 1x1 expand, each
conv followed by GroupNorm, GELU between, the last norm's scale initialised to 0 so a block starts as the
identity) on the top-down path of each level, so coarse context is mixed spatially before it flows to the finer
levels and the mask feature (kMaX-DeepLab uses 1/5/1/1 blocks at strides 32/16/8/4, axial attention at 32/16).
Also here: the helpers that bring a pixel mask and sine positions to a feature map's grid.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.layers import gelu

Dtype = Any
STRIDES = (4, 8, 16, 32)


def norm_groups(channels: int, most: int = 32) -> int:
    """The largest group count <= ``most`` dividing ``channels`` (GroupNorm(32) when the width allows)."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def mask_to_grid(pixel_mask: jax.Array, hw: Tuple[int, int]) -> jax.Array:
    """(B, H, W) bool -> (B, h, w) bool: each cell takes the pixel at its top-left corner, row floor(i*H/h).

    Images sit at the canvas's top-left, so a cell is real exactly when its first pixel is: this matches the
    strided convolutions' grid (cell i starts at pixel i*s) for every stride and for odd map sizes.
    """
    big_h, big_w = pixel_mask.shape[1:]
    rows = np.asarray([(i * big_h) // hw[0] for i in range(hw[0])])
    cols = np.asarray([(j * big_w) // hw[1] for j in range(hw[1])])
    return pixel_mask[:, rows][:, :, cols]


def sine_positions(valid: jax.Array, dim: int, temperature: float = 10000.0) -> jax.Array:
    """DETR's 2-D sine position encoding (B, h, w) bool -> (B, h, w, dim) float32.

    Coordinates are the cumulative counts of real cells normalised by the real extent (as DETR), so a padded
    canvas gives its real cells the same encoding as the unpadded image.
    """
    if dim % 4:
        raise ModelConfigError(f"decoder field dim={dim} must be a multiple of 4 (sine positions use dim/4 bands)")
    valid = valid.astype(jnp.float32)
    y = jnp.cumsum(valid, axis=1)
    x = jnp.cumsum(valid, axis=2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y - 0.5) / (jnp.max(y, axis=1, keepdims=True) + eps) * scale
    x = (x - 0.5) / (jnp.max(x, axis=2, keepdims=True) + eps) * scale
    bands = dim // 4
    freq = temperature ** (jnp.arange(bands, dtype=jnp.float32) / bands)
    parts = []
    for coord in (y, x):
        angle = coord[..., None] / freq
        parts += [jnp.sin(angle), jnp.cos(angle)]
    return jnp.concatenate(parts, axis=-1)


def check_blocks(blocks: Sequence[int]) -> None:
    """One bottleneck-block count >= 0 per stride 32, 16, 8, 4, else a one-line ModelConfigError."""
    if len(blocks) != 4 or min(blocks) < 0:
        raise ModelConfigError(f"decoder field pixel_blocks={tuple(blocks)} needs 4 counts >= 0 (strides 32, 16, 8, 4)")


class Bottleneck(nn.Module):
    """x + GN(1x1(GELU(GN(3x3(GELU(GN(1x1(x)))))))) at width ``dim`` with a ``dim / 4`` bottleneck."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = max(self.dim // 4, 1)
        y = x
        for i, (width, kernel) in enumerate(((inner, 1), (inner, 3), (self.dim, 1))):
            pad = (kernel - 1) // 2
            y = nn.Conv(
                width,
                (kernel, kernel),
                padding=((pad, pad), (pad, pad)),
                use_bias=False,
                dtype=self.dtype,
                name=f"conv_{i}",
            )(y)
            last = i == 2
            y = nn.GroupNorm(
                num_groups=norm_groups(width),
                epsilon=1e-5,
                dtype=self.dtype,
                scale_init=nn.initializers.zeros if last else nn.initializers.ones,
                name=f"norm_{i}",
            )(y)
            if not last:
                y = gelu(y)
        return x + y


class PixelDecoder(nn.Module):
    """Stage maps [strides 4, 8, 16, 32] -> {32: , 16: , 8: , 4: } (B, h_s, w_s, dim) maps in ``dtype``.

    blocks: bottleneck blocks on the top-down path at strides (32, 16, 8, 4); all 0 is a plain FPN.
    """

    dim: int = 256
    blocks: Tuple[int, ...] = (0, 0, 0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, stages: Sequence[jax.Array]) -> Dict[int, jax.Array]:
        if len(stages) != 4:
            raise ModelConfigError(f"the pixel decoder needs 4 stage maps (strides 4..32), got {len(stages)}")
        check_blocks(self.blocks)
        blocks = dict(zip(reversed(STRIDES), self.blocks))
        groups = norm_groups(self.dim)
        top = None
        outputs = {}
        for stride, feat in reversed(list(zip(STRIDES, stages))):
            lateral = nn.Dense(self.dim, dtype=self.dtype, name=f"lateral_{stride}")(feat.astype(self.dtype))
            if top is not None:
                shape = (*lateral.shape[:3], self.dim)
                lateral = lateral + jax.image.resize(top, shape, "nearest").astype(self.dtype)
            for i in range(blocks[stride]):
                lateral = Bottleneck(self.dim, self.dtype, name=f"block_{stride}_{i}")(lateral)
            top = lateral
            # No bias: the GroupNorm right after removes it (with one channel per group, entirely), and a bias
            # whose gradient is only rounding noise would wander under Adam.
            out = nn.Conv(
                self.dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype, name=f"output_{stride}"
            )(top)
            out = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, name=f"norm_{stride}")(out)
            outputs[stride] = gelu(out)
        return outputs
