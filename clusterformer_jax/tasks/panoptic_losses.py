"""Panoptic losses: the paper's Eq. 7 (§4.1.5) over kMaX-DeepLab's four auxiliary terms.

    L = lambda_th L_th + lambda_st L_st + lambda_aux L_aux,   (lambda_th, lambda_st, lambda_aux) = (5, 3, 1)

L_aux is kMaX-DeepLab's weighted sum (Yu et al. 2022; bytedance/kmax-deeplab ``criterion.py`` and
``matcher.py``, after deeplab2's ``max_deeplab_loss.py``): PQ-style loss (class + mask terms, 3.0 each),
mask-ID cross-entropy (0.3), pixel instance discrimination (1.0) and an auxiliary semantic loss (1.0).

**[ASSUMPTION]** The paper defines L_th and L_st only as "the loss functions for things and stuff" and no code
was released. Here they are the same PQ-style loss (class + mask terms, no internal weight) restricted to the
queries matched to thing targets and to stuff targets respectively; the void-class term of the unmatched
queries is counted with the things (a query that is not a thing should say "no object"). The restriction
changes which queries enter a term and its class-term average, nothing else: masks are still the softmax
over all N queries. L_aux keeps the PQ-style loss over all targets, as kMaX has it.

Conventions (one decoder layer, no layer axis, everything at the same h x w grid):
  class_logits (B, N, C + 1) with the last logit void / no object; mask_logits (B, N, h, w);
  pixel_embeddings (B, h, w, D); semantic_logits (B, h, w, C);
  targets 'classes' int32 (B, M) (-1 empty), 'masks' (B, M, h, w) in {0, 1}, 'valid' bool (B, M),
  'is_thing' bool (B, M), 'semantic' int32 (B, h, w) (255 ignore), 'pixel_valid' bool (B, h, w) (optional).
A pixel is *labelled* when it is a real image pixel (pixel_valid) covered by a valid target mask; every other
pixel (void, or crop padding) is *unlabelled*, kMaX's ``pixel_gt_void_mask``. Per-image averages are then
averaged over the batch, as kMaX does (``divide_no_nan(sum, max(count, 1)).mean()``), so an image with
nothing to average contributes 0 and its gradient stays finite.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clusterformer_jax.tasks.dice import dice_loss, dice_score
from clusterformer_jax.tasks.matching import hungarian_match

IGNORE_LABEL = 255
_NEG = -1e9  # finite "minus infinity": masked logits that never turn a 0 * inf into NaN
TERMS = (
    "loss_thing_class",
    "loss_thing_mask",
    "loss_stuff_class",
    "loss_stuff_mask",
    "loss_pq_class",
    "loss_pq_mask",
    "loss_mask_id",
    "loss_insdis",
    "loss_aux_semantic",
)


@dataclasses.dataclass(frozen=True)
class PanopticLossConfig:
    """Weights of Eq. 7 and of kMaX-DeepLab's auxiliary terms.

    lambda_thing 5, lambda_stuff 3, lambda_aux 1: paper §4.1.5. pq_weight 3.0 (each of the class and mask
    terms), mask_id_weight 0.3, insdis_weight 1.0, aux_semantic_weight 1.0, temperature 0.3 (instance
    discrimination), num_samples 4096 (instance-discrimination pixels), clamp 1e-5 (kMaX's no-object
    weight, the floor of the matched dice / class-probability weights): kMaX-DeepLab. focal_alpha 0.75 (class
    term: 0.75 on non-void, 0.25 on void targets), mask_dice_scale 0.75 (deeplab2's split of the PQ-style
    weight) and sample_temperature 1.5 (Gumbel-top-k logits 1.5 log(1 / area)): kMaX's constants.
    share_final_matching (kMaX's SHARE_FINAL_MATCHING, True in its configs): every layer reuses the final
    layer's Hungarian matching *and* its matched dice / class-probability weights, as kMaX's shared
    ``process_gt`` does (one assignment per step); False matches and weights every layer on its own.
    """

    lambda_thing: float = 5.0
    lambda_stuff: float = 3.0
    lambda_aux: float = 1.0
    pq_weight: float = 3.0
    mask_id_weight: float = 0.3
    insdis_weight: float = 1.0
    aux_semantic_weight: float = 1.0
    temperature: float = 0.3
    num_samples: int = 4096
    clamp: float = 1e-5
    focal_alpha: float = 0.75
    mask_dice_scale: float = 0.75
    sample_temperature: float = 1.5
    share_final_matching: bool = True


# ------------------------------------------------------------------------------------------------- targets


def _prepare(targets: dict, spatial: tuple[int, int]) -> dict:
    """Targets with padded slots cleared, masks restricted to real pixels, and the labelled-pixel map."""
    valid = targets["valid"].astype(bool)
    b = valid.shape[0]
    pixel_valid = targets.get("pixel_valid")
    pixel_valid = jnp.ones((b,) + spatial, bool) if pixel_valid is None else pixel_valid.astype(bool)
    masks = targets["masks"].astype(jnp.float32) * valid[:, :, None, None] * pixel_valid[:, None]
    labelled = jnp.sum(masks, axis=1) > 0
    classes = jnp.where(valid, targets["classes"], -1).astype(jnp.int32)
    is_thing = targets.get("is_thing", jnp.ones_like(valid)).astype(bool) & valid
    return dict(targets, valid=valid, masks=masks, classes=classes, is_thing=is_thing, labelled=labelled)


def query_mask_probs(mask_logits: jax.Array, targets: dict) -> jax.Array:
    """(B, N, h, w) softmax over the N queries at every pixel, unlabelled pixels zeroed (kMaX's masking)."""
    t = _prepare(targets, mask_logits.shape[2:])
    probs = jax.nn.softmax(mask_logits.astype(jnp.float32), axis=1)
    return probs * t["labelled"][:, None].astype(jnp.float32)


# ------------------------------------------------------------------------------------------------ matching


def _similarities(class_probs: jax.Array, mask_probs: jax.Array, targets: dict) -> tuple[jax.Array, jax.Array]:
    """(class similarity, mask dice), both (B, N, M), no gradient (kMaX's matcher)."""
    class_probs = jax.lax.stop_gradient(class_probs.astype(jnp.float32))
    mask_probs = jax.lax.stop_gradient(mask_probs.astype(jnp.float32))
    t = _prepare(targets, mask_probs.shape[2:])
    num_classes = class_probs.shape[-1] - 1
    cls = jnp.clip(t["classes"], 0, num_classes - 1)
    class_sim = jnp.take_along_axis(class_probs[..., :num_classes], cls[:, None, :], axis=2)  # (B, N, M)
    b, n = mask_probs.shape[:2]
    pred = mask_probs.reshape(b, n, -1)
    tgt = t["masks"].reshape(b, t["masks"].shape[1], -1)
    return class_sim, dice_score(pred, tgt, smooth=0.0, eps=2e-5, pairwise=True)


def pq_similarity(class_probs: jax.Array, mask_probs: jax.Array, targets: dict) -> jax.Array:
    """kMaX's PQ-style similarity (B, N, M): p_n(class_m) x dice(mask_n, mask_m); no gradient.

    class_probs: (B, N, C + 1) softmax probabilities (void last; target classes index the first C).
    mask_probs: (B, N, h, w) from ``query_mask_probs`` (softmax over queries, unlabelled pixels zeroed).
    The dice is the matcher's: 2 |p t| / (|p| + |t| + 2e-5), without the loss's smoothing 1. Entries of padded
    targets are left as they are (``hungarian_match`` masks them).
    """
    class_sim, dice = _similarities(class_probs, mask_probs, targets)
    return class_sim * dice


def kmax_match(class_logits: jax.Array, mask_logits: jax.Array, targets: dict) -> tuple[jax.Array, jax.Array]:
    """Hungarian matching maximising ``pq_similarity``: (query_index (B, M) int32, matched (B, M) bool)."""
    t = _prepare(targets, mask_logits.shape[2:])
    similarity = pq_similarity(
        jax.nn.softmax(class_logits.astype(jnp.float32), -1), query_mask_probs(mask_logits, t), t
    )
    return hungarian_match(-similarity, t["valid"])


def _assignment(query_index: jax.Array, matched: jax.Array, num_queries: int) -> jax.Array:
    """(B, N, M) one-hot assignment of targets to queries (rows of unmatched targets all zero)."""
    return jax.nn.one_hot(query_index, num_queries, axis=1, dtype=jnp.float32) * matched[:, None, :]


# -------------------------------------------------------------------------------------------- PQ-style loss


def _pq_per_query(class_logits, mask_logits, targets, query_index, matched, weight_logits, cfg) -> dict:
    """Per-query pieces of the PQ-style loss of one layer: weighted class CE, weighted dice, memberships."""
    t = _prepare(targets, mask_logits.shape[2:])
    logits = class_logits.astype(jnp.float32)
    b, n, c1 = logits.shape
    assign = _assignment(query_index, matched, n)  # (B, N, M)
    is_matched = jnp.sum(assign, -1) > 0  # (B, N)
    target_class = jnp.sum(assign.astype(jnp.int32) * jnp.maximum(t["classes"], 0)[:, None, :], -1)
    labels = jnp.where(is_matched, target_class, c1 - 1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], axis=-1)[..., 0]
    alpha = jnp.where(is_matched, cfg.focal_alpha, 1.0 - cfg.focal_alpha)

    # detached weights from the weight source (this layer, or the final one under shared matching)
    w_class, w_mask = (class_logits, mask_logits) if weight_logits is None else weight_logits
    w_class = jax.lax.stop_gradient(w_class.astype(jnp.float32))
    w_mask = jax.lax.stop_gradient(w_mask.astype(jnp.float32))
    w_probs = jax.nn.softmax(w_mask, axis=1)
    class_sim, dice_sim = _similarities(jax.nn.softmax(w_class, -1), w_probs * t["labelled"][:, None], t)
    matched_dice = jnp.sum(assign * dice_sim, -1)
    matched_prob = jnp.sum(assign * class_sim, -1)
    # unmatched queries: kMaX's "IoU" with the unlabelled pixels, |p * void| / (|p| + 1e-5), p not masked
    void = (~t["labelled"]).astype(jnp.float32).reshape(b, 1, -1)
    w_flat = w_probs.reshape(b, n, -1)
    void_score = jnp.sum(w_flat * void, -1) / (jnp.sum(w_flat, -1) + 1e-5)
    class_weight = jnp.maximum(jnp.where(is_matched, matched_dice, void_score), cfg.clamp)
    mask_weight = jnp.where(is_matched, jnp.maximum(matched_prob, cfg.clamp), 0.0)

    probs = query_mask_probs(mask_logits, t).reshape(b, n, -1)
    query_target = jnp.einsum("bnm,bmp->bnp", assign, t["masks"].reshape(b, t["masks"].shape[1], -1))
    mask_dice = dice_loss(probs, query_target)
    in_thing = jnp.sum(assign * t["is_thing"][:, None, :], -1) > 0
    in_stuff = is_matched & ~in_thing
    return {
        "class": alpha * class_weight * nll,  # (B, N)
        "mask": mask_weight * mask_dice,  # (B, N)
        "matched": is_matched,
        "thing": in_thing,
        "stuff": in_stuff,
    }


def _reduce_pq(per_query: dict, which: str, cfg: PanopticLossConfig) -> tuple[jax.Array, jax.Array]:
    """(class term, mask term) over the queries of 'all', 'thing' (+ unmatched) or 'stuff'."""
    if which == "all":
        include = jnp.ones_like(per_query["matched"])
    elif which == "thing":
        include = per_query["thing"] | ~per_query["matched"]
    else:
        include = per_query["stuff"]
    inc = include.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(inc, -1), 1.0)
    class_term = jnp.mean(jnp.sum(inc * per_query["class"], -1) / count)
    num_queries = per_query["mask"].shape[1]
    mask_term = jnp.mean(jnp.sum(inc * per_query["mask"], -1) * cfg.mask_dice_scale / num_queries)
    return class_term, mask_term


def pq_style_loss(
    class_logits: jax.Array,
    mask_logits: jax.Array,
    targets: dict,
    query_index: jax.Array,
    matched: jax.Array,
    which: str = "all",
    weight_logits: tuple[jax.Array, jax.Array] | None = None,
    cfg: PanopticLossConfig = PanopticLossConfig(),
) -> tuple[jax.Array, jax.Array]:
    """kMaX-DeepLab's PQ-style loss of one layer given its matching: (class_term, mask_term), unweighted.

    Class term: each query's softmax cross-entropy against its target's class (matched) or void (unmatched),
    times 0.75 (non-void target) / 0.25 (void), times a detached weight: the matcher's dice of the matched
    pair, or for an unmatched query |p * unlabelled| / (|p| + 1e-5) with p its (unmasked) query-softmax mask
    (kMaX calls it IoU with void); the weight is clamped at >= ``cfg.clamp``. Per image the sum is divided by
    the number of included queries (kMaX divides by the entries with a nonzero loss, which with the clamp is
    every query barring an exact-zero CE), then averaged over the batch.
    Mask term: dice with smoothing 1 between each query's softmax mask (unlabelled pixels zeroed) and its
    matched target (all zeros when unmatched), times the detached matched class probability (clamped at >=
    ``cfg.clamp``; 0 for unmatched queries), summed over queries, times 0.75 / N (N = number of queries: kMaX
    pads the targets to N, so its "/ number of masks" is / N), averaged over the batch.
    which: 'all' (kMaX), 'thing' (queries matched to thing targets plus the unmatched ones, whose void term
      belongs here) or 'stuff' (queries matched to stuff targets), for L_th / L_st.
    weight_logits: (class_logits, mask_logits) the dice / class-probability weights come from; None uses this
      layer's own (kMaX shares the final layer's under SHARE_FINAL_MATCHING).
    """
    per_query = _pq_per_query(class_logits, mask_logits, targets, query_index, matched, weight_logits, cfg)
    return _reduce_pq(per_query, which, cfg)


# ----------------------------------------------------------------------------------------- pixel-wise terms


def mask_id_cross_entropy(
    mask_logits: jax.Array, targets: dict, query_index: jax.Array, matched: jax.Array
) -> jax.Array:
    """Mask-ID cross-entropy: at each labelled pixel, softmax CE over the N queries against the query matched
    to the target segment covering it. Pixels whose segment got no query (more targets than queries) have no
    class and are dropped with the unlabelled ones, as kMaX's all-zero target rows are. Mean over the kept
    pixels of each image, then over the batch."""
    t = _prepare(targets, mask_logits.shape[2:])
    b, n = mask_logits.shape[:2]
    assign = _assignment(query_index, matched, n)
    masks = t["masks"].reshape(b, t["masks"].shape[1], -1)
    masks = masks / jnp.maximum(jnp.sum(masks, 1, keepdims=True), 1.0)  # overlapping masks share a pixel
    query_target = jnp.einsum("bnm,bmp->bnp", assign, masks)  # (B, N, P)
    logp = jax.nn.log_softmax(mask_logits.astype(jnp.float32).reshape(b, n, -1), axis=1)
    ce = -jnp.sum(query_target * logp, axis=1)  # (B, P)
    keep = (jnp.sum(query_target, axis=1) > 0).astype(jnp.float32)
    return jnp.mean(jnp.sum(keep * ce, -1) / jnp.maximum(jnp.sum(keep, -1), 1.0))


def sample_pixels(rng: jax.Array, targets: dict, num_samples: int, temperature: float = 1.5):
    """Gumbel-top-k pixel sampling of kMaX: (indices (B, K) into the flat h*w grid, labelled (B, K) bool).

    K = min(num_samples, h * w); sampling logits temperature * log(h * w / area of the pixel's segment)
    (kMaX's inverse_gt_mask_area, which favours small segments), unlabelled pixels pushed to -1e9 so that
    they are drawn only when fewer than K labelled pixels exist; ``labelled`` marks those to mask out.
    """
    masks = targets["masks"]
    b, _, h, w = masks.shape
    area = jnp.sum(masks, axis=(2, 3))  # (B, M)
    pixel_area = jnp.einsum("bmhw,bm->bhw", masks, area).reshape(b, h * w)
    labelled = targets["labelled"].reshape(b, h * w)
    logits = temperature * jnp.log(h * w / jnp.maximum(pixel_area, 1.0))
    logits = jnp.where(labelled, logits, _NEG) + jax.random.gumbel(rng, (b, h * w))
    _, indices = jax.lax.top_k(logits, min(num_samples, h * w))
    return indices, jnp.take_along_axis(labelled, indices, axis=1)


def instance_discrimination(
    pixel_embeddings: jax.Array,
    targets: dict,
    rng: jax.Array,
    num_samples: int = 4096,
    temperature: float = 0.3,
    sample_temperature: float = 1.5,
) -> jax.Array:
    """kMaX's pixel-wise instance discrimination on K sampled labelled pixels (``sample_pixels``).

    Embeddings are L2-normalised; logits e_i . e_j / temperature (self-pair included, as kMaX); the target of
    row i is the same-segment indicator over the sampled pixels divided by its sum; loss per row the soft
    cross-entropy. Unlabelled samples (only when fewer than K labelled pixels exist) are dropped as rows *and*
    as columns (kMaX keeps them in the softmax denominators). Mean over the kept rows, then the batch.
    """
    t = _prepare(targets, pixel_embeddings.shape[1:3])
    b, h, w, d = pixel_embeddings.shape
    indices, keep = sample_pixels(rng, t, num_samples, sample_temperature)
    emb = jnp.take_along_axis(pixel_embeddings.astype(jnp.float32).reshape(b, h * w, d), indices[..., None], axis=1)
    emb = emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(emb * emb, -1, keepdims=True), 1e-12))
    seg = jnp.take_along_axis(t["masks"].reshape(b, -1, h * w), indices[:, None, :], axis=2)  # (B, M, K)
    same = jnp.einsum("bmk,bmj->bkj", seg, seg)
    target = same / jnp.maximum(jnp.sum(same, -1, keepdims=True), 1.0)
    logits = jnp.einsum("bkd,bjd->bkj", emb, emb) / temperature
    logits = jnp.where(keep[:, None, :], logits, _NEG)
    ce = -jnp.sum(target * jax.nn.log_softmax(logits, -1), -1)  # (B, K)
    rows = (keep & (jnp.sum(same, -1) > 0)).astype(jnp.float32)
    return jnp.mean(jnp.sum(rows * ce, -1) / jnp.maximum(jnp.sum(rows, -1), 1.0))


def auxiliary_semantic_loss(
    semantic_logits: jax.Array, semantic: jax.Array, pixel_valid: jax.Array | None = None
) -> jax.Array:
    """Per-pixel softmax CE of the auxiliary semantic head over every non-ignored pixel (label in [0, C),
    pixel_valid if given), mean per image, then over the batch. kMaX instead averages over 4096 pixels
    Gumbel-sampled by inverse segment area (temperature 2.0), which also up-weights small segments; here
    **no sampling**: every kept pixel counts equally (the logit grid is small enough to afford it)."""
    logits = semantic_logits.astype(jnp.float32)
    b, num_classes = logits.shape[0], logits.shape[-1]
    labels = semantic.astype(jnp.int32)
    keep = (labels >= 0) & (labels < num_classes)
    if pixel_valid is not None:
        keep = keep & pixel_valid.astype(bool)
    safe = jnp.where(keep, labels, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], axis=-1)[..., 0]
    keep = keep.astype(jnp.float32).reshape(b, -1)
    return jnp.mean(jnp.sum(keep * nll.reshape(b, -1), -1) / jnp.maximum(jnp.sum(keep, -1), 1.0))


# ----------------------------------------------------------------------------------------------- criterion


def _layer_terms(class_logits, mask_logits, targets, query_index, matched, weight_logits, cfg) -> dict:
    """Weighted Eq. 7 terms of one layer that every layer gets (PQ-style thing / stuff / all, mask-ID CE)."""
    per_query = _pq_per_query(class_logits, mask_logits, targets, query_index, matched, weight_logits, cfg)
    th_cls, th_mask = _reduce_pq(per_query, "thing", cfg)
    st_cls, st_mask = _reduce_pq(per_query, "stuff", cfg)
    pq_cls, pq_mask = _reduce_pq(per_query, "all", cfg)
    aux = cfg.lambda_aux
    return {
        "loss_thing_class": cfg.lambda_thing * th_cls,
        "loss_thing_mask": cfg.lambda_thing * th_mask,
        "loss_stuff_class": cfg.lambda_stuff * st_cls,
        "loss_stuff_mask": cfg.lambda_stuff * st_mask,
        "loss_pq_class": aux * cfg.pq_weight * pq_cls,
        "loss_pq_mask": aux * cfg.pq_weight * pq_mask,
        "loss_mask_id": aux * cfg.mask_id_weight * mask_id_cross_entropy(mask_logits, targets, query_index, matched),
    }


def _final(x: jax.Array, ndim: int) -> jax.Array:
    """The final layer of an optionally layer-stacked array."""
    return x[-1] if x.ndim == ndim + 1 else x


def panoptic_criterion(
    outputs: dict, targets: dict, rng: jax.Array, cfg: PanopticLossConfig = PanopticLossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 7 with deep supervision: (total, terms).

    outputs: 'class_logits' (L, B, N, C + 1), 'mask_logits' (L, B, N, h, w), 'pixel_embeddings' (B, h, w, D)
    and 'semantic_logits' (B, h, w, C) (either may carry the layer axis too; the final layer is used).
    Every layer gets the PQ-style terms (thing, stuff, all) and the mask-ID CE; instance discrimination and
    the auxiliary semantic loss apply to the final layer only. Matching: ``cfg.share_final_matching``.

    terms: the final layer's weighted terms (``TERMS``: 'loss_thing_class', 'loss_thing_mask',
    'loss_stuff_class', 'loss_stuff_mask', 'loss_pq_class', 'loss_pq_mask', 'loss_mask_id', 'loss_insdis',
    'loss_aux_semantic'), 'loss_aux_layers' (all weighted terms of layers 0 .. L-2) and 'num_targets' (valid
    targets in the batch). total = sum of the TERMS + loss_aux_layers. Weights: loss_thing_* = lambda_thing x
    term, loss_stuff_* = lambda_stuff x term, loss_pq_* = lambda_aux x pq_weight x term, loss_mask_id =
    lambda_aux x mask_id_weight x CE, loss_insdis = lambda_aux x insdis_weight x loss, loss_aux_semantic =
    lambda_aux x aux_semantic_weight x CE.
    """
    class_logits = outputs["class_logits"].astype(jnp.float32)
    mask_logits = outputs["mask_logits"].astype(jnp.float32)
    num_layers = class_logits.shape[0]
    t = _prepare(targets, mask_logits.shape[-2:])
    if cfg.share_final_matching:
        qi, mt = kmax_match(class_logits[-1], mask_logits[-1], t)
        query_index = jnp.broadcast_to(qi, (num_layers,) + qi.shape)
        matched = jnp.broadcast_to(mt, (num_layers,) + mt.shape)
        final = (class_logits[-1], mask_logits[-1])
    else:
        query_index, matched = jax.vmap(lambda c, m: kmax_match(c, m, t))(class_logits, mask_logits)
        final = None

    def layer(args):
        c, m, q, k = args
        return _layer_terms(c, m, t, q, k, final, cfg)

    per_layer = jax.lax.map(layer, (class_logits, mask_logits, query_index, matched))
    terms = {name: value[-1] for name, value in per_layer.items()}
    aux_layers = sum(jnp.sum(value[:-1]) for value in per_layer.values())
    insdis = instance_discrimination(
        _final(outputs["pixel_embeddings"], 4), t, rng, cfg.num_samples, cfg.temperature, cfg.sample_temperature
    )
    semantic = auxiliary_semantic_loss(_final(outputs["semantic_logits"], 4), t["semantic"], t.get("pixel_valid"))
    terms["loss_insdis"] = cfg.lambda_aux * cfg.insdis_weight * insdis
    terms["loss_aux_semantic"] = cfg.lambda_aux * cfg.aux_semantic_weight * semantic
    total = sum(terms[name] for name in TERMS) + aux_layers
    terms["loss_aux_layers"] = aux_layers
    terms["num_targets"] = jnp.sum(t["valid"].astype(jnp.float32))
    return total, terms
