"""PaCa-ViT: layer, whole model and segmentation head against NumPy transcriptions of the spec (§4.2, §4.6),
parameter counts (§4.4), the state_dict converter (§4.3) and the configs.

The references work on PyTorch-layout weights and NCHW maps where upstream does, and import nothing from the
package under test (the NumPy conv/GELU helpers come from the Context Cluster tests).
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from clusterformer_jax.convert import paca_vit as conv
from clusterformer_jax.models import paca_vit as pv
from clusterformer_jax.models.registry import create_model
from tests.test_context_cluster import conv2d_nchw, gelu

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- NumPy reference


def softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    ex = np.exp(x)
    return ex / ex.sum(axis=axis, keepdims=True)


def layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def computes(j, onsite):
    return j == 0 or onsite == 1 or (onsite > 1 and j % onsite == 0)


def paca_layer_reference(x, hw, sd, heads, num_clusters, clustering, z=None):
    """PaCaLayer.forward on x (B, N, C); sd keys relative to 'attn.'. Returns (out, z)."""
    b, n, c = x.shape
    if num_clusters > 0:
        if "clustering.clustering.0.weight" in sd:
            p = "clustering.clustering."
            if clustering == "conv":
                g = x.reshape(b, *hw, c).transpose(0, 3, 1, 2)  # B (H W) C -> B C H W
                k = sd[p + "0.weight"].shape[-1]
                g = gelu(conv2d_nchw(g, sd[p + "0.weight"], sd[p + "0.bias"], 1, (k - 1) // 2, groups=c))
                g = gelu(conv2d_nchw(g, sd[p + "2.weight"], sd[p + "2.bias"], 1, 0))
                z_raw = conv2d_nchw(g, sd[p + "4.weight"], None, 1, 0).reshape(b, num_clusters, n)
            else:
                z_raw = linear(gelu(linear(x, sd, p + "0")), sd, p + "2").transpose(0, 2, 1)
            z = softmax(z_raw, axis=-1)
        tokens = layer_norm(z @ x, sd["cluster_norm.weight"], sd["cluster_norm.bias"])
    else:
        tokens = x
    d = c // heads
    q = linear(x, sd, "q").reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    k = linear(tokens, sd, "k").reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
    v = linear(tokens, sd, "v").reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
    attn = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), axis=-1)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
    return linear(out, sd, "proj"), z


def mlp_reference(x, hw, sd):
    """Mlp with DWConv + shortcut: fc1 -> h + dw3x3(h) -> GELU -> fc2; sd keys relative to 'mlp.'."""
    b, n, _ = x.shape
    h = linear(x, sd, "fc1")
    grid = h.reshape(b, *hw, -1).transpose(0, 3, 1, 2)
    dw = conv2d_nchw(grid, sd["dwconv.dwconv.weight"], sd["dwconv.dwconv.bias"], 1, 1, groups=grid.shape[1])
    h = h + dw.reshape(b, -1, n).transpose(0, 2, 1)
    return linear(gelu(h), sd, "fc2")


def model_reference(images, sd, depths, heads, clusters, onsite, clustering):
    """PaCaViT.forward (classifier) on NCHW images with an upstream state_dict."""

    def ln2d(x, name):  # LayerNorm2d: over channels at every pixel
        return layer_norm(x.transpose(0, 2, 3, 1), sd[name + ".weight"], sd[name + ".bias"]).transpose(0, 3, 1, 2)

    x = conv2d_nchw(images, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], 2, 1)
    x = conv2d_nchw(x, sd["patch_embed.proj.1.weight"], sd["patch_embed.proj.1.bias"], 2, 1)
    x = ln2d(x, "patch_embed.norm")
    for i, depth in enumerate(depths, start=1):
        b, c, h, w = x.shape
        x, z = x.reshape(b, c, h * w).transpose(0, 2, 1), None
        for j in range(depth):
            sub = lambda prefix: {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
            p = f"stage{i}.{j}."
            y = layer_norm(x, sd[p + "norm1_before.weight"], sd[p + "norm1_before.bias"])
            a, z = paca_layer_reference(y, (h, w), sub(p + "attn."), heads[i - 1], clusters[i - 1], clustering, z)
            x = x + a
            y = layer_norm(x, sd[p + "norm2_before.weight"], sd[p + "norm2_before.bias"])
            x = x + mlp_reference(y, (h, w), sub(p + "mlp."))
        x = layer_norm(x, sd[f"norm{i}.weight"], sd[f"norm{i}.bias"])
        if i < len(depths):
            x = x.transpose(0, 2, 1).reshape(b, c, h, w)
            x = conv2d_nchw(x, sd[f"transition{i}.proj.weight"], sd[f"transition{i}.proj.bias"], 2, 1)
            x = ln2d(x, f"transition{i}.norm")
    return linear(x.mean(axis=1), sd, "head")


def paca_shapes(
    depths,
    dims,
    clusters=(100, 100, 100, 0),
    onsite=(0, 0, 0, 0),
    clustering="conv",
    mlp_ratio=4,
    kernel=7,
    classes=1000,
):
    """The upstream state_dict's key names and shapes (§4.3), built from the spec alone."""
    shapes = {
        "patch_embed.proj.0.weight": (dims[0] // 2, 3, 3, 3),
        "patch_embed.proj.0.bias": (dims[0] // 2,),
        "patch_embed.proj.1.weight": (dims[0], dims[0] // 2, 3, 3),
        "patch_embed.proj.1.bias": (dims[0],),
        "patch_embed.norm.weight": (dims[0],),
        "patch_embed.norm.bias": (dims[0],),
    }
    for i, (depth, d, m) in enumerate(zip(depths, dims, clusters), start=1):
        hidden = d * mlp_ratio
        for j in range(depth):
            p = f"stage{i}.{j}."
            for name in ("norm1_before", "norm2_before"):
                shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (d,)
            for name in ("q", "k", "v", "proj"):
                shapes[p + f"attn.{name}.weight"], shapes[p + f"attn.{name}.bias"] = (d, d), (d,)
            if m > 0:
                shapes[p + "attn.cluster_norm.weight"] = shapes[p + "attn.cluster_norm.bias"] = (d,)
                if computes(j, onsite[i - 1]):
                    c = p + "attn.clustering.clustering."
                    if clustering == "conv":
                        shapes.update(
                            {
                                c + "0.weight": (d, 1, kernel, kernel),
                                c + "0.bias": (d,),
                                c + "2.weight": (d, d, 1, 1),
                                c + "2.bias": (d,),
                                c + "4.weight": (m, d, 1, 1),
                            }
                        )
                    else:
                        shapes.update(
                            {
                                c + "0.weight": (hidden, d),
                                c + "0.bias": (hidden,),
                                c + "2.weight": (m, hidden),
                                c + "2.bias": (m,),
                            }
                        )
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (hidden, d), (hidden,)
            shapes[p + "mlp.dwconv.dwconv.weight"], shapes[p + "mlp.dwconv.dwconv.bias"] = (hidden, 1, 3, 3), (hidden,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (d, hidden), (d,)
        shapes[f"norm{i}.weight"] = shapes[f"norm{i}.bias"] = (d,)
        if i < len(depths):
            shapes[f"transition{i}.proj.weight"], shapes[f"transition{i}.proj.bias"] = (dims[i], d, 3, 3), (dims[i],)
            shapes[f"transition{i}.norm.weight"] = shapes[f"transition{i}.norm.bias"] = (dims[i],)
    shapes["head.weight"], shapes["head.bias"] = (classes, dims[-1]), (classes,)
    return shapes


def paca_state_dict(*args, seed=0, scale=0.3, **kwargs):
    rng = np.random.RandomState(seed)
    return {k: (scale * rng.randn(*s)).astype(np.float32) for k, s in paca_shapes(*args, **kwargs).items()}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def random_like(tree, rng, scale=0.3):
    """Random float32 arrays shaped like an abstract tree (no compiled init needed)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(scale * rng.randn(*a.shape), a.dtype), tree)


def _abstract(model, size=224):
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))["params"]


# ----------------------------------------------------------------------------- layer parity


@pytest.mark.parametrize(
    "clustering,num_clusters,reuse", [("conv", 5, False), ("mlp", 3, False), ("conv", 4, True), ("conv", 0, False)]
)
def test_paca_attention_matches_numpy_reference(clustering, num_clusters, reuse):
    dim, heads, hw = 12, 3, (4, 5)
    rng = np.random.RandomState(0)
    x = rng.randn(2, hw[0] * hw[1], dim).astype(np.float32)
    z_in = softmax(rng.randn(2, num_clusters, 20), -1).astype(np.float32) if reuse else None
    layer = pv.PaCaAttention(dim, heads, num_clusters, compute_clusters=not reuse, clustering=clustering, kernel=3)
    abstract = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, hw, z_in, True))["params"]
    params = random_like(abstract, rng)
    out, z = jax.jit(lambda p, x, z: layer.apply({"params": p}, x, hw, z, True))(params, x, z_in)
    sd = {k.split(".attn.", 1)[1]: v for k, v in conv.flax_to_state_dict({"stage_0_block_0": {"attn": params}}).items()}
    want, z_want = paca_layer_reference(
        x.astype(np.float64),
        hw,
        {k: v.astype(np.float64) for k, v in sd.items()},
        heads,
        num_clusters,
        clustering,
        z_in,
    )
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    if num_clusters:
        np.testing.assert_allclose(np.asarray(z), z_want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(z).sum(-1), 1.0, rtol=1e-5)  # softmax over the patches
    assert "clustering" not in params if reuse or not num_clusters else "clustering" in params


def test_mlp_matches_numpy_reference():
    rng = np.random.RandomState(1)
    x = rng.randn(2, 12, 6).astype(np.float32)
    mlp = pv.PaCaMlp(24)
    params = random_like(jax.eval_shape(lambda: mlp.init(jax.random.PRNGKey(0), x, (3, 4), True))["params"], rng)
    out = jax.jit(lambda p, x: mlp.apply({"params": p}, x, (3, 4), True))(params, x)
    sd = {
        k.split(".mlp.", 1)[1]: v.astype(np.float64)
        for k, v in conv.flax_to_state_dict({"stage_0_block_0": {"mlp": params}}).items()
    }
    np.testing.assert_allclose(np.asarray(out), mlp_reference(x.astype(np.float64), (3, 4), sd), rtol=1e-5, atol=1e-5)


def test_onsite_rule():
    assert [pv.onsite_clustering(j, 0) for j in range(4)] == [True, False, False, False]
    assert [pv.onsite_clustering(j, 1) for j in range(4)] == [True] * 4
    assert [pv.onsite_clustering(j, 2) for j in range(5)] == [True, False, True, False, True]


# ----------------------------------------------------------------------------- whole model


def test_whole_model_from_state_dict_matches_numpy_reference():
    arch = dict(
        depths=(2, 2, 3, 1),
        dims=(8, 12, 16, 20),
        num_heads=(2, 3, 4, 4),
        mlp_ratios=(4, 4, 4, 4),
        clusters=(5, 3, 4, 0),
        onsite=(0, 1, 2, 0),
        clustering_kernel=3,
    )
    sd = paca_state_dict(arch["depths"], arch["dims"], arch["clusters"], arch["onsite"], kernel=3, classes=5, seed=3)
    model = pv.PaCaViTClassifier(num_classes=5, **arch)
    params = conv.state_dict_to_flax(sd, _abstract(model, 32))
    images = np.random.RandomState(4).randn(2, 32, 32, 3).astype(np.float32)
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(images))
    want = model_reference(
        images.transpose(0, 3, 1, 2).astype(np.float64),
        {k: v.astype(np.float64) for k, v in sd.items()},
        arch["depths"],
        arch["num_heads"],
        arch["clusters"],
        arch["onsite"],
        "conv",
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# (name, expected params in M, tolerance): §4.4's counts computed from the code (2 decimals, so 0.005M) where
# it gives one, else the README's rounding (0.05M). The README rounds loosely: block-wise 24.19M is "24.1M"
# and [100]*4 22.25M is "22.3M" there.
COUNTS = [
    ("pacavit_tiny_p2cconv_100_0", 12.20, 0.005),
    ("pacavit_small_p2cconv_100_0", 22.04, 0.005),
    ("pacavit_base_p2cconv_100_0", 46.91, 0.005),
    ("pacavit_small_p2cmlp_100_0", 22.64, 0.005),
    ("pacavit_small_p2cconv_2_0", 21.98, 0.005),
    ("pacavit_small_p2cconv_49_0", 22.01, 0.005),
    ("pacavit_small_p2cconv_49_100", 22.23, 0.005),
    ("pacavit_small_p2cconv_100_49", 22.2, 0.05),
    ("pacavit_small_p2cconv_100", 22.25, 0.005),
    ("pacavit_small_p2cconv_100_blockwise", 24.19, 0.005),
]


@pytest.mark.parametrize("name,expected,tolerance", COUNTS)
def test_parameter_counts(name, expected, tolerance):
    preset = pv.PRESETS[name]
    fields = {k: preset[k] for k in ("clusters", "onsite", "clustering") if k in preset}
    dims = preset.get("dims", (96, 192, 320, 384))
    spec = sum(int(np.prod(s)) for s in paca_shapes(preset["depths"], dims, **fields).values())
    ours = _count(_abstract(create_model(name)))
    assert ours == spec
    assert abs(ours / 1e6 - expected) < tolerance, ours


def test_aliases_backbone_shapes_and_registry():
    assert _count(_abstract(create_model("paca_tiny"), 32)) == _count(
        _abstract(create_model("pacavit_tiny_p2cconv_100_0"), 32)
    )
    backbone = pv.PaCaViTBackbone(**pv.PRESETS["pacavit_base_p2cconv_100_0"])
    images = jnp.zeros((2, 224, 224, 3))
    variables = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), images))
    out = jax.eval_shape(lambda v: backbone.apply(v, images), variables)
    assert [s.shape for s in out["stages"]] == [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384), (2, 7, 7, 512)]
    model = create_model("paca_tiny", num_classes=10, dtype="bfloat16", clusters=[49, 49, 49, 0])
    assert model.clusters == (49, 49, 49, 0)
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))[0])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="no field 'num_clusters'"):
        create_model("paca_tiny", num_clusters=3)
    with pytest.raises(ValueError, match="clustering='kmeans'"):
        _abstract(create_model("paca_tiny", clustering="kmeans"), 32)


# ----------------------------------------------------------------------------- segmentation head


def bilinear_nchw(x, out_h, out_w):
    """F.interpolate(mode='bilinear', align_corners=False)."""

    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        mat = np.zeros((n_out, n_in))
        mat[np.arange(n_out), i0] += 1 - (src - i0)
        mat[np.arange(n_out), i1] += src - i0
        return mat

    return np.einsum("ih,jw,bchw->bcij", weights(x.shape[2], out_h), weights(x.shape[3], out_w), x)


def seg_head_reference(feats, p, s, num_classes):
    """PaCaSegHead.forward in eval mode on NCHW maps; p = Flax params, s = batch_stats (read as torch would)."""

    def bn(x, st, pr):  # eval BatchNorm over axis 1 (channels)
        r = lambda a: np.asarray(a, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))  # noqa: E731
        return (x - r(st["mean"])) / np.sqrt(r(st["var"]) + 1e-5) * r(pr["scale"]) + r(pr["bias"])

    def conv_module(x, name):  # ConvModule(1x1 conv without bias, BN, ReLU) on NCHW
        y = np.einsum("io,bihw->bohw", np.asarray(p[name]["conv"]["kernel"], np.float64), x)
        return np.maximum(bn(y, s[name]["bn"], p[name]["bn"]), 0.0)

    h, w = feats[0].shape[2:]
    outs = [bilinear_nchw(conv_module(f, f"convs_{i}"), h, w) for i, f in enumerate(feats)]
    x = np.concatenate(outs, axis=1)
    b, c = x.shape[:2]
    q = conv_module(x, "q").reshape(b, -1, h * w).transpose(0, 2, 1)
    hid = conv_module(x, "clustering_0")
    c_raw = (
        np.einsum("io,bihw->bohw", np.asarray(p["clustering_1"]["kernel"]), hid)
        + np.asarray(p["clustering_1"]["bias"])[None, :, None, None]
    )
    cl = softmax(c_raw.reshape(b, num_classes, h * w), -1)
    z = cl @ x.reshape(b, c, h * w).transpose(0, 2, 1)  # B M C

    def kv(name):
        t = z @ np.asarray(p[f"{name}_linear"]["kernel"]) + np.asarray(p[f"{name}_linear"]["bias"])
        t = t.transpose(0, 2, 1)  # B C M: BatchNorm1d over channels
        t = bn(t, s[f"{name}_bn"], p[f"{name}_bn"]).transpose(0, 2, 1)
        return np.maximum(t, 0)

    attn = softmax(q @ kv("k").transpose(0, 2, 1), -1)
    out = (attn @ kv("v")).transpose(0, 2, 1).reshape(b, -1, h, w)
    out = conv_module(out, "proj")
    logits = (
        np.einsum("io,bihw->bohw", np.asarray(p["conv_seg"]["kernel"]), out)
        + np.asarray(p["conv_seg"]["bias"])[None, :, None, None]
    )
    return logits, c_raw


def test_seg_head_matches_numpy_reference_and_updates_batch_stats():
    rng = np.random.RandomState(5)
    feats = [rng.randn(2, 8 // 2**i, 8 // 2**i, c).astype(np.float32) for i, c in enumerate((4, 6, 8, 10))]
    head = pv.PaCaSegHead(num_classes=5, channels=8)
    variables = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), feats))
    params = random_like(variables["params"], rng)
    stats = jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.5, random_like(variables["batch_stats"], rng))
    out = jax.jit(lambda p, s, f: head.apply({"params": p, "batch_stats": s}, f))(params, stats, feats)
    logits, c_raw = seg_head_reference(
        [f.transpose(0, 3, 1, 2).astype(np.float64) for f in feats],
        jax.tree_util.tree_map(np.asarray, params),
        jax.tree_util.tree_map(np.asarray, stats),
        5,
    )
    np.testing.assert_allclose(np.asarray(out["logits"]), logits.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["cluster_logits"]), c_raw.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)

    _, updated = jax.jit(
        lambda p, s, f: head.apply(
            {"params": p, "batch_stats": s},
            f,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(1)},
            mutable=["batch_stats"],
        )
    )(params, stats, feats)
    before, after = jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(updated["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_segmenter_shapes_and_loss():
    seg = pv.PaCaViTSegmenter(num_classes=150, clusters=(200, 200, 200, 0))
    images = jnp.zeros((1, 512, 512, 3))
    variables = jax.eval_shape(lambda: seg.init(jax.random.PRNGKey(0), images))
    assert abs(_count(variables["params"]) / 1e6 - 13.3) < 0.05  # README: PaCa-Tiny + PaCa head, 13.3M
    assert "batch_stats" in variables
    out = jax.eval_shape(lambda v: seg.apply(v, images), variables)
    assert out["logits"].shape == (1, 512, 512, 150) and out["cluster_logits"].shape == (1, 128, 128, 150)

    rng = np.random.RandomState(6)
    logits = jnp.asarray(rng.randn(2, 4, 4, 3).astype(np.float32))
    labels = jnp.asarray(rng.randint(0, 3, (2, 4, 4)))
    labels = labels.at[0, 0, 0].set(255)
    loss = pv.paca_seg_loss({"logits": logits, "cluster_logits": logits}, labels)
    logp = jax.nn.log_softmax(logits, -1)
    valid = np.asarray(labels) != 255
    nll = -np.take_along_axis(np.asarray(logp), np.where(valid, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), 1.4 * nll[valid].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- converter


def test_round_trip_small_mlp(tmp_path):
    sd = paca_state_dict((3, 3, 10, 3), (96, 192, 320, 384), clustering="mlp")
    assert sum(v.size for v in sd.values()) == 22_637_268
    path = str(tmp_path / "pacavit_small_p2cmlp_100_0.safetensors")
    save_file(sd, path)
    params = conv.convert(path, "pacavit_small_p2cmlp_100_0")
    back = conv.flax_to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    blk = params["backbone"]["stage_2_block_0"]
    w = sd["stage3.0.attn.clustering.clustering.2.weight"]  # Linear (M, 4C)
    assert blk["attn"]["clustering"]["fc2"]["kernel"][17, 42] == w[42, 17]
    w = sd["stage3.0.mlp.dwconv.dwconv.weight"]  # depthwise (4C, 1, 3, 3)
    assert blk["mlp"]["dwconv"]["kernel"][2, 0, 0, 11] == w[11, 0, 2, 0]


def test_round_trip_blockwise_conv_and_errors(tmp_path):
    sd = paca_state_dict((3, 3, 10, 3), (96, 192, 320, 384), clusters=(100,) * 4, onsite=(1, 1, 1, 1), seed=1)
    params = conv.state_dict_to_flax(sd, _abstract(create_model("pacavit_small_p2cconv_100_blockwise")))
    back = conv.flax_to_state_dict(params)
    assert sorted(back) == sorted(sd)
    w = sd["stage4.2.attn.clustering.clustering.4.weight"]  # 1x1 conv (M, C, 1, 1), no bias
    assert params["backbone"]["stage_3_block_2"]["attn"]["clustering"]["to_clusters"]["kernel"][7, 99] == w[99, 7, 0, 0]
    w = sd["stage1.1.attn.clustering.clustering.0.weight"]  # depthwise 7x7 (C, 1, 7, 7)
    assert params["backbone"]["stage_0_block_1"]["attn"]["clustering"]["dwconv"]["kernel"][6, 1, 0, 5] == w[5, 0, 6, 1]
    # The stage-wise preset has no clustering in later blocks: a block-wise checkpoint is refused in one line.
    stagewise = _abstract(create_model("pacavit_small_p2cconv_100"))
    with pytest.raises(ValueError, match="keys the model lacks, first 'stage1.1.attn.clustering"):
        conv.state_dict_to_flax(sd, stagewise)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(10, 384\)"):
        conv.state_dict_to_flax(dict(sd, **{"head.weight": np.zeros((10, 384))}), params)
    src = str(tmp_path / "blockwise.safetensors")
    save_file(sd, src)
    with pytest.raises(SystemExit, match="^error: .*lacks"):
        conv.main(["--checkpoint", src, "--model", "paca_tiny", "--output", str(tmp_path / "o.safetensors")])


def test_pth_checkpoint_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch")
    sd = paca_state_dict((2, 2, 4, 2), (96, 192, 320, 384), seed=2)
    path = str(tmp_path / "pacavit_tiny.pth")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    back = conv.flax_to_state_dict(conv.convert(path, "paca_tiny"))
    np.testing.assert_array_equal(back["head.weight"], sd["head.weight"])


# ----------------------------------------------------------------------------- configs


def _load_config(arg):
    spec = importlib.util.spec_from_file_location("paca_imagenet_config", REPO / "configs" / "paca_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


def test_configs_select_model_and_recipe():
    module, config = _load_config("paca_base")
    assert set(module.MODELS) == set(pv.PRESETS) | set(pv.ALIASES)
    assert config.model.name == "paca_base" and config.num_epochs == 300.0
    assert config.optim.base_lr * config.batch_size / config.optim.lr_base_batch_size == pytest.approx(1e-3)
    assert config.optim.min_lr_ratio == 1e-2 and config.optim.grad_clip_norm <= 0
    _, quick = _load_config("pacavit_small_p2cmlp_100_0,quickstart")
    assert quick.model.name == "pacavit_small_p2cmlp_100_0" and quick.input.image_size == 32
    with pytest.raises(ValueError, match="MODEL"):
        _load_config("coc_tiny")
