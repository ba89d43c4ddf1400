"""Box ops, on-device Hungarian matching and the DETR / Mask2Former set criterion, against hand-computed numbers
(plain numpy formulas written here) and scipy's linear_sum_assignment."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import linear_sum_assignment

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import boxes as box_ops
from clusterformer_jax.tasks import set_losses as sl
from clusterformer_jax.tasks.dice import dice_loss
from clusterformer_jax.tasks.matching import hungarian_match

# one worker runs this file: the jitted matcher and criterion are compiled once
pytestmark = pytest.mark.xdist_group("set_losses")


def _sig(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


# ------------------------------------------------------------------------------------------------------ boxes


@jax.jit
def _box_ops_on(cxcywh, yxyx, per_image, a, b):
    """Every box op of the two tests below in one compilation (op-by-op dispatch compiles each op alone)."""
    xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
    norm = box_ops.yxyx_pixels_to_cxcywh(yxyx, (40, 20))
    zero = jnp.zeros((1, 4))
    return {
        "xyxy": xyxy,
        "back": box_ops.xyxy_to_cxcywh(xyxy),
        "area": box_ops.box_area(xyxy),
        "norm": norm,
        "pixels": box_ops.cxcywh_to_yxyx_pixels(norm, (40, 20)),
        "per_image": box_ops.yxyx_pixels_to_cxcywh(jnp.stack([yxyx, yxyx]), per_image),
        "iou": box_ops.box_iou(a, b),
        "giou": box_ops.generalized_box_iou(a, b),
        "giou_pairs": box_ops.elementwise_generalized_box_iou(jnp.repeat(a, 3, 0), b),
        "giou_zero": box_ops.generalized_box_iou(zero, zero),
        "grad_zero": jax.grad(lambda p: box_ops.elementwise_generalized_box_iou(p, zero).sum())(a),
    }


@pytest.fixture(scope="module")
def box_results():
    cxcywh = np.array([[0.5, 0.25, 0.2, 0.1], [0.3, 0.6, 0.4, 0.8]], np.float32)
    # pipeline box around rows 2..5 (edges 2 and 6) and columns 0..19 of a 40 (H) x 20 (W) canvas
    yxyx = np.array([[2.0, 0.0, 6.0, 20.0]], np.float32)
    per_image = np.array([[[40.0, 20.0]], [[20.0, 40.0]]], np.float32)  # (B, 1, 2)
    a = np.array([[0.0, 0.0, 2.0, 2.0]], np.float32)
    b = np.array([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0]], np.float32)
    out = jax.tree_util.tree_map(np.asarray, _box_ops_on(cxcywh, yxyx, per_image, a, b))
    return out, cxcywh, yxyx


def test_box_conversions_round_trip_and_canvas_pixels(box_results):
    out, cxcywh, yxyx = box_results
    np.testing.assert_allclose(out["xyxy"], [[0.4, 0.2, 0.6, 0.3], [0.1, 0.2, 0.5, 1.0]], atol=1e-7)
    np.testing.assert_allclose(out["back"], cxcywh, atol=1e-7)
    np.testing.assert_allclose(out["area"], [0.02, 0.32], rtol=1e-5)
    np.testing.assert_allclose(out["norm"], [[0.5, 0.1, 1.0, 0.1]], atol=1e-7)
    np.testing.assert_allclose(out["pixels"], yxyx, atol=1e-5)
    np.testing.assert_allclose(out["per_image"][1], [[0.25, 0.2, 0.5, 0.2]], atol=1e-7)


def test_iou_and_giou_of_known_boxes(box_results):
    out = box_results[0]
    # a = [0,2]^2 against: overlap 1, union 7, enclosing 9 -> giou = 1/7 - 2/9; disjoint [3,4]x[0,1]: union 5,
    # enclosing 4 x 2 = 8 -> -3/8; itself -> 1
    np.testing.assert_allclose(out["iou"], [[1 / 7, 0.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(out["giou"], [[1 / 7 - 2 / 9, -3 / 8, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(out["giou_pairs"], [1 / 7 - 2 / 9, -3 / 8, 1.0], rtol=1e-6)
    # degenerate boxes (empty target slots are zeros): finite values and finite gradients
    assert out["giou_zero"][0, 0] == 0.0
    assert np.isfinite(out["grad_zero"]).all()


# --------------------------------------------------------------------------------------------------- matching


@pytest.fixture(scope="module")
def match_fn():
    return jax.jit(hungarian_match)


def _check_against_scipy(cost, valid, query_index, matched):
    for b in range(cost.shape[0]):
        real = np.nonzero(valid[b])[0]
        rows, cols = linear_sum_assignment(cost[b][:, real])
        expected = cost[b][:, real][rows, cols].sum()
        got_targets = np.nonzero(matched[b])[0]
        got_queries = query_index[b][got_targets]
        assert set(got_targets) <= set(real)
        assert len(got_targets) == min(cost.shape[1], len(real))  # as many real targets as possible
        assert len(set(got_queries.tolist())) == len(got_queries)  # one-to-one
        np.testing.assert_allclose(cost[b][got_queries, got_targets].sum(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_queries,num_targets", [(6, 4), (4, 6)])
def test_hungarian_matches_scipy_with_ties_padding_and_more_targets(match_fn, num_queries, num_targets):
    rng = np.random.default_rng(num_queries)
    batch = 16
    ints = rng.integers(0, 4, (batch // 2, num_queries, num_targets)).astype(np.float32)  # many ties
    floats = rng.normal(size=(batch // 2, num_queries, num_targets)).astype(np.float32) * 5
    cost = np.concatenate([ints, floats])
    valid = rng.random((batch, num_targets)) < 0.7
    valid[0] = True  # all real
    valid[1] = False  # empty image
    query_index, matched = map(np.asarray, match_fn(cost, valid))
    assert query_index.dtype == np.int32 and matched.dtype == bool
    assert not matched[1].any()
    _check_against_scipy(cost, valid, query_index, matched)


def test_hungarian_padding_cannot_displace_real_targets_and_nonfinite_costs(match_fn):
    # Q=4 < M=6: huge real costs would lose to cheap padded columns if padding were not masked.
    rng = np.random.default_rng(1)
    cost = rng.normal(size=(16, 4, 6)).astype(np.float32) * 1e3
    cost[:, :, 3:] = -1e6  # padded columns look cheapest
    valid = np.zeros((16, 6), bool)
    valid[:, :3] = True
    cost[2, 0, 0] = np.nan
    cost[3, 1, 1] = np.inf
    cost[3, 2, 2] = -np.inf
    query_index, matched = map(np.asarray, match_fn(cost, valid))
    assert matched[:, :3].all() and not matched[:, 3:].any()
    clean = np.where(np.isfinite(cost), cost, 1e9)
    _check_against_scipy(clean[4:], valid[4:], query_index[4:], matched[4:])
    assert query_index[2, 0] not in query_index[2, 1:3]  # the NaN row is avoided, result still one-to-one


# ------------------------------------------------------------------------------------------ elementwise losses


@jax.jit
def _elementwise(logits, targets, mask_logits, mask):
    return (
        optax.losses.sigmoid_binary_cross_entropy(logits, targets),
        optax.losses.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0),
        dice_loss(jax.nn.sigmoid(mask_logits), mask),
    )


def test_focal_bce_and_dice_hand_computed():
    logits = np.array([2.0, -1.0], np.float32)
    targets = np.array([1.0, 0.0], np.float32)
    # dice of a known mask: p = (0.5, 0.5, 1, 0), t = (1, 0, 1, 0): 1 - (2 * 1.5 + 1) / (2 + 2 + 1)
    mask_logits = np.array([[0.0, 0.0, 100.0, -100.0]], np.float32)
    mask = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
    bce, focal, dice = map(np.asarray, _elementwise(logits, targets, mask_logits, mask))
    p = _sig(logits)
    ce = np.array([-math.log(p[0]), -math.log(1 - p[1])])
    np.testing.assert_allclose(bce, ce, rtol=1e-6)
    expected = np.array([0.25 * (1 - p[0]) ** 2 * ce[0], 0.75 * p[1] ** 2 * ce[1]])
    np.testing.assert_allclose(focal, expected, rtol=1e-5)
    assert expected[0] == pytest.approx(0.25 * 0.1192029**2 * 0.1269280, rel=1e-5)
    np.testing.assert_allclose(dice, [1 - 4.0 / 5.0], rtol=1e-6)


def test_point_sample_pixel_centres_and_border():
    maps = np.arange(12, dtype=np.float32).reshape(1, 3, 4)  # H=3, W=4
    # pixel centres (x, y) = ((j + 0.5) / W, (i + 0.5) / H) -> that pixel: (i, j) = (2, 1) and (0, 3)
    centres = [[(1 + 0.5) / 4, (2 + 0.5) / 3], [(3 + 0.5) / 4, (0 + 0.5) / 3]]
    # x = 0 on row 1's centre: half pixel (1, 0), half zero padding; the corner (0, 0): a quarter of pixel (0, 0);
    # x = 0.25 (between columns 0 and 1) on row 0: the mean of pixels 0 and 1
    border = [[0.0, 1.5 / 3], [0.0, 0.0], [0.25, 0.5 / 3]]
    middle = [[2.0 / 4, 1.0 / 3]]  # between four centres: their mean
    points = np.array([centres + border + middle], np.float32)
    got = np.asarray(jax.jit(sl.point_sample)(maps, points))
    expected = [maps[0, 2, 1], maps[0, 0, 3], 0.5 * 4.0, 0.25 * 0.0, 0.5 * 0 + 0.5 * 1, (1 + 2 + 5 + 6) / 4]
    np.testing.assert_allclose(got, [expected], atol=1e-6)


def test_uncertain_points_prefer_logits_near_zero():
    logits = np.full((2, 8, 8), 20.0, np.float32)
    logits[:, :, :4] = 0.01  # left half is uncertain
    pts = np.asarray(
        jax.jit(sl.uncertain_points, static_argnums=(2, 3, 4))(jax.random.PRNGKey(0), logits, 40, 3.0, 0.75)
    )
    assert pts.shape == (2, 40, 2) and (pts >= 0).all() and (pts <= 1).all()
    assert (pts[:, :30, 0] < 0.5 + 1 / 16).all()  # the 30 importance points sit where |logit| is small
    assert (pts[:, 30:, 0] > 0.5).any()  # the 10 random ones cover the rest


def test_config_validation():
    with pytest.raises(ConfigError, match="class_loss"):
        sl.SetLossConfig(class_loss="hinge")
    with pytest.raises(ConfigError, match="importance_ratio"):
        sl.SetLossConfig(importance_ratio=1.5)
    cfg = sl.SetLossConfig(cost_giou_weight=7.0)
    assert cfg.cost_weight("giou") == 7.0 and cfg.cost_weight("box_l1") == 5.0
    with pytest.raises(ConfigError, match="use_masks"):
        outputs = {"class_logits": jnp.zeros((1, 1, 2, 3)), "boxes": jnp.zeros((1, 1, 2, 4))}
        sl.set_criterion(outputs, {"boxes": jnp.zeros((1, 2, 4))}, None, cfg)


def test_mask_matching_cost_on_pixel_centres():
    """Masks decide the matching; the cost equals numpy's BCE / dice on the sampled pixels."""
    h = w = 4
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    points = np.stack([xx.ravel(), yy.ravel()], -1)[None].astype(np.float32)  # every pixel centre once
    left = np.zeros((h, w), np.float32)
    left[:, :2] = 1
    pred = np.stack([4 * (1 - 2 * left), 3 * (2 * left - 1), np.zeros((h, w))])[None].astype(np.float32)
    tgt = np.stack([left, 1 - left])[None]
    outputs = {"class_logits": np.zeros((1, 3, 2), np.float32)}
    outputs["mask_logits"] = pred
    targets = {"classes": np.array([[0, 1]], np.int32), "masks": tgt}
    cfg = sl.SetLossConfig(use_boxes=False, class_weight=0.0, mask_bce_weight=2.0, dice_weight=3.0)
    cost, (query_index, matched) = jax.jit(
        lambda o, t, p: (lambda c: (c, hungarian_match(c, jnp.ones((1, 2), bool))))(sl.match_costs(o, t, p, cfg))
    )(outputs, targets, points)
    cost = np.asarray(cost)
    x = pred[0].reshape(3, -1).astype(np.float64)
    t = tgt[0].reshape(2, -1).astype(np.float64)
    p = _sig(x)
    expected = np.zeros((3, 2))
    for qi in range(3):
        for mi in range(2):
            bce = np.mean(-(t[mi] * np.log(p[qi]) + (1 - t[mi]) * np.log(1 - p[qi])))
            dice = 1 - (2 * np.sum(p[qi] * t[mi]) + 1) / (p[qi].sum() + t[mi].sum() + 1)
            expected[qi, mi] = 2.0 * bce + 3.0 * dice
    np.testing.assert_allclose(cost[0], expected, rtol=1e-5)
    assert np.asarray(matched).all() and np.asarray(query_index)[0].tolist() == [1, 0]


# --------------------------------------------------------------------------------------------------- criterion

TARGET_BOXES = np.array([[0.25, 0.25, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]], np.float32)


def _tiny_case():
    """L=2 layers, B=2 images (the second has no objects), Q=3 queries, C=2 classes, M=2 slots.

    Image 0: target 0 (class 1) is clearly query 2, target 1 (class 0) clearly query 0 in both layers.
    """
    class_logits = np.array(
        [
            [[[3.0, -2.0], [-1.0, -3.0], [-2.0, 2.5]], [[0.5, -1.0], [-2.0, 0.0], [-1.0, -1.5]]],
            [[[4.0, -3.0], [-2.0, -2.0], [-3.0, 3.5]], [[-1.0, -2.0], [-0.5, -2.5], [-4.0, -3.0]]],
        ],
        np.float32,
    )
    boxes = np.zeros((2, 2, 3, 4), np.float32)
    for layer, shift in ((0, 0.05), (1, 0.02)):
        boxes[layer, 0, 2] = TARGET_BOXES[0] + [shift, 0.0, 0.0, shift]
        boxes[layer, 0, 0] = TARGET_BOXES[1] + [0.0, -shift, shift, 0.0]
        boxes[layer, 0, 1] = [0.8, 0.15, 0.1, 0.1]
        boxes[layer, 1] = [[0.5, 0.5, 0.3, 0.3], [0.2, 0.8, 0.1, 0.2], [0.6, 0.4, 0.5, 0.5]]
    outputs = {"class_logits": class_logits, "boxes": boxes, "mask_logits": np.zeros((2, 2, 3, 4, 4), np.float32)}
    targets = {
        "classes": np.array([[1, 0], [-1, -1]], np.int32),
        "boxes": np.stack([TARGET_BOXES, np.zeros((2, 4), np.float32)]),
        "masks": np.zeros((2, 2, 8, 8), np.float32),
        "valid": np.array([[True, True], [False, False]]),
    }
    return outputs, targets


def _numpy_layer_loss(class_logits, boxes, num_points):
    """Hand-summed weighted loss of one layer of the tiny case; matching q2 -> t0, q0 -> t1; 2 targets."""
    onehot = np.zeros((2, 3, 2))
    onehot[0, 2, 1] = 1
    onehot[0, 0, 0] = 1
    p = _sig(class_logits)
    ce = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
    p_t = p * onehot + (1 - p) * (1 - onehot)
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * (1 - p_t) ** 2 * ce
    out = {"loss_class": 2.0 * focal.sum() / 2}
    l1 = giou_loss = 0.0
    for q, t in ((2, 0), (0, 1)):
        pb, tb = boxes[0, q].astype(np.float64), TARGET_BOXES[t].astype(np.float64)
        l1 += np.abs(pb - tb).sum()
        p0, p1 = pb[:2] - pb[2:] / 2, pb[:2] + pb[2:] / 2
        t0, t1 = tb[:2] - tb[2:] / 2, tb[:2] + tb[2:] / 2
        inter = np.prod(np.clip(np.minimum(p1, t1) - np.maximum(p0, t0), 0, None))
        union = np.prod(pb[2:]) + np.prod(tb[2:]) - inter
        hull = np.prod(np.maximum(p1, t1) - np.minimum(p0, t0))
        giou_loss += 1 - (inter / union - (hull - union) / hull)
    out["loss_bbox"] = 5.0 * l1 / 2
    out["loss_giou"] = 2.0 * giou_loss / 2
    # zero mask logits: BCE is log 2 at every point whatever the label; all-zero targets: dice 1 - 1/(P/2 + 1)
    out["loss_mask"] = 5.0 * 2 * math.log(2) / 2
    out["loss_dice"] = 5.0 * 2 * (1 - 1 / (num_points / 2 + 1)) / 2
    return out


@pytest.fixture(scope="module")
def criterion():
    cfg = sl.SetLossConfig(num_points=16)

    def loss(outputs, targets, rng):
        return sl.set_criterion(outputs, targets, rng, cfg)

    return cfg, jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_criterion_hand_summed_with_deep_supervision(criterion):
    cfg, fn = criterion
    outputs, targets = _tiny_case()
    (total, terms), grads = fn(outputs, targets, jax.random.PRNGKey(0))
    final = _numpy_layer_loss(outputs["class_logits"][1], outputs["boxes"][1], cfg.num_points)
    aux = _numpy_layer_loss(outputs["class_logits"][0], outputs["boxes"][0], cfg.num_points)
    for name, value in final.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(terms["loss_aux"], sum(aux.values()), rtol=1e-5)
    np.testing.assert_allclose(total, sum(final.values()) + sum(aux.values()), rtol=1e-5)
    assert float(terms["num_targets"]) == 2.0
    for g in jax.tree_util.tree_leaves(grads):
        assert np.isfinite(np.asarray(g)).all()
    # unmatched queries get no box gradient; the empty image's boxes none at all
    assert np.abs(grads["boxes"][:, 0, 1]).max() == 0 and np.abs(grads["boxes"][:, 1]).max() == 0
    assert np.abs(grads["boxes"][:, 0, 2]).min() > 0
    # mask losses reach the matched queries' masks only
    assert np.abs(grads["mask_logits"][:, 0, 1]).max() == 0 and np.abs(grads["mask_logits"][:, 1]).max() == 0
    assert np.abs(grads["mask_logits"][:, 0, (0, 2)]).sum(axis=(2, 3)).min() > 0


def test_criterion_on_images_without_objects_is_finite(criterion):
    cfg, fn = criterion
    outputs, targets = _tiny_case()
    targets["valid"][:] = False
    targets["classes"][:] = -1
    (total, terms), grads = fn(outputs, targets, jax.random.PRNGKey(1))
    assert float(terms["num_targets"]) == 0.0
    # only "no object" classification: focal on all-zero one-hots, normalised by max(0, 1) = 1
    p = _sig(outputs["class_logits"])
    background = (0.75 * p**2 * -np.log(1 - p)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(total, 2.0 * background.sum(), rtol=1e-5)
    for name in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert float(terms[name]) == 0.0
    for g in jax.tree_util.tree_leaves(grads):
        assert np.isfinite(np.asarray(g)).all()


def test_criterion_detection_only_and_masks_only():
    outputs, targets = _tiny_case()
    det_cfg = sl.SetLossConfig(use_masks=False, class_loss="bce")
    mask_cfg = sl.SetLossConfig(use_boxes=False, num_points=8)
    det_outputs = {k: v for k, v in outputs.items() if k != "mask_logits"}
    det_targets = {k: v for k, v in targets.items() if k != "masks"}

    @jax.jit
    def both(rng):
        return (
            sl.set_criterion(det_outputs, det_targets, rng, det_cfg)[1],
            sl.set_criterion(outputs, targets, rng, mask_cfg)[1],
        )

    det, masks_only = both(jax.random.PRNGKey(2))
    assert set(det) == {"loss_class", "loss_bbox", "loss_giou", "loss_aux", "num_targets"}
    assert set(masks_only) == {"loss_class", "loss_mask", "loss_dice", "loss_aux", "num_targets"}
    final = _numpy_layer_loss(outputs["class_logits"][1], outputs["boxes"][1], 8)
    np.testing.assert_allclose(det["loss_bbox"], final["loss_bbox"], rtol=1e-5)
    np.testing.assert_allclose(det["loss_giou"], final["loss_giou"], rtol=1e-5)
    x = outputs["class_logits"][1].astype(np.float64)
    onehot = np.zeros_like(x)
    onehot[0, 2, 1] = onehot[0, 0, 0] = 1
    bce = (np.logaddexp(0, x) - x * onehot).sum()
    np.testing.assert_allclose(det["loss_class"], 2.0 * bce / 2, rtol=1e-5)
    for name in ("loss_class", "loss_mask", "loss_dice"):
        np.testing.assert_allclose(masks_only[name], final[name], rtol=1e-5, err_msg=name)


def test_softmax_class_loss_with_void_class_hand_computed():
    """Mask2Former's class loss: C + 1 logits, cross-entropy with the no-object class weighted 0.1, averaged over
    the weights of all queries; the matching (boxes dominate) is the tiny case's q2 -> t0, q0 -> t1."""
    outputs, targets = _tiny_case()
    void = np.array([[[-1.0, 0.5, 0.0], [2.0, 1.0, -1.0]], [[0.0, 1.5, -0.5], [0.3, 0.2, 0.1]]], np.float32)
    logits = np.concatenate([outputs["class_logits"], void[..., None]], axis=-1)  # (L, B, Q, 3)
    outputs = {"class_logits": logits, "boxes": outputs["boxes"]}
    targets = {k: v for k, v in targets.items() if k != "masks"}
    cfg = sl.SetLossConfig(use_masks=False, class_loss="softmax")
    assert cfg.void_class
    _, terms = jax.jit(lambda o, t: sl.set_criterion(o, t, jax.random.PRNGKey(0), cfg))(outputs, targets)

    def expected(layer):
        x = logits[layer].astype(np.float64)
        log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
        labels = np.array([[0, 2, 1], [2, 2, 2]])  # image 0: q0 -> class 0, q2 -> class 1; the rest no-object
        weights = np.where(labels == 2, 0.1, 1.0)
        nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
        return 2.0 * (weights * nll).sum() / weights.sum()

    np.testing.assert_allclose(terms["loss_class"], expected(1), rtol=1e-5)
    aux = _numpy_layer_loss(outputs["class_logits"][0][..., :2], outputs["boxes"][0], 8)
    np.testing.assert_allclose(terms["loss_aux"], expected(0) + aux["loss_bbox"] + aux["loss_giou"], rtol=1e-5)
    # matching cost: -p(target class) over the 3-way softmax
    costs = sl.match_costs(
        {"class_logits": jnp.asarray(logits[1])}, targets, None, dataclasses.replace(cfg, use_boxes=False)
    )
    p = np.exp(logits[1]) / np.exp(logits[1]).sum(-1, keepdims=True)
    np.testing.assert_allclose(costs[0], 2.0 * -p[0][:, [1, 0]], rtol=1e-5)
