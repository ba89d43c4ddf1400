"""kMaX-DeepLab panoptic losses and the paper's Eq. 7 criterion, against closed-form values worked out by hand
and plain numpy formulas written here; the matcher against brute force over all assignments."""

import dataclasses
import itertools
import math

import jax
import numpy as np
import pytest

from clusterformer_jax.tasks import panoptic_losses as pl

pytestmark = pytest.mark.xdist_group("panoptic_losses")

CFG = pl.PanopticLossConfig()


def _softmax(x, axis):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _quadrant_targets(batch=1):
    """4 x 4 grid: target 0 (class 0, thing) top-left 2 x 2, target 1 (class 1, stuff) right half, void the
    bottom-left 2 x 2."""
    masks = np.zeros((batch, 2, 4, 4), np.float32)
    masks[:, 0, :2, :2] = 1
    masks[:, 1, :, 2:] = 1
    semantic = np.full((batch, 4, 4), 255, np.int32)
    semantic[:, :2, :2] = 0
    semantic[:, :, 2:] = 1
    return {
        "classes": np.tile(np.array([[0, 1]], np.int32), (batch, 1)),
        "masks": masks,
        "valid": np.ones((batch, 2), bool),
        "is_thing": np.tile(np.array([[True, False]]), (batch, 1)),
        "semantic": semantic,
        "pixel_valid": np.ones((batch, 4, 4), bool),
    }


def _random_case(seed, batch=2, n=3, c=2, d=5):
    rng = np.random.default_rng(seed)
    t = _quadrant_targets(batch)
    t["masks"][1] = 0  # image 1: a thing in the bottom row, a stuff segment on the top-right 3 x 3, rest void
    t["masks"][1, 0, 3, :] = 1
    t["masks"][1, 1, :3, 1:] = 1
    t["classes"][1] = [1, 0]
    t["semantic"][1] = 255
    t["semantic"][1][t["masks"][1, 0] > 0] = 1
    t["semantic"][1][t["masks"][1, 1] > 0] = 0
    out = {
        "class_logits": rng.normal(size=(batch, n, c + 1)).astype(np.float32) * 2,
        "mask_logits": rng.normal(size=(batch, n, 4, 4)).astype(np.float32) * 2,
        "pixel_embeddings": rng.normal(size=(batch, 4, 4, d)).astype(np.float32),
        "semantic_logits": rng.normal(size=(batch, 4, 4, c)).astype(np.float32),
    }
    return out, t


# ------------------------------------------------------------------------------------------ numpy references


def _np_similarity(class_logits, mask_logits, t, b):
    labelled = (t["masks"][b] * t["valid"][b][:, None, None]).sum(0) > 0
    zp = _softmax(mask_logits[b], 0) * labelled
    cp = _softmax(class_logits[b], -1)
    n, m = zp.shape[0], t["masks"].shape[1]
    sim = np.zeros((n, m))
    dice = np.zeros((n, m))
    for i, j in itertools.product(range(n), range(m)):
        tm = t["masks"][b, j]
        dice[i, j] = (zp[i] * tm).sum() / ((zp[i].sum() + tm.sum()) / 2 + 1e-5)
        sim[i, j] = cp[i, max(t["classes"][b, j], 0)] * dice[i, j]
    return sim, dice


def _np_pq(class_logits, mask_logits, t, qi, matched, which, weight_logits=None):
    """kMaX's PQ-style (class term, mask term), one query at a time."""
    wc, wm = (class_logits, mask_logits) if weight_logits is None else weight_logits
    batch, n, c1 = class_logits.shape
    cls_terms, mask_terms = [], []
    for b in range(batch):
        labelled = (t["masks"][b] * t["valid"][b][:, None, None]).sum(0) > 0
        zp = _softmax(mask_logits[b], 0) * labelled
        cp = _softmax(class_logits[b], -1)
        wprob = _softmax(wm[b], 0)
        _, wdice = _np_similarity(wc, wm, t, b)
        wcp = _softmax(wc[b], -1)
        owner = {int(qi[b, m]): m for m in range(qi.shape[1]) if matched[b, m]}
        cls_sum = mask_sum = count = 0.0
        for q in range(n):
            if q in owner:
                m = owner[q]
                label, alpha, tm = t["classes"][b, m], 0.75, t["masks"][b, m]
                cw, mw = max(wdice[q, m], 1e-5), max(wcp[q, label], 1e-5)
                inc = {"all": True, "thing": t["is_thing"][b, m], "stuff": not t["is_thing"][b, m]}[which]
            else:
                label, alpha, tm = c1 - 1, 0.25, np.zeros((4, 4))
                cw = max((wprob[q] * ~labelled).sum() / (wprob[q].sum() + 1e-5), 1e-5)
                mw, inc = 0.0, which != "stuff"
            if not inc:
                continue
            count += 1
            cls_sum += alpha * cw * -math.log(cp[q, label])
            mask_sum += mw * (1 - (2 * (zp[q] * tm).sum() + 1) / (zp[q].sum() + tm.sum() + 1))
        cls_terms.append(cls_sum / max(count, 1))
        mask_terms.append(mask_sum * 0.75 / n)
    return np.mean(cls_terms), np.mean(mask_terms)


def _np_mask_id(mask_logits, t, qi, matched):
    out = []
    for b in range(mask_logits.shape[0]):
        logp = np.log(_softmax(mask_logits[b], 0))
        total, count = 0.0, 0
        for y, x in itertools.product(range(4), range(4)):
            owners = [m for m in range(qi.shape[1]) if matched[b, m] and t["masks"][b, m, y, x] > 0]
            if owners:
                total -= logp[qi[b, owners[0]], y, x]
                count += 1
        out.append(total / max(count, 1))
    return np.mean(out)


def _np_insdis(emb, t, tau=0.3):
    """All labelled pixels sampled (K >= h * w): the loss no longer depends on the sampling."""
    out = []
    for b in range(emb.shape[0]):
        seg = t["masks"][b].reshape(t["masks"].shape[1], -1)
        idx = np.nonzero(seg.sum(0) > 0)[0]
        e = emb[b].reshape(16, -1)[idx].astype(np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        same = seg[:, idx].T @ seg[:, idx]
        target = same / same.sum(1, keepdims=True)
        logp = np.log(_softmax(e @ e.T / tau, 1))
        out.append(np.mean(-(target * logp).sum(1)) if len(idx) else 0.0)
    return np.mean(out)


def _np_semantic(logits, semantic):
    out = []
    for b in range(logits.shape[0]):
        logp = np.log(_softmax(logits[b], -1))
        keep = semantic[b] != 255
        vals = [-logp[y, x, semantic[b, y, x]] for y, x in zip(*np.nonzero(keep))]
        out.append(np.mean(vals) if vals else 0.0)
    return np.mean(out)


# ------------------------------------------------------------------------------------------------ the terms


@jax.jit
def _all_terms(out, t, qi, matched, rng):
    """Every term of one layer in one compilation."""
    res = {"match": pl.kmax_match(out["class_logits"], out["mask_logits"], t)}
    for which in ("all", "thing", "stuff"):
        res[which] = pl.pq_style_loss(out["class_logits"], out["mask_logits"], t, qi, matched, which=which)
    res["mask_id"] = pl.mask_id_cross_entropy(out["mask_logits"], t, qi, matched)
    res["insdis"] = pl.instance_discrimination(out["pixel_embeddings"], t, rng)
    res["semantic"] = pl.auxiliary_semantic_loss(out["semantic_logits"], t["semantic"])
    probs = pl.query_mask_probs(out["mask_logits"], t)
    res["similarity"] = pl.pq_similarity(jax.nn.softmax(out["class_logits"], -1), probs, t)
    return res


def test_every_term_on_a_case_worked_out_by_hand():
    """Zero logits everywhere, N = 3 queries, C = 2 classes: every query's mask softmax is 1/3 on each pixel,
    every class probability 1/3. Thing target 4 px, stuff target 8 px, 4 void px; queries 0, 1 matched to
    targets 0, 1; query 2 unmatched."""
    t = _quadrant_targets(2)  # two equal images: the shapes of the random case, so one compilation
    out = {
        "class_logits": np.zeros((2, 3, 3), np.float32),
        "mask_logits": np.zeros((2, 3, 4, 4), np.float32),
        "pixel_embeddings": np.ones((2, 4, 4, 5), np.float32),
        "semantic_logits": np.zeros((2, 4, 4, 2), np.float32),
    }
    qi, matched = np.array([[0, 1]] * 2, np.int32), np.ones((2, 2), bool)
    res = jax.tree_util.tree_map(np.asarray, _all_terms(out, t, qi, matched, jax.random.PRNGKey(0)))
    log3 = math.log(3)
    # matcher dice: query mass 12 / 3 = 4 on labelled px; target 0: (4/3) / ((4 + 4) / 2) = 1/3, target 1:
    # (8/3) / ((4 + 8) / 2) = 4/9; times class probability 1/3
    np.testing.assert_allclose(res["similarity"], [[[1 / 9, 4 / 27]] * 3] * 2, rtol=1e-4)
    # class CE log 3 each; weights 0.75 * 1/3, 0.75 * 4/9, and 0.25 * (void mass 4/3 over 16/3 = 1/4)
    w = [0.75 / 3, 0.75 * 4 / 9, 0.25 / 4]
    np.testing.assert_allclose(res["all"][0], sum(w) * log3 / 3, rtol=1e-4)
    np.testing.assert_allclose(res["thing"][0], (w[0] + w[2]) * log3 / 2, rtol=1e-4)
    np.testing.assert_allclose(res["stuff"][0], w[1] * log3, rtol=1e-4)
    # dice with smoothing 1: 1 - (2 * 4/3 + 1) / (4 + 4 + 1) = 16/27, 1 - (2 * 8/3 + 1) / (4 + 8 + 1) = 20/39;
    # weight class probability 1/3; x 0.75 / N
    d0, d1 = 16 / 27, 20 / 39
    np.testing.assert_allclose(res["all"][1], (d0 + d1) / 3 * 0.75 / 3, rtol=1e-5)
    np.testing.assert_allclose(res["thing"][1], d0 / 3 * 0.25, rtol=1e-5)
    np.testing.assert_allclose(res["stuff"][1], d1 / 3 * 0.25, rtol=1e-5)
    np.testing.assert_allclose(res["mask_id"], log3, rtol=1e-6)  # uniform over 3 queries on 12 labelled px
    np.testing.assert_allclose(res["semantic"], math.log(2), rtol=1e-6)
    # equal embeddings: uniform softmax over the 12 labelled samples, targets 1/4 or 1/8 -> log 12 per row
    np.testing.assert_allclose(res["insdis"], math.log(12), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_terms_match_numpy_on_random_logits(seed):
    out, t = _random_case(seed)
    qi = np.array([[2, 0], [1, 2]], np.int32)
    matched = np.array([[True, True], [True, False]])  # image 1: target 1 left without a query
    res = jax.tree_util.tree_map(np.asarray, _all_terms(out, t, qi, matched, jax.random.PRNGKey(seed)))
    for which in ("all", "thing", "stuff"):
        expected = _np_pq(out["class_logits"], out["mask_logits"], t, qi, matched, which)
        np.testing.assert_allclose(res[which], expected, rtol=1e-4, atol=1e-7, err_msg=which)
    np.testing.assert_allclose(res["mask_id"], _np_mask_id(out["mask_logits"], t, qi, matched), rtol=1e-5)
    np.testing.assert_allclose(res["insdis"], _np_insdis(out["pixel_embeddings"], t), rtol=1e-5)
    np.testing.assert_allclose(res["semantic"], _np_semantic(out["semantic_logits"], t["semantic"]), rtol=1e-5)
    for b in range(2):
        sim, _ = _np_similarity(out["class_logits"], out["mask_logits"], t, b)
        np.testing.assert_allclose(res["similarity"][b], sim, rtol=1e-4, atol=1e-7)


def test_matching_maximises_similarity_like_brute_force():
    match = jax.jit(pl.kmax_match)
    for seed in range(6):
        out, t = _random_case(seed + 10)
        t["valid"][1, 1] = seed % 2 == 0  # every other case pads image 1's second slot
        qi, matched = map(np.asarray, match(out["class_logits"], out["mask_logits"], t))
        for b in range(2):
            sim, _ = _np_similarity(out["class_logits"], out["mask_logits"], t, b)
            real = np.nonzero(t["valid"][b])[0]
            best = max(
                sum(sim[q, m] for q, m in zip(perm, real)) for perm in itertools.permutations(range(3), len(real))
            )
            assert list(np.nonzero(matched[b])[0]) == list(real)
            assert len(set(qi[b][real].tolist())) == len(real)
            np.testing.assert_allclose(sum(sim[qi[b, m], m] for m in real), best, rtol=1e-5)


def test_gumbel_sampling_never_draws_void_and_favours_small_segments():
    masks = np.zeros((1, 2, 4, 4), np.float32)
    masks[0, 0, 0, 0] = 1  # a one-pixel segment
    masks[0, 1, 1:, :] = 1  # 12 px; 3 void px in the top row
    t = pl._prepare({"classes": np.array([[0, 1]]), "masks": masks, "valid": np.ones((1, 2), bool)}, (4, 4))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    idx, keep = jax.jit(jax.vmap(lambda k: pl.sample_pixels(k, t, 4)))(keys)
    idx, keep = np.asarray(idx)[:, 0], np.asarray(keep)[:, 0]
    assert keep.all() and not np.isin(idx, [1, 2, 3]).any()
    assert (idx == 0).any(axis=1).mean() > 0.9  # uniform sampling would take it 4 / 13 of the time
    idx, keep = jax.jit(lambda k: pl.sample_pixels(k, t, 4096))(keys[0])  # more than labelled pixels: void marked
    assert idx.shape == (1, 16) and int(np.asarray(keep).sum()) == 13


# ------------------------------------------------------------------------------------------------ criterion


def _stack(out, layers):
    """Deep-supervision outputs: layer 0 a perturbed copy of the final layer."""
    first = {k: out[k] * 0.5 + 0.3 for k in ("class_logits", "mask_logits")}
    res = {k: np.stack([first[k], out[k]]) for k in first} if layers == 2 else {k: out[k][None] for k in first}
    return dict(res, pixel_embeddings=out["pixel_embeddings"], semantic_logits=out["semantic_logits"])


@pytest.fixture(scope="module")
def criterion_results():
    out, t = _random_case(3)
    outputs = _stack(out, 2)
    rng = jax.random.PRNGKey(7)
    cfgs = {
        "shared": CFG,
        "per_layer": dataclasses.replace(CFG, share_final_matching=False),
        "scaled": dataclasses.replace(CFG, lambda_thing=1.0, lambda_stuff=0.0, lambda_aux=2.0, mask_id_weight=1.0),
    }
    fn = jax.jit(lambda o, tt, r: {k: pl.panoptic_criterion(o, tt, r, cfg) for k, cfg in cfgs.items()})
    runs = jax.tree_util.tree_map(np.asarray, fn(outputs, t, rng))
    return out, t, outputs, rng, runs


def _expected_layer(c, m, t, qi, mt, weight_logits):
    th = _np_pq(c, m, t, qi, mt, "thing", weight_logits)
    st = _np_pq(c, m, t, qi, mt, "stuff", weight_logits)
    al = _np_pq(c, m, t, qi, mt, "all", weight_logits)
    return {
        "loss_thing_class": 5 * th[0],
        "loss_thing_mask": 5 * th[1],
        "loss_stuff_class": 3 * st[0],
        "loss_stuff_mask": 3 * st[1],
        "loss_pq_class": 3 * al[0],
        "loss_pq_mask": 3 * al[1],
        "loss_mask_id": 0.3 * _np_mask_id(m, t, qi, mt),
    }


@pytest.mark.parametrize("share", [True, False])
def test_criterion_total_is_the_hand_weighted_sum(criterion_results, share):
    out, t, outputs, rng, runs = criterion_results
    total, terms = runs["shared" if share else "per_layer"]
    assert set(terms) == set(pl.TERMS) | {"loss_aux_layers", "num_targets"}
    match = jax.jit(pl.kmax_match)
    final_qi, final_mt = map(np.asarray, match(out["class_logits"], out["mask_logits"], t))
    final = (outputs["class_logits"][1], outputs["mask_logits"][1])
    expected = _expected_layer(*final, t, final_qi, final_mt, None)
    expected["loss_insdis"] = 1.0 * _np_insdis(out["pixel_embeddings"], t)
    expected["loss_aux_semantic"] = 1.0 * _np_semantic(out["semantic_logits"], t["semantic"])
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-4, atol=1e-7, err_msg=name)
    c0, m0 = outputs["class_logits"][0], outputs["mask_logits"][0]
    if share:  # layer 0 takes the final layer's matching and weights
        layer0 = _expected_layer(c0, m0, t, final_qi, final_mt, final)
    else:
        qi0, mt0 = map(np.asarray, match(c0, m0, t))
        layer0 = _expected_layer(c0, m0, t, qi0, mt0, None)
    np.testing.assert_allclose(terms["loss_aux_layers"], sum(layer0.values()), rtol=1e-4)
    np.testing.assert_allclose(total, sum(expected.values()) + sum(layer0.values()), rtol=1e-4)
    assert terms["num_targets"] == 4


def test_weights_are_config_fields_and_scale_their_terms(criterion_results):
    out, t, outputs, rng, runs = criterion_results
    terms = runs["scaled"][1]
    base = runs["shared"][1]
    np.testing.assert_allclose(terms["loss_thing_class"], base["loss_thing_class"] / 5, rtol=1e-5)
    assert float(terms["loss_stuff_mask"]) == 0.0
    np.testing.assert_allclose(terms["loss_mask_id"], base["loss_mask_id"] / 0.3 * 2, rtol=1e-5)
    np.testing.assert_allclose(terms["loss_insdis"], base["loss_insdis"] * 2, rtol=1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.lambda_thing = 1.0


def test_empty_image_gives_finite_loss_and_gradients():
    """Two batches in one vmapped compilation: image 1 without segments, and both images without."""
    out, t = _random_case(5)
    t["valid"][1] = False  # image 1 has no segments at all: every pixel void
    t["classes"][1] = -1
    t["semantic"][1] = 255
    both = {k: np.stack([v, v[[1, 1]]]) for k, v in t.items()}
    outputs = _stack(out, 2)
    outputs["pixel_embeddings"] = outputs["pixel_embeddings"] * 0.0  # zero embeddings: no 0 / 0 either
    outputs = {k: np.stack([v, v]) for k, v in outputs.items()}

    def loss(o, tt):
        return pl.panoptic_criterion(o, tt, jax.random.PRNGKey(1), CFG)

    (total, terms), grads = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True)))(outputs, both)
    assert np.isfinite(np.asarray(total)).all() and all(np.isfinite(np.asarray(v)).all() for v in terms.values())
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    # the all-empty batch: only the void class term of every query is left
    assert float(terms["num_targets"][1]) == 0
    for name in ("loss_stuff_class", "loss_pq_mask", "loss_mask_id", "loss_insdis", "loss_aux_semantic"):
        assert float(terms[name][1]) == 0.0, name
    assert float(terms["loss_thing_class"][1]) > 0 and float(terms["loss_pq_class"][1]) > 0
