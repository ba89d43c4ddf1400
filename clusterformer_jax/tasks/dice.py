"""The dice term (Milletari et al. 2016, V-Net), the one implementation behind every mask loss and mask
matcher: set prediction (Mask2Former's loss and matching cost), kMaX-DeepLab's PQ-style loss and matcher, and
the semantic head's per-class dice."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dice_score(
    probs: jax.Array,
    targets: jax.Array,
    *,
    smooth: float = 1.0,
    eps: float = 0.0,
    pairwise: bool = False,
    axis: int | tuple[int, ...] = -1,
) -> jax.Array:
    """(2 sum(p t) + smooth) / (sum p + sum t + smooth + eps), the sums over ``axis`` (the pixels).

    ``smooth`` = 1 is the losses' (Mask2Former, kMaX-DeepLab); kMaX's matcher takes smooth 0, eps 2e-5.
    ``pairwise``: probs (..., N, P) and targets (..., M, P) give (..., N, M), every (prediction, target) pair
    (the matchers' cost tables); otherwise the two broadcast and ``axis`` is reduced.
    """
    if pairwise:
        inter = jnp.einsum("...np,...mp->...nm", probs, targets)
        sums = jnp.sum(probs, -1)[..., :, None] + jnp.sum(targets, -1)[..., None, :]
    else:
        inter = jnp.sum(probs * targets, axis)
        sums = jnp.sum(probs, axis) + jnp.sum(targets, axis)
    numer = 2.0 * inter + smooth if smooth else 2.0 * inter
    denom = sums + smooth if smooth else sums
    return numer / (denom + eps if eps else denom)


def dice_loss(probs: jax.Array, targets: jax.Array, **kwargs) -> jax.Array:
    """1 - ``dice_score(probs, targets, **kwargs)``."""
    return 1.0 - dice_score(probs, targets, **kwargs)
