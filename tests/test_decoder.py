"""The cluster decoder and DenseModel: backbone parameter trees shared with the classifiers, output contract,
the E/M steps on hand-computed numbers, padding invariance, shared EM weights, scan == unrolled loop, the
five query initialisations (Table 6f), odd-sized and non-square maps.

Parameters come from ``eval_shape`` + random values (no compiled init); only small modules are compiled.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models import registry
from clusterformer_jax.models.decoder import (
    ClusterDecoder,
    ClusterDecoderLayer,
    ClusterEMStep,
    DecoderConfig,
    decoder_fields,
    mask_boxes,
)
from clusterformer_jax.models import em
from clusterformer_jax.models.dense_model import DenseModel
from clusterformer_jax.models.pixel_decoder import PixelDecoder, mask_to_grid
from clusterformer_jax.models.queries import QUERY_INITS, QueryInit, pool_centers, query_grid

TINY_CF = dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), num_heads=(1, 1, 1, 1), head_dim=16, centers=(2, 2))
TINY_COC = dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), num_heads=(1, 1, 1, 1), head_dim=16, folds=(1, 1, 1, 1))
CFG = DecoderConfig(dim=32, num_queries=8, num_layers=2, layer_strides=(32, 8), num_heads=4, ffn_dim=64)


def random_like(tree, seed=0, scale=0.3):
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(scale * rng.randn(*a.shape), a.dtype), tree)


def abstract_params(module, *args):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]


def shapes(tree):
    return {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def fake_feats(batch=2, h=48, w=64, seed=0, centers=6):
    """Backbone-like outputs: 4 stage maps at strides 4..32 (odd 2x2 last map at 48x64) and centers."""
    rng = np.random.RandomState(seed)
    stages = [
        jnp.asarray(rng.randn(batch, -(-h // s), -(-w // s), c), jnp.float32)
        for s, c in ((4, 8), (8, 12), (16, 16), (32, 24))
    ]
    return {"stages": stages, "centers": jnp.asarray(rng.randn(batch, centers, 20), jnp.float32)}


# ----------------------------------------------------------------------------- registry / config


@pytest.mark.parametrize("name,overrides", [("clusterformer_nano", TINY_CF), ("coc_tiny_plain", TINY_COC)])
def test_dense_backbone_params_equal_classifier_backbone(name, overrides):
    images = jnp.zeros((1, 32, 32, 3))
    classifier = abstract_params(registry.create_model(name, **overrides), images)
    dense = abstract_params(DenseModel(registry.create_backbone(name, **overrides), CFG, num_classes=3), images)
    assert set(dense) == {"backbone", "decoder"}
    assert shapes(dense["backbone"]) == shapes(classifier["backbone"])
    assert registry.backbone_fields(name) >= set(overrides) and "num_classes" not in registry.backbone_fields(name)


def test_create_backbone_errors():
    with pytest.raises(ModelConfigError, match="'widths' is not a field"):
        registry.create_backbone("clusterformer_nano", widths=(1, 2))
    with pytest.raises(ModelConfigError, match="'num_classes' is a classifier-only field"):
        registry.create_backbone("paca_tiny", num_classes=3)
    with pytest.raises(ModelConfigError, match="'head' is a classifier-only"):
        registry.create_backbone("clusterformer_tiny", head="official_neck")
    assert registry.create_backbone("gmf_miny", dtype="bfloat16").dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(layer_strides=(32, 16)), "layer_strides has 2 entries"),
        (dict(num_layers=2, layer_strides=(32, 4)), "must be one of"),
        (dict(dim=30, num_heads=3), "multiple of 4"),
        (dict(dim=32, num_heads=5), "not divisible by num_heads"),
        (dict(query_init="random"), "query_init='random'"),
        (dict(num_iters=0), "num_iters=0"),
        (dict(em_unroll=0), "em_unroll=0"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_decoder_config_rejects(kwargs, message):
    with pytest.raises(ModelConfigError, match=message) as err:
        DecoderConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_decoder_config_from_dict():
    cfg = DecoderConfig(**{"layer_strides": [8, 16], "num_layers": 2, "em_unroll": 2})
    assert cfg.layer_strides == (8, 16) and hash(cfg) and cfg.unroll() == 2
    assert set(decoder_fields()) == {
        "dim",
        "num_queries",
        "num_layers",
        "num_iters",
        "layer_strides",
        "num_heads",
        "ffn_dim",
        "query_init",
        "box_refine",
        "box_reference",
        "mask_pooling",
        "mask_prior",
        "dropout",
        "em_remat",
        "em_unroll",
        "pixel_blocks",
    }


# ----------------------------------------------------------------------------- full model


def test_dense_model_clusterformer_non_square_with_padding():
    model = DenseModel(registry.create_backbone("clusterformer_nano", **TINY_CF), CFG, num_classes=5)
    images = jnp.asarray(np.random.RandomState(1).rand(2, 48, 64, 3), jnp.float32)
    mask = jnp.zeros((2, 48, 64), bool).at[:, :40, :48].set(True)
    params = random_like(abstract_params(model, images, mask), scale=0.2)
    out = jax.jit(model.apply)({"params": params}, images, mask)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "class_logits": ((2, 2, 8, 5), jnp.float32),
        "boxes": ((2, 2, 8, 4), jnp.float32),
        "mask_logits": ((2, 2, 8, 12, 16), jnp.float32),
    }
    for value in out.values():
        assert np.isfinite(np.asarray(value)).all()
    boxes = np.asarray(out["boxes"])
    assert (boxes > 0).all() and (boxes < 1).all()
    assert not np.allclose(out["class_logits"][0], out["class_logits"][1])  # one prediction per layer


def test_dense_model_peer_shapes():
    model = DenseModel(registry.create_backbone("coc_tiny_plain", **TINY_COC), CFG, num_classes=7)
    images = jnp.zeros((1, 64, 48, 3))
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), images)[0])
    assert out["class_logits"].shape == (2, 1, 8, 7) and out["mask_logits"].shape == (2, 1, 8, 16, 12)
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_box_modes_and_detach_between_layers():
    feats = fake_feats(batch=1, h=32, w=32)
    refine = ClusterDecoder(DecoderConfig(**dict(vars(CFG), num_iters=1, dim=16, num_heads=2, ffn_dim=16)), 3)
    params = random_like(abstract_params(refine, feats))
    assert {"init_box", "box_head_0", "box_head_1"} <= set(params) and "box_head" not in params
    direct = abstract_params(ClusterDecoder(DecoderConfig(**dict(vars(CFG), box_refine=False)), 3), feats)
    assert "box_head" in direct and "init_box" not in direct and "box_head_0" not in direct

    def last_box(p):
        return jnp.sum(refine.apply({"params": p}, feats)["boxes"][-1])

    grads = jax.jit(jax.grad(last_box))(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads["box_head_0"]))
    assert float(jnp.abs(grads["box_head_1"]["fc2"]["kernel"]).max()) > 0


def test_mask_boxes_hand_example_and_mask_referenced_refinement():
    logits = np.full((1, 3, 4, 8), -1.0, np.float32)
    logits[0, 0, 1:3, 2:6] = 2.0  # rows 1..2 of 4, columns 2..5 of 8
    logits[0, 1, 0, 7] = 0.5  # one corner cell
    fallback = jnp.full((1, 3, 4), 0.3)
    got = np.asarray(mask_boxes(jnp.asarray(logits), fallback))
    np.testing.assert_allclose(got[0, 0], [4 / 8, 2 / 4, 4 / 8, 2 / 4])  # cx, cy, w, h
    np.testing.assert_allclose(got[0, 1], [7.5 / 8, 0.125, 1 / 8, 0.25])
    np.testing.assert_allclose(got[0, 2], [0.3] * 4)  # empty mask: the previous reference

    # At init the refinement deltas are zero, so every layer's box is exactly the box of its own mask.
    feats = fake_feats(batch=1, h=32, w=32)
    options = dict(box_reference="mask", mask_pooling=True, mask_prior=True)  # the instance configs' options
    decoder = ClusterDecoder(DecoderConfig(**dict(vars(CFG), num_iters=1, **options)), 3)
    params = random_like(abstract_params(decoder, feats), scale=0.5)
    for layer in range(2):  # the deltas' last layer as initialised (zeros), the rest random
        params[f"box_head_{layer}"]["fc2"] = jax.tree.map(jnp.zeros_like, params[f"box_head_{layer}"]["fc2"])
    out = jax.jit(decoder.apply)({"params": params}, feats)
    for layer in range(2):
        has_fg = np.asarray(out["mask_logits"][layer] > 0).any(axis=(-2, -1))
        assert has_fg.any()
        want = mask_boxes(out["mask_logits"][layer], jnp.zeros((1, 8, 4)))
        np.testing.assert_allclose(np.asarray(out["boxes"][layer])[has_fg], np.asarray(want)[has_fg], atol=1e-5)


# ----------------------------------------------------------------------------- E / M steps


def e_step(q, k, valid=None, prior=None):
    """The decoder's E-step: softmax over the queries of q.k / sqrt(e), for every head."""
    valid = None if valid is None else valid[:, None]
    prior = None if prior is None else prior[:, None]
    return em.e_step(q, k, "clusters", q.shape[-1] ** -0.5, valid, prior)


def m_step(assign, values):
    return em.m_step(assign, values, mean=True)


def test_e_and_m_step_hand_example():
    # 1 head, K=2 queries, N=3 pixels, e=4: logits = q.k / sqrt(4) = +-n for pixel n
    q = jnp.zeros((1, 1, 2, 4)).at[0, 0, :, 0].set(jnp.asarray([2.0, -2.0]))
    k = jnp.zeros((1, 1, 3, 4)).at[0, 0, :, 0].set(jnp.asarray([0.0, 1.0, 2.0]))
    assign = np.asarray(e_step(q, k))[0, 0]
    s1, s2 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-4))  # softmax([n, -n]) = sigmoid(2n)
    np.testing.assert_allclose(assign, [[0.5, s1, s2], [0.5, 1 - s1, 1 - s2]], rtol=1e-6)
    np.testing.assert_allclose(assign.sum(0), 1.0, rtol=1e-6)

    valid = jnp.asarray([[True, True, False]])
    masked = np.asarray(e_step(q, k, valid))[0, 0]
    np.testing.assert_allclose(masked[:, 2], 0.0)

    # A mask prior adds to the logits: +-1 on pixel 0 makes it softmax([1, -1]); pixel 2 gets [2 - 3, -2 + 3].
    prior = jnp.asarray([[[1.0, 0.0, -3.0], [-1.0, 0.0, 3.0]]])
    biased = np.asarray(e_step(q, k, None, prior))[0, 0]
    np.testing.assert_allclose(biased[:, 0], [s1, 1 - s1], rtol=1e-6)
    np.testing.assert_allclose(biased[:, 1], assign[:, 1], rtol=1e-6)
    np.testing.assert_allclose(biased[:, 2], [1 - s1, s1], rtol=1e-6)
    values = jnp.asarray([1.0, 3.0, 100.0]).reshape(1, 1, 3, 1)
    centers = np.asarray(m_step(jnp.asarray(masked)[None, None], values))[0, 0, :, 0]
    expected = [(0.5 * 1 + s1 * 3) / (0.5 + s1), (0.5 * 1 + (1 - s1) * 3) / (0.5 + 1 - s1)]
    np.testing.assert_allclose(centers, expected, rtol=1e-6)


def test_padded_pixels_do_not_change_the_centers():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, 4, n, 8), jnp.float32) for n in (5, 12, 12))
    k_pad = jnp.concatenate([k, 50 * jnp.asarray(rng.randn(2, 4, 7, 8), jnp.float32)], axis=2)
    v_pad = jnp.concatenate([v, 50 * jnp.asarray(rng.randn(2, 4, 7, 8), jnp.float32)], axis=2)
    valid = jnp.arange(19)[None].repeat(2, 0) < 12
    np.testing.assert_allclose(m_step(e_step(q, k_pad, valid), v_pad), m_step(e_step(q, k), v), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def layer_setup():
    cfg = DecoderConfig(dim=16, num_queries=5, num_layers=1, layer_strides=(8,), num_heads=2, ffn_dim=32)
    rng = np.random.RandomState(3)
    queries, pos = (jnp.asarray(rng.randn(2, 5, 16), jnp.float32) for _ in range(2))
    feature = jnp.asarray(rng.randn(2, 3, 4, 16), jnp.float32)
    valid = jnp.ones((2, 3, 4), bool)
    params = random_like(abstract_params(ClusterDecoderLayer(cfg), queries, pos, feature, valid), seed=4)
    return cfg, params, (queries, pos, feature, valid)


def test_layer_padding_invariance(layer_setup):
    cfg, params, (queries, pos, feature, valid) = layer_setup
    layer = ClusterDecoderLayer(cfg)
    garbage = 10 * jnp.asarray(np.random.RandomState(5).randn(2, 5, 7, 16), jnp.float32)
    padded = garbage.at[:, :3, :4].set(feature)
    padded_valid = jnp.zeros((2, 5, 7), bool).at[:, :3, :4].set(True)
    apply = jax.jit(layer.apply)
    plain = apply({"params": params}, queries, pos, feature, valid)
    np.testing.assert_allclose(apply({"params": params}, queries, pos, padded, padded_valid), plain, atol=2e-5)
    assert not np.allclose(apply({"params": params}, queries, pos, padded, jnp.ones((2, 5, 7), bool)), plain)


def test_em_weights_shared_across_iterations(layer_setup):
    cfg, params, args = layer_setup
    one, three = (ClusterDecoderLayer(DecoderConfig(**dict(vars(cfg), num_iters=t))) for t in (1, 3))
    assert shapes(abstract_params(one, *args)) == shapes(abstract_params(three, *args)) == shapes(params)
    assert set(params["em"]) == {"norm", "query", "out"}  # one step's weights, no per-iteration copies
    outs = [jax.jit(m.apply)({"params": params}, *args) for m in (one, three)]
    assert not np.allclose(outs[0], outs[1], atol=1e-4)


def test_scan_equals_unrolled_loop(layer_setup):
    _, _, (queries, pos, _, _) = layer_setup
    rng = np.random.RandomState(6)
    keys, values = (jnp.asarray(rng.randn(2, 2, 12, 8), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.rand(2, 12) > 0.3)
    prior = jnp.asarray(rng.randn(2, 5, 12), jnp.float32)  # the mask prior, broadcast to every iteration
    args = (pos, keys, values, valid, prior)
    for unroll in (1, 3):
        scanned = em.em_scan(ClusterEMStep, 3, num_broadcast=5, remat=True, unroll=unroll, dim=16, heads=2)
        params = random_like(abstract_params(scanned, queries, *args), seed=7)
        out, _ = scanned.apply({"params": params}, queries, *args)
        step, loop = ClusterEMStep(dim=16, heads=2), queries
        for _ in range(3):
            loop, _ = step.apply({"params": params}, loop, *args)
        np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- queries and pixel decoder


def test_query_grid_and_center_pooling():
    assert [query_grid(q) for q in (100, 8, 12, 7, 1)] == [(10, 10), (2, 4), (3, 4), (1, 7), (1, 1)]
    centers = jnp.arange(6.0).reshape(1, 6, 1)  # PyTorch AdaptiveAvgPool1d(6 -> 4) bins: [0,2) [1,3) [3,5) [4,6)
    np.testing.assert_allclose(pool_centers(centers, 4)[0, :, 0], [0.5, 1.5, 3.5, 4.5])
    assert pool_centers(centers, 6) is centers


def test_five_query_inits_differ():
    feats = fake_feats(batch=1)
    pixel32 = jnp.asarray(np.random.RandomState(9).randn(1, 2, 2, 32), jnp.float32)
    outputs, trees = {}, {}
    for mode in QUERY_INITS:
        init = QueryInit(mode, 8, 32)
        params = random_like(abstract_params(init, feats, pixel32, None), seed=1)
        content, pos = init.apply({"params": params}, feats, pixel32, None)
        assert content.shape == pos.shape == (1, 8, 32)
        outputs[mode], trees[mode] = np.asarray(content + pos), frozenset(shapes(params))
    assert len(set(trees.values())) == len(QUERY_INITS)
    for i, a in enumerate(QUERY_INITS):
        for b in QUERY_INITS[i + 1 :]:
            assert not np.allclose(outputs[a], outputs[b])


def ln_dense(x, params, name):
    """numpy LayerNorm (eps 1e-5) -> Dense with QueryInit's ``{name}_norm`` / ``{name}_proj`` params."""
    x = np.asarray(x, np.float64)
    norm, proj = params[f"{name}_norm"], params[f"{name}_proj"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    x = x * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    return x @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])


def test_encoder_centers_values_with_and_without_centers():
    feats = fake_feats(batch=1, centers=6)
    init = QueryInit("encoder_centers", 4, 32)
    params = random_like(abstract_params(init, feats, None, None), seed=2)
    content, _ = init.apply({"params": params}, feats, None, None)
    np.testing.assert_allclose(content[0], ln_dense(pool_centers(feats["centers"], 4)[0], params, "centers"), atol=1e-4)
    # a peer backbone (no centers, last map 2x2 with 20 channels): its 2x2 query-grid pooling is the map itself
    peer = {"stages": feats["stages"][:3] + [feats["centers"][:, :4].reshape(1, 2, 2, 20)]}
    content, _ = init.apply({"params": params}, peer, None, None)
    np.testing.assert_allclose(content[0], ln_dense(feats["centers"][0, :4], params, "centers"), atol=1e-4)


def test_mixed_selection_takes_top_scores():
    feats = fake_feats(batch=1)
    pixel32 = jnp.asarray(np.random.RandomState(3).randn(1, 3, 3, 32), jnp.float32)
    init = QueryInit("mixed_selection", 4, 32)
    params = random_like(abstract_params(init, feats, pixel32, None), seed=3)
    params["objectness"]["kernel"] = jnp.zeros((32, 1)).at[0, 0].set(1.0)  # score = channel 0 + bias
    mask = jnp.ones((1, 96, 96), bool).at[:, :, 64:].set(False)  # the last stride-32 column is padding
    _, pos = init.apply({"params": params}, feats, pixel32, mask)
    cells = np.asarray(pixel32[0, :, :2]).reshape(6, 32)  # the real cells, row-major
    score = cells[:, 0] + float(params["objectness"]["bias"][0])
    order = np.argsort(-score)[:4]
    expected = ln_dense(cells[order], params, "selection") / (1 + np.exp(-score[order]))[:, None]
    np.testing.assert_allclose(pos[0], expected, rtol=1e-4, atol=1e-5)


def test_pixel_decoder_odd_sizes_and_mask_grid():
    rng = np.random.RandomState(0)
    stages = [
        jnp.asarray(rng.randn(1, h, w, c), jnp.float32)
        for (h, w), c in zip([(13, 9), (7, 5), (4, 3), (2, 2)], (4, 6, 8, 10))
    ]
    out = jax.eval_shape(lambda: PixelDecoder(dim=12).init_with_output(jax.random.PRNGKey(0), stages)[0])
    assert {s: v.shape for s, v in out.items()} == {
        4: (1, 13, 9, 12),
        8: (1, 7, 5, 12),
        16: (1, 4, 3, 12),
        32: (1, 2, 2, 12),
    }
    mask = jnp.zeros((1, 10, 8), bool).at[:, :6, :5].set(True)
    # cells at stride 2 start at rows 0,2,4,6,8 / cols 0,2,4,6; stride ~3.3 rows: floor(i*10/3) = 0,3,6
    np.testing.assert_array_equal(mask_to_grid(mask, (5, 4))[0], np.outer([1, 1, 1, 0, 0], [1, 1, 1, 0]).astype(bool))
    np.testing.assert_array_equal(mask_to_grid(mask, (3, 4))[0, :, 0], [True, True, False])


def test_pixel_decoder_blocks_start_as_identity_and_flow_top_down():
    rng = np.random.RandomState(1)
    stages = [jnp.asarray(rng.randn(1, 16 >> i, 16 >> i, 6), jnp.float32) for i in range(4)]
    out, variables = PixelDecoder(dim=8, blocks=(1, 2, 0, 1)).init_with_output(jax.random.PRNGKey(0), stages)
    params = dict(variables["params"])
    assert sorted(k for k in params if k.startswith("block")) == ["block_16_0", "block_16_1", "block_32_0", "block_4_0"]
    fpn = PixelDecoder(dim=8).apply({"params": {k: v for k, v in params.items() if not k.startswith("block")}}, stages)
    for stride in (4, 8, 16, 32):  # the last norm's zero scale: every block starts as the identity
        np.testing.assert_array_equal(out[stride], fpn[stride])
    # A trained stride-32 block changes every finer level (top-down path); the stride-4 block only stride 4.
    for name, changed in (("block_32_0", {4, 8, 16, 32}), ("block_4_0", {4})):
        moved = dict(params)
        moved[name] = dict(params[name])
        moved[name]["norm_2"] = {"scale": jnp.ones(8), "bias": jnp.full(8, 0.5)}
        new = PixelDecoder(dim=8, blocks=(1, 2, 0, 1)).apply({"params": moved}, stages)
        assert {s for s in new if not np.allclose(new[s], out[s])} == changed
    with pytest.raises(ModelConfigError, match="pixel_blocks"):
        DecoderConfig(pixel_blocks=(1, 1))


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_mask_pooling_reads_pixels_under_the_masks_of_the_chosen_activation(activation):
    feats = fake_feats(batch=1, h=32, w=32)
    cfg = DecoderConfig(**dict(vars(CFG), num_layers=1, layer_strides=(8,), num_iters=1, mask_pooling=True))
    decoder = ClusterDecoder(cfg, 3, void_class=True, with_boxes=False, semantic_classes=3, mask_activation=activation)
    params = random_like(abstract_params(decoder, feats), seed=4, scale=0.5)
    out, state = decoder.apply({"params": params}, feats, capture_intermediates=True)
    logits = np.asarray(out["mask_logits"][0], np.float64)  # (B, Q, h4, w4)
    if activation == "softmax":  # over the queries: each pixel's weights sum to 1
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
    else:
        weights = 1 / (1 + np.exp(-logits))
    pixels = np.asarray(out["pixel_embeddings"], np.float64)
    pooled = np.einsum("bqhw,bhwd->bqd", weights, pixels) / (weights.sum((2, 3))[..., None] + 1.0)
    norm = params["mask_pool_norm"]
    centred = pooled - pooled.mean(-1, keepdims=True)
    expected = centred / np.sqrt(centred.var(-1, keepdims=True) + 1e-5) * norm["scale"] + norm["bias"]
    got = state["intermediates"]["mask_pool_norm"]["__call__"][0]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelConfigError, match="mask_activation"):
        ClusterDecoder(cfg, 3, mask_activation="relu").init(jax.random.PRNGKey(0), feats)
