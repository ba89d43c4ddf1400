"""Set-prediction losses for the detection and instance-segmentation heads (DETR / Mask2Former style).

Every decoder layer's prediction is matched to the targets on its own with the Hungarian algorithm
(`matching.py`) and gets the full loss (deep supervision, DETR §3.2 / Mask2Former §3.2): a sigmoid
classification loss over all queries (unmatched queries learn "no object" as an all-zero one-hot), box L1 +
GIoU on the matched pairs, and mask BCE + dice on the matched pairs, evaluated at K points per mask chosen
by uncertainty (Mask2Former / PointRend), so the memory does not grow with the image size. Matching compares
masks on one set of uniform random points per image shared by all (query, target) pairs, as Mask2Former's
matcher does.

Shapes (see the dense-task spec): outputs are stacked over L decoder layers,
  'class_logits' (L, B, Q, C), 'boxes' (L, B, Q, 4) normalised cxcywh, 'mask_logits' (L, B, Q, h, w);
targets are
  'classes' int32 (B, M) (-1 empty), 'boxes' (B, M, 4) normalised cxcywh, 'masks' (B, M, hm, wm) in {0, 1}
  (any resolution: masks are compared at normalised points, so hm x wm need not equal h x w), 'valid' (B, M).
Points are normalised (x, y) in [0, 1] over the canvas, with pixel centres at (j + 0.5) / W, the
``grid_sample(align_corners=False)`` convention of the reference code and the pipeline's cell-centre masks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import boxes as box_ops
from clusterformer_jax.tasks.dice import dice_loss
from clusterformer_jax.tasks.matching import hungarian_match

CLASS_LOSSES = ("focal", "bce", "softmax")
TERMS = ("loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")


@dataclasses.dataclass(frozen=True)
class SetLossConfig:
    """Loss and matching-cost weights of the set criterion.

    class_loss: 'focal' (default), 'bce' or 'softmax'. The paper says its detection head is "trained with a
      binary cross-entropy loss"; its compared detection baselines (Deformable DETR, DINO) use the sigmoid
      focal loss, which is that binary cross-entropy per class with the (1 - p_t)^gamma and alpha_t factors,
      and without them hundreds of background queries swamp the few matched ones. 'bce' is the plain variant.
      Both sum over queries and classes and divide by the number of targets (Deformable DETR). 'softmax' is
      Mask2Former's: C + 1 logits per query (the last one "no object"), cross-entropy with the no-object
      class weighted ``no_object_weight`` (0.1), averaged over the weights of all queries; matching cost
      -p(target class).
    class_weight 2.0, box_l1_weight 5.0, giou_weight 2.0: paper §4.1.2 (L1 5, GIoU 2) and DINO's class weight.
    mask_bce_weight 5.0, dice_weight 5.0, num_points 12544 (112^2), oversample_ratio 3.0,
      importance_ratio 0.75: Mask2Former.
    cost_*: matching-cost weights; None means the same as the loss weight (Deformable DETR / Mask2Former).
      The class cost is the focal-style pos - neg of the focal terms at the target class (for 'bce', the same
      difference of the plain terms, which is simply -logit).
    use_boxes / use_masks: False drops those costs and losses (use_masks=False: detection only).
    """

    class_loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    box_l1_weight: float = 5.0
    giou_weight: float = 2.0
    mask_bce_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75
    use_boxes: bool = True
    use_masks: bool = True
    cost_class_weight: float | None = None
    cost_box_l1_weight: float | None = None
    cost_giou_weight: float | None = None
    cost_mask_bce_weight: float | None = None
    cost_dice_weight: float | None = None

    def __post_init__(self):
        if self.class_loss not in CLASS_LOSSES:
            raise ConfigError(f"SetLossConfig.class_loss={self.class_loss!r}: use one of {CLASS_LOSSES}.")
        if self.num_points < 1:
            raise ConfigError(f"SetLossConfig.num_points={self.num_points}: use at least 1 point per mask.")
        if self.oversample_ratio < 1.0:
            raise ConfigError(f"SetLossConfig.oversample_ratio={self.oversample_ratio}: use a ratio >= 1.")
        if not 0.0 <= self.importance_ratio <= 1.0:
            raise ConfigError(f"SetLossConfig.importance_ratio={self.importance_ratio}: use a value in [0, 1].")

    @property
    def void_class(self) -> bool:
        """True when the class logits carry a last "no object" entry (softmax)."""
        return self.class_loss == "softmax"

    def cost_weight(self, name: str) -> float:
        """Matching-cost weight for 'class' | 'box_l1' | 'giou' | 'mask_bce' | 'dice'."""
        value = getattr(self, f"cost_{name}_weight")
        return getattr(self, f"{name}_weight") if value is None else value


# ------------------------------------------------------------------------------------------- point sampling


def _taps(points: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """(..., P, 2) normalised (x, y) -> flat indices (..., P, 4) of the four neighbours in an H x W map and
    their bilinear weights (..., P, 4), zero for neighbours outside the map (grid_sample's zero padding)."""
    x = points[..., 0] * w - 0.5
    y = points[..., 1] * h - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    xs = x0.astype(jnp.int32)[..., None] + jnp.array([0, 1, 0, 1], jnp.int32)
    ys = y0.astype(jnp.int32)[..., None] + jnp.array([0, 0, 1, 1], jnp.int32)
    weights = jnp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=-1)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    flat_index = jnp.clip(ys, 0, h - 1) * w + jnp.clip(xs, 0, w - 1)
    return flat_index, jnp.where(inside, weights, 0.0)


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear samples of (N, H, W) maps at (N, P, 2) normalised (x, y) points -> (N, P).

    Same values as torch ``grid_sample(maps[:, None], 2 * points[:, None] - 1, align_corners=False,
    padding_mode='zeros')``: pixel j's centre is at (j + 0.5) / W, and outside the map the samples blend in
    zeros (at x = 0 the value is half the first pixel). One gather of the four neighbours over the flattened
    map: simpler HLO than a vmapped 2-D gather, which matters for compile time.
    """
    n, h, w = maps.shape
    flat_index, weights = _taps(points, h, w)
    values = jnp.take_along_axis(maps.astype(jnp.float32).reshape(n, h * w), flat_index.reshape(n, -1), axis=1)
    return jnp.sum(values.reshape(flat_index.shape) * weights, axis=-1)


def _sample_shared(maps: jax.Array, points: jax.Array) -> jax.Array:
    """(B, N, H, W) maps, all N maps of an image at that image's (B, P, 2) points -> (B, N, P).

    The indices are computed once per image and not copied N times (N = Q queries in the matcher)."""
    b, n, h, w = maps.shape
    flat_index, weights = _taps(points, h, w)  # (B, P, 4)
    flat_maps = maps.astype(jnp.float32).reshape(b, n, h * w)
    values = jax.vmap(lambda m, i: jnp.take(m, i, axis=1))(flat_maps, flat_index.reshape(b, -1))
    return jnp.sum(values.reshape((b, n) + flat_index.shape[1:]) * weights[:, None], axis=-1)


def uncertain_points(
    rng: jax.Array, logits: jax.Array, num_points: int, oversample_ratio: float, importance_ratio: float
) -> jax.Array:
    """Mask2Former's get_uncertain_point_coords_with_randomness: (N, H, W) logits -> (N, num_points, 2).

    Draws num_points * oversample_ratio uniform points, keeps the importance_ratio * num_points whose
    logits are closest to 0 (uncertainty -|logit|), and fills up with fresh uniform points. No gradient.
    """
    logits = jax.lax.stop_gradient(logits)
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    k_over, k_random = jax.random.split(rng)
    coords = jax.random.uniform(k_over, (n, num_sampled, 2))
    uncertainty = -jnp.abs(point_sample(logits, coords))
    _, idx = jax.lax.top_k(uncertainty, num_uncertain)
    chosen = jnp.take_along_axis(coords, idx[..., None], axis=1)
    random = jax.random.uniform(k_random, (n, num_points - num_uncertain, 2))
    return jnp.concatenate([chosen, random], axis=1)


# ------------------------------------------------------------------------------------------------ matching


def _class_cost_table(logits: jax.Array, cfg: SetLossConfig) -> jax.Array:
    """(..., C) logits -> (..., C) cost of calling each class: pos - neg of the class-loss terms (softmax:
    -p over the C + 1 logits, the no-object column dropped)."""
    if cfg.class_loss == "softmax":
        return -jax.nn.softmax(logits, axis=-1)[..., :-1]
    if cfg.class_loss == "bce":
        return -logits  # -log p + log(1 - p)
    p = jax.nn.sigmoid(logits)
    pos = cfg.focal_alpha * (1.0 - p) ** cfg.focal_gamma * -jax.nn.log_sigmoid(logits)
    neg = (1.0 - cfg.focal_alpha) * p**cfg.focal_gamma * -jax.nn.log_sigmoid(-logits)
    return pos - neg


def match_costs(outputs: dict, targets: dict, points: jax.Array | None, cfg: SetLossConfig) -> jax.Array:
    """(B, Q, M) matching cost of one decoder layer's outputs (no layer axis); no gradient.

    class: focal-style cost at the target class; boxes: L1 of cxcywh + (-GIoU); masks: mean BCE and dice over
    ``points`` (B, P, 2), the same points for every (query, target) pair of an image (Mask2Former). Each term
    is scaled by its ``cfg.cost_weight``. Costs of padded targets are left as they are: ``hungarian_match``
    masks them.
    """
    outputs = jax.lax.stop_gradient(outputs)
    logits = outputs["class_logits"].astype(jnp.float32)
    table = _class_cost_table(logits, cfg)  # (B, Q, C)
    num_classes = table.shape[-1]
    tgt_cls = jnp.clip(targets["classes"], 0, num_classes - 1)  # (B, M)
    cost = cfg.cost_weight("class") * jnp.take_along_axis(table, tgt_cls[:, None, :], axis=2)
    if cfg.use_boxes:
        pred = outputs["boxes"].astype(jnp.float32)
        tgt = targets["boxes"].astype(jnp.float32)
        l1 = jnp.sum(jnp.abs(pred[:, :, None, :] - tgt[:, None, :, :]), -1)
        giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(tgt))
        cost = cost + cfg.cost_weight("box_l1") * l1 - cfg.cost_weight("giou") * giou
    if cfg.use_masks:
        pred = _sample_shared(outputs["mask_logits"], points)  # (B, Q, P)
        tgt = _sample_shared(targets["masks"], points)  # (B, M, P)
        num_p = points.shape[1]
        bce = (
            jnp.einsum("bqp,bmp->bqm", jax.nn.softplus(-pred), tgt)
            + jnp.einsum("bqp,bmp->bqm", jax.nn.softplus(pred), 1.0 - tgt)
        ) / num_p
        dice = dice_loss(jax.nn.sigmoid(pred), tgt, pairwise=True)
        cost = cost + cfg.cost_weight("mask_bce") * bce + cfg.cost_weight("dice") * dice
    return cost


# ----------------------------------------------------------------------------------------------- criterion


def _layer_losses(
    outputs: dict, targets: dict, query_index: jax.Array, matched: jax.Array, rng: jax.Array, norm, cfg
) -> dict[str, jax.Array]:
    """Weighted loss terms of one decoder layer given its matching; each term summed and divided by ``norm``."""
    logits = outputs["class_logits"].astype(jnp.float32)
    b, q, c = logits.shape
    # Per-query target class; slots without a match scatter out of range and are dropped.
    rows = jnp.arange(b)[:, None]
    slot_query = jnp.where(matched, query_index, q)
    query_class = jnp.full((b, q), -1, jnp.int32).at[rows, slot_query].set(targets["classes"], mode="drop")
    if cfg.class_loss == "softmax":  # Mask2Former: weighted mean of the cross-entropy over all queries
        labels = jnp.where(query_class < 0, c - 1, query_class)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], axis=-1)[..., 0]
        weights = jnp.where(query_class < 0, cfg.no_object_weight, 1.0)
        class_loss = jnp.sum(weights * nll) / jnp.sum(weights)
    else:
        onehot = jax.nn.one_hot(query_class, c, dtype=jnp.float32)  # -1 -> all zeros (background)
        if cfg.class_loss == "focal":
            alpha = cfg.focal_alpha if cfg.focal_alpha >= 0 else None  # alpha < 0: no alpha_t (Lin et al. 2017)
            elementwise = optax.losses.sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=cfg.focal_gamma)
        else:
            elementwise = optax.losses.sigmoid_binary_cross_entropy(logits, onehot)
        class_loss = jnp.sum(elementwise) / norm
    terms = {"loss_class": cfg.class_weight * class_loss}
    weight = matched.astype(jnp.float32)
    if cfg.use_boxes:
        pred = jnp.take_along_axis(outputs["boxes"].astype(jnp.float32), query_index[..., None], axis=1)
        tgt = targets["boxes"].astype(jnp.float32)
        l1 = jnp.sum(jnp.abs(pred - tgt), -1)
        giou = box_ops.elementwise_generalized_box_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(tgt))
        terms["loss_bbox"] = cfg.box_l1_weight * jnp.sum(weight * l1) / norm
        terms["loss_giou"] = cfg.giou_weight * jnp.sum(weight * (1.0 - giou)) / norm
    if cfg.use_masks:
        masks = outputs["mask_logits"].astype(jnp.float32)
        pred = jnp.take_along_axis(masks, query_index[:, :, None, None], axis=1)  # (B, M, h, w)
        m = query_index.shape[1]
        pred = pred.reshape((b * m,) + pred.shape[2:])
        tgt = targets["masks"].astype(jnp.float32)
        tgt = tgt.reshape((b * m,) + tgt.shape[2:])
        pts = uncertain_points(rng, pred, cfg.num_points, cfg.oversample_ratio, cfg.importance_ratio)
        point_logits = point_sample(pred, pts)
        point_labels = point_sample(tgt, pts)
        bce = jnp.mean(optax.losses.sigmoid_binary_cross_entropy(point_logits, point_labels), -1).reshape(b, m)
        dice = dice_loss(jax.nn.sigmoid(point_logits), point_labels).reshape(b, m)
        terms["loss_mask"] = cfg.mask_bce_weight * jnp.sum(weight * bce) / norm
        terms["loss_dice"] = cfg.dice_weight * jnp.sum(weight * dice) / norm
    return terms


def _check_inputs(outputs: dict, targets: dict, cfg: SetLossConfig) -> None:
    for key, where, flag in (
        ("boxes", "outputs", "use_boxes"),
        ("boxes", "targets", "use_boxes"),
        ("mask_logits", "outputs", "use_masks"),
        ("masks", "targets", "use_masks"),
    ):
        if getattr(cfg, flag) and key not in (outputs if where == "outputs" else targets):
            raise ConfigError(f"set_criterion: {where} lack {key!r} but SetLossConfig.{flag}=True; set it False.")


def _selected(outputs: dict, targets: dict, cfg: SetLossConfig) -> tuple[dict, dict]:
    """The outputs the config uses, and targets whose padded slots carry class -1."""
    _check_inputs(outputs, targets, cfg)
    keys = ("class_logits",) + (("boxes",) if cfg.use_boxes else ()) + (("mask_logits",) if cfg.use_masks else ())
    valid = targets["valid"].astype(bool)
    tgt = dict(targets, valid=valid, classes=jnp.where(valid, targets["classes"], -1).astype(jnp.int32))
    return {k: outputs[k] for k in keys}, tgt


def match_layers(outputs: dict, targets: dict, rng: jax.Array, cfg: SetLossConfig) -> tuple[jax.Array, jax.Array]:
    """Hungarian matching of every decoder layer: (query_index, matched), both (L, B, M).

    Each layer's (B, Q, M) cost (``match_costs``, masks compared at ``cfg.num_points`` uniform random points
    per image) is computed under ``lax.map``; the L * B assignment problems are solved in one vmapped call.
    """
    outputs, targets = _selected(outputs, targets, cfg)
    num_layers, batch, num_queries = outputs["class_logits"].shape[:3]

    def layer_cost(args):
        layer_outputs, key = args
        points = jax.random.uniform(key, (batch, cfg.num_points, 2)) if cfg.use_masks else None
        return match_costs(layer_outputs, targets, points, cfg)

    costs = jax.lax.map(layer_cost, (outputs, jax.random.split(rng, num_layers)))  # (L, B, Q, M)
    m = costs.shape[-1]
    flat_valid = jnp.broadcast_to(targets["valid"], (num_layers, batch, m)).reshape(num_layers * batch, m)
    query_index, matched = hungarian_match(costs.reshape(num_layers * batch, num_queries, m), flat_valid)
    return query_index.reshape(num_layers, batch, m), matched.reshape(num_layers, batch, m)


def set_criterion(
    outputs: dict, targets: dict, rng: jax.Array, cfg: SetLossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DETR / Mask2Former set loss with deep supervision: (total loss, terms).

    Each of the L layers is matched separately (Hungarian, on device) and its weighted terms summed; the
    total is the sum over all layers. ``terms`` holds the final layer's weighted terms ('loss_class', and
    'loss_bbox', 'loss_giou' with use_boxes, 'loss_mask', 'loss_dice' with use_masks), 'loss_aux' (the sum of
    all terms of layers 0 .. L-2) and 'num_targets' (valid targets in the batch).

    Normalisation: every term is divided by the number of valid targets over the whole global batch, clamped
    at >= 1 (DETR all-reduces this count across devices). Under jit with globally sharded arrays a plain
    ``jnp.sum(targets['valid'])`` is already that global count, so no collective is written here. An image
    without objects contributes only "no object" classification targets; the loss and its gradient stay
    finite.

    Cost: layer costs and losses run under ``lax.map`` (one layer's temporaries live at a time, one
    compilation for all layers); the L * B assignment problems are solved in one vmapped call.
    """
    outputs, tgt = _selected(outputs, targets, cfg)
    num_layers = outputs["class_logits"].shape[0]
    num_targets = jnp.sum(tgt["valid"].astype(jnp.float32))
    norm = jnp.maximum(num_targets, 1.0)
    k_match, k_loss = jax.random.split(rng)
    query_index, matched = match_layers(outputs, tgt, k_match, cfg)

    def layer_loss(args):
        layer_outputs, qi, mt, key = args
        return _layer_losses(layer_outputs, tgt, qi, mt, key, norm, cfg)

    per_layer = jax.lax.map(layer_loss, (outputs, query_index, matched, jax.random.split(k_loss, num_layers)))
    terms = {name: value[-1] for name, value in per_layer.items()}
    terms["loss_aux"] = sum(jnp.sum(value[:-1]) for value in per_layer.values())
    total = sum(terms[name] for name in per_layer) + terms["loss_aux"]
    terms["num_targets"] = num_targets
    return total, terms
