"""Per-query class probabilities and mask logits -> a panoptic map, in fixed shapes (jit / vmap friendly).

kMaX-DeepLab's panoptic inference (deeplab2 `max_deeplab.py`, kmax-deeplab `kmax_model.py`), with Mask2Former's
sigmoid masks as an option:

  1. each query's class = argmax over the C real classes of its probabilities, score = that probability;
     with ``drop_void_argmax`` a query whose void probability (column C) exceeds it is dropped (Mask2Former);
  2. mask probabilities = softmax over queries of the mask logits (kMaX; ClusterFormer's soft assignment
     of pixels to centres) or a per-query sigmoid; a query's pixels are those above ``pixel_threshold``;
  3. queries are visited by descending score^a * (mean mask probability over their pixels)^b;
  4. a query is kept when its score exceeds the thing / stuff class threshold and the pixels it can still
     claim (not taken by an earlier query) are at least ``overlap_threshold`` of its pixels; it takes them;
  5. every kept query of one stuff class joins that class's first segment (one segment per stuff class);
  6. segments smaller than ``min_thing_area`` / ``min_stuff_area`` pixels become void.

Output per image: 'panoptic' int32 (H, W) segment id per pixel, 0 = void; segment id k + 1 is query k's
segment, with 'segment_classes' int32 (Q,) its contiguous class (-1: query k owns no segment) and
'segment_scores' float32 (Q,) its class score. This is what `evaluation.panoptic.PanopticEvaluator` reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

MASK_ACTIVATIONS = ("softmax", "sigmoid")


@functools.partial(jax.jit, static_argnames=("mask_activation",))
def panoptic_postprocess(
    class_probs: jax.Array,
    mask_logits: jax.Array,
    is_thing: Sequence[bool],
    *,
    thing_threshold: float = 0.7,
    stuff_threshold: float = 0.5,
    pixel_threshold: float = 0.4,
    overlap_threshold: float = 0.8,
    min_thing_area: int = 0,
    min_stuff_area: int = 0,
    mask_activation: str = "softmax",
    drop_void_argmax: bool = False,
    reorder_class_weight: float = 1.0,
    reorder_mask_weight: float = 1.0,
) -> dict[str, jax.Array]:
    """One image: class_probs (Q, C + 1) with void last, or (Q, C); mask_logits (Q, H, W). See the module doc.

    `is_thing` (C,) flags the thing classes. Only `mask_activation` is static: thresholds, areas and flags are
    traced, so changing them does not recompile. kMaX's COCO values are the defaults (thresholds 0.7 /
    0.5, pixel 0.4, overlap 0.8); Mask2Former: mask_activation='sigmoid', pixel_threshold=0.5, one class
    threshold 0.8 for both, drop_void_argmax=True.
    """
    if mask_activation not in MASK_ACTIVATIONS:
        raise ValueError(f"mask_activation must be one of {MASK_ACTIVATIONS}, got {mask_activation!r}")
    thing_table = jnp.asarray(is_thing, bool)
    num_classes = thing_table.shape[0]
    num_queries = class_probs.shape[0]
    if class_probs.shape[-1] not in (num_classes, num_classes + 1):
        raise ValueError(f"class_probs has {class_probs.shape[-1]} columns for {num_classes} classes")
    probs = class_probs.astype(jnp.float32)
    scores, labels = jnp.max(probs[:, :num_classes], axis=-1), jnp.argmax(probs[:, :num_classes], axis=-1)
    usable = jnp.ones((num_queries,), bool)
    if probs.shape[-1] == num_classes + 1:  # with drop_void_argmax, argmax over C + 1 must be a real class
        usable = ~jnp.asarray(drop_void_argmax, bool) | (probs[:, num_classes] <= scores)
    logits = mask_logits.astype(jnp.float32)
    masks = jax.nn.softmax(logits, axis=0) if mask_activation == "softmax" else jax.nn.sigmoid(logits)
    binary = masks > pixel_threshold
    pixels = jnp.sum(binary, axis=(1, 2))
    mask_scores = jnp.sum(jnp.where(binary, masks, 0.0), axis=(1, 2)) / jnp.maximum(pixels, 1)
    order_score = scores**reorder_class_weight * mask_scores**reorder_mask_weight
    order = jnp.argsort(-order_score, stable=True)
    thing = thing_table[labels]
    confident = usable & jnp.where(thing, scores > thing_threshold, scores > stuff_threshold)

    def visit(carry, q):
        panoptic, stuff_slot, seg_classes, seg_scores = carry
        new = binary[q] & (panoptic == 0)
        claimed = jnp.sum(new)
        keep = confident[q] & (claimed > 0) & (claimed >= overlap_threshold * pixels[q])
        label = labels[q]
        earlier = stuff_slot[label]
        merge = keep & ~thing[q] & (earlier >= 0)
        segment = jnp.where(merge, earlier + 1, q + 1)
        panoptic = jnp.where(keep & new, segment, panoptic)
        first_stuff = keep & ~thing[q] & (earlier < 0)
        stuff_slot = stuff_slot.at[label].set(jnp.where(first_stuff, q, earlier))
        owns = keep & ~merge
        seg_classes = seg_classes.at[q].set(jnp.where(owns, label, -1))
        seg_scores = seg_scores.at[q].set(jnp.where(owns, scores[q], 0.0))
        return (panoptic, stuff_slot, seg_classes, seg_scores), None

    init = (
        jnp.zeros(mask_logits.shape[1:], jnp.int32),
        jnp.full((num_classes,), -1, jnp.int32),
        jnp.full((num_queries,), -1, jnp.int32),
        jnp.zeros((num_queries,), jnp.float32),
    )
    (panoptic, _, seg_classes, seg_scores), _ = jax.lax.scan(visit, init, order.astype(jnp.int32))

    areas = jnp.bincount(panoptic.ravel(), length=num_queries + 1)[1:]
    seg_thing = thing_table[jnp.maximum(seg_classes, 0)]
    small = (seg_classes >= 0) & jnp.where(seg_thing, areas < min_thing_area, areas < min_stuff_area)
    panoptic = jnp.where(jnp.concatenate([jnp.zeros((1,), bool), small])[panoptic], 0, panoptic)
    seg_classes = jnp.where(small, -1, seg_classes)
    seg_scores = jnp.where(small, 0.0, seg_scores)
    return {"panoptic": panoptic, "segment_classes": seg_classes, "segment_scores": seg_scores}


def panoptic_postprocess_batch(class_probs: jax.Array, mask_logits: jax.Array, is_thing: Sequence[bool], **kwargs):
    """`panoptic_postprocess` over a leading batch axis: (B, Q, C[+1]), (B, Q, H, W) -> (B, ...) outputs."""
    fn = functools.partial(panoptic_postprocess, is_thing=jnp.asarray(is_thing, bool), **kwargs)
    return jax.vmap(fn)(jnp.asarray(class_probs), jnp.asarray(mask_logits))
