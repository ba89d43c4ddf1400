"""Context Cluster: mixer and whole model against NumPy transcriptions of the spec, counts, converter, configs.

The references below follow ma-xu/Context-Cluster ``models/context_cluster.py`` literally (NCHW tensors, the
einops rearranges written as reshapes/transposes, PyTorch-layout weights) and import nothing from the package
under test.
"""

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from clusterformer_jax.convert import timm_context_cluster as conv
from clusterformer_jax.models import context_cluster as cc
from clusterformer_jax.models.registry import create_model
from tests.reference_numpy import adaptive_avg_pool_nchw

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- NumPy reference (§3.2)


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _conv1x1(w, b, x):
    return np.einsum("oi,bihw->bohw", w[:, :, 0, 0], x) + b[None, :, None, None]


def conv2d_nchw(x, w, b, stride, pad, groups=1):
    """PyTorch Conv2d: cross-correlation of NCHW x with OIHW (I = C/groups) w, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, ow))
    cin, cout = w.shape[1], w.shape[0] // groups
    for g in range(groups):
        xs, ws = x[:, g * cin : (g + 1) * cin], w[g * cout : (g + 1) * cout]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
                out[:, g * cout : (g + 1) * cout] += np.einsum("oi,bihw->bohw", ws[:, :, i, j], patch)
    return out + (0.0 if b is None else b[None, :, None, None])


def _group_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cluster_reference(x, sd, heads, head_dim, proposal, fold, denominator="similarity"):
    """Cluster.forward: x (B, d, H, W); sd holds f/v/proj (out, in, 1, 1) weights and sim_alpha/beta."""
    value = _conv1x1(sd["v.weight"], sd["v.bias"], x)
    x = _conv1x1(sd["f.weight"], sd["f.bias"], x)
    big_b, _, big_w, big_h = x.shape
    x = x.reshape(big_b * heads, head_dim, big_w, big_h)  # b (e c) w h -> (b e) c w h
    value = value.reshape(big_b * heads, head_dim, big_w, big_h)
    if fold > 1:  # b c (f1 w) (f2 h) -> (b f1 f2) c w h

        def part(t):
            b0, c0 = t.shape[:2]
            t = t.reshape(b0, c0, fold, big_w // fold, fold, big_h // fold).transpose(0, 2, 4, 1, 3, 5)
            return t.reshape(b0 * fold * fold, c0, big_w // fold, big_h // fold)

        x, value = part(x), part(value)
    b, c, w, h = x.shape
    centers = adaptive_avg_pool_nchw(x, proposal, proposal)
    value_centers = adaptive_avg_pool_nchw(value, proposal, proposal).reshape(b, c, -1).transpose(0, 2, 1)
    cos = _normalize(centers.reshape(b, c, -1).transpose(0, 2, 1)) @ _normalize(
        x.reshape(b, c, -1).transpose(0, 2, 1)
    ).transpose(0, 2, 1)
    sim = 1.0 / (1.0 + np.exp(-(sd["sim_beta"][0] + sd["sim_alpha"][0] * cos)))  # (b, M, N)
    mask = np.zeros_like(sim)
    np.put_along_axis(mask, sim.argmax(axis=1)[:, None, :], 1.0, axis=1)
    sim = sim * mask
    value2 = value.reshape(b, c, -1).transpose(0, 2, 1)  # b c w h -> b (w h) c
    weight = sim if denominator == "similarity" else mask
    out = ((value2[:, None] * sim[..., None]).sum(axis=2) + value_centers) / (weight.sum(-1, keepdims=True) + 1.0)
    out = (out[:, :, None, :] * sim[..., None]).sum(axis=1)  # (b, N, c)
    out = out.transpose(0, 2, 1).reshape(b, c, w, h)  # b (w h) c -> b c w h
    if fold > 1:  # (b f1 f2) c w h -> b c (f1 w) (f2 h)
        out = out.reshape(big_b * heads, fold, fold, c, w, h).transpose(0, 3, 1, 4, 2, 5)
        out = out.reshape(big_b * heads, c, big_w, big_h)
    out = out.reshape(big_b, heads * c, big_w, big_h)  # (b e) c w h -> b (e c) w h
    return _conv1x1(sd["proj.weight"], sd["proj.bias"], out)


def model_reference(images, sd, depths, heads, head_dim, proposals, folds, mlp_ratios):
    """ContextCluster.forward (classifier) on NCHW images with a timm state_dict."""
    _, _, img_w, img_h = images.shape
    rows = np.arange(img_w) / (img_w - 1.0) - 0.5
    cols = np.arange(img_h) / (img_h - 1.0) - 0.5
    pos = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=0)
    x = np.concatenate([images, np.broadcast_to(pos, (images.shape[0], 2, img_w, img_h))], axis=1)
    x = conv2d_nchw(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], 4, 0)
    for i, depth in enumerate(depths):
        if i:
            x = conv2d_nchw(x, sd[f"network.{2 * i - 1}.proj.weight"], sd[f"network.{2 * i - 1}.proj.bias"], 2, 1)
        for j in range(depth):
            p = f"network.{2 * i}.{j}."
            mixer = {k[len(p) + 12 :]: v for k, v in sd.items() if k.startswith(p + "token_mixer.")}
            y = cluster_reference(
                _group_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"]),
                mixer,
                heads[i],
                head_dim,
                proposals[i],
                folds[i],
            )
            x = x + sd[p + "layer_scale_1"][None, :, None, None] * y
            y = _group_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"]).transpose(0, 2, 3, 1)
            y = gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
            y = (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]).transpose(0, 3, 1, 2)
            x = x + sd[p + "layer_scale_2"][None, :, None, None] * y
    x = _group_norm(x, sd["norm.weight"], sd["norm.bias"])
    return x.mean(axis=(2, 3)) @ sd["head.weight"].T + sd["head.bias"]


def timm_shapes(depths, dims, heads, head_dim, mlp_ratios=(8, 8, 4, 4), classes=1000):
    """The timm checkpoint's key names and shapes (§3.3), built from the spec alone."""
    shapes = {"patch_embed.proj.weight": (dims[0], 5, 4, 4), "patch_embed.proj.bias": (dims[0],)}
    for i, (depth, d) in enumerate(zip(depths, dims)):
        inner, hidden = heads[i] * head_dim, int(d * mlp_ratios[i])
        if i:
            shapes[f"network.{2 * i - 1}.proj.weight"] = (d, dims[i - 1], 3, 3)
            shapes[f"network.{2 * i - 1}.proj.bias"] = (d,)
        for j in range(depth):
            p = f"network.{2 * i}.{j}."
            for norm in ("norm1", "norm2"):
                shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (d,)
            for name, (o, n) in {"f": (inner, d), "v": (inner, d), "proj": (d, inner)}.items():
                shapes[p + f"token_mixer.{name}.weight"], shapes[p + f"token_mixer.{name}.bias"] = (o, n, 1, 1), (o,)
            shapes[p + "token_mixer.sim_alpha"] = shapes[p + "token_mixer.sim_beta"] = (1,)
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (hidden, d), (hidden,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (d, hidden), (d,)
            shapes[p + "layer_scale_1"] = shapes[p + "layer_scale_2"] = (d,)
    shapes["norm.weight"], shapes["norm.bias"] = (dims[-1],), (dims[-1],)
    shapes["head.weight"], shapes["head.bias"] = (classes, dims[-1]), (classes,)
    return shapes


def timm_state_dict(*args, seed=0, scale=1.0, **kwargs):
    """Random tensors under ``timm_shapes(*args, **kwargs)``."""
    rng = np.random.RandomState(seed)
    return {k: (scale * rng.randn(*s)).astype(np.float32) for k, s in timm_shapes(*args, **kwargs).items()}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(model, size=224):
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))["params"]


# ----------------------------------------------------------------------------- mixer parity


@pytest.mark.parametrize(
    "hw,fold,proposal,denominator",
    [
        ((6, 6), 2, 2, "similarity"),  # 3x3 regions, overlapping bins [0,2) [1,3)
        ((5, 5), 1, 3, "count"),  # no partition, 5 -> 3 overlapping bins, the pre-3ccb0b6 denominator
        ((4, 6), 2, 2, "similarity"),  # non-square: folds split rows and columns separately
        ((7, 7), 1, 2, "count"),
    ],
)
def test_mixer_matches_numpy_reference(hw, fold, proposal, denominator):
    dim, heads, e = 6, 2, 4
    mixer = cc.ClusterMixer(dim, heads, e, proposal=proposal, fold=fold, denominator=denominator)
    x = np.random.RandomState(0).randn(2, *hw, dim).astype(np.float32)
    params = jax.jit(mixer.init)(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    params = dict(params, sim_alpha=jnp.array([2.3]), sim_beta=jnp.array([-0.4]))
    got = jax.jit(mixer.apply)({"params": params}, jnp.asarray(x))
    sd = {
        f"{n}.{leaf}": conv.to_torch(np.asarray(params[n][k]), "conv1x1" if k == "kernel" else "plain")
        for n in ("f", "v", "proj")
        for k, leaf in (("kernel", "weight"), ("bias", "bias"))
    }
    sd.update(sim_alpha=np.array([2.3]), sim_beta=np.array([-0.4]))
    want = cluster_reference(x.transpose(0, 3, 1, 2).astype(np.float64), sd, heads, e, proposal, fold, denominator)
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_denominators_differ_and_reject_unknown():
    x = jnp.asarray(np.random.RandomState(1).randn(1, 4, 4, 6).astype(np.float32))
    outs = {}
    for mode in cc.DENOMINATORS:
        mixer = cc.ClusterMixer(6, 2, 4, proposal=2, denominator=mode)
        outs[mode] = jax.jit(mixer.init_with_output)(jax.random.PRNGKey(0), x)[0]
    assert not np.allclose(outs["similarity"], outs["count"])
    with pytest.raises(ValueError, match="denominator='mean'"):
        cc.ClusterMixer(6, 2, 4, denominator="mean").init(jax.random.PRNGKey(0), x)


# ----------------------------------------------------------------------------- whole model


def test_whole_model_from_state_dict_matches_numpy_reference():
    arch = dict(
        depths=(1, 2, 1, 1),
        dims=(8, 12, 16, 20),
        num_heads=(2, 2, 2, 2),
        head_dim=4,
        mlp_ratios=(2, 2, 2, 2),
        proposals=(2, 2, 2, 1),
        folds=(2, 2, 1, 1),
    )
    sd = timm_state_dict(
        arch["depths"], arch["dims"], arch["num_heads"], 4, arch["mlp_ratios"], classes=5, seed=3, scale=0.5
    )
    for key in sd:  # visible residual branches (the released init is 1e-5) and sensible norms
        if "layer_scale" in key:
            sd[key] = np.full_like(sd[key], 0.7)
    model = cc.ContextClusterClassifier(num_classes=5, **arch)
    params = conv.state_dict_to_flax(sd, _abstract(model, 32))
    images = np.random.RandomState(4).randn(2, 32, 32, 3).astype(np.float32)
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(images))
    want = model_reference(
        images.transpose(0, 3, 1, 2).astype(np.float64),
        {k: v.astype(np.float64) for k, v in sd.items()},
        arch["depths"],
        arch["num_heads"],
        4,
        arch["proposals"],
        arch["folds"],
        arch["mlp_ratios"],
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,published",
    [
        ("coc_tiny", 5_570_584),
        ("coc_tiny2", 5_570_584),
        ("coc_tiny_plain", 5_570_584),
        ("coc_small", 14_657_024),
        ("coc_medium", 29_290_520),
        ("coc_base_dim64", None),
        ("coc_base_dim96", None),
    ],
)
def test_parameter_counts(name, published):
    preset = cc.PRESETS[name]
    shapes = timm_shapes(preset["depths"], preset["dims"], preset["num_heads"], preset["head_dim"])
    spec_count = sum(int(np.prod(s)) for s in shapes.values())
    ours = _count(_abstract(create_model(name)))
    assert ours == spec_count
    if published is not None:
        assert ours == published  # true numel (the README's 5.3/14.0/27.9 "M" are numel / 2**20)


def test_backbone_stages_and_dense_norms():
    backbone = cc.ContextClusterBackbone(**{k: v for k, v in cc.PRESETS["coc_small"].items()}, stage_norms=True)
    images = jnp.zeros((2, 224, 224, 3))
    variables = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), images))
    out = jax.eval_shape(lambda v: backbone.apply(v, images), variables)
    assert [s.shape for s in out["stages"]] == [(2, 56, 56, 64), (2, 28, 28, 128), (2, 14, 14, 320), (2, 7, 7, 512)]
    sd = conv.flax_to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), variables["params"]))
    assert {"norm0.weight", "norm2.bias", "norm4.weight", "norm6.bias"} <= set(sd) and "head.weight" not in sd


def test_registry_overrides_and_logits_dtype():
    model = create_model("coc_tiny", num_classes=10, dtype="bfloat16", folds=[1, 1, 1, 1], denominator="count")
    assert model.folds == (1, 1, 1, 1) and model.dtype == jnp.bfloat16
    images = jnp.zeros((2, 32, 32, 3))
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), images)[0])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="no field 'fold'"):
        create_model("coc_tiny", fold=(1, 1, 1, 1))


def test_quickstart_size_error_names_the_field_and_fix():
    for name in ("coc_tiny", "coc_tiny_plain", "coc_small", "coc_medium"):  # 32x32 -> maps 8/4/2/1 divide
        _abstract(create_model(name, num_classes=10), 32)
    fix = r"folds\[0\]=7.*--config.model.kwargs.folds=1,1,1,1 with configs/coc_imagenet.py"
    with pytest.raises(ValueError, match=fix) as err:
        _abstract(create_model("coc_tiny2", num_classes=10), 32)
    assert "\n" not in str(err.value)
    _abstract(create_model("coc_tiny2", num_classes=10, folds=(1, 1, 1, 1)), 32)


# ----------------------------------------------------------------------------- converter


def test_round_trip_coc_tiny(tmp_path):
    sd = timm_state_dict((3, 4, 5, 2), (32, 64, 196, 320), (4, 4, 8, 8), 24)
    assert sum(v.size for v in sd.values()) == 5_570_584
    path = str(tmp_path / "coc_tiny.safetensors")
    save_file(sd, path)
    params = conv.convert(path, "coc_tiny")
    back = conv.flax_to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    w = sd["network.3.proj.weight"]  # the downsampler 64 -> 196: a k3 tap lands where Flax reads it
    assert params["backbone"]["downsample_2"]["kernel"][2, 1, 5, 7] == w[7, 5, 2, 1]
    w = sd["network.4.2.token_mixer.f.weight"]
    assert params["backbone"]["stage_2_block_2"]["token_mixer"]["f"]["kernel"][10, 20] == w[20, 10, 0, 0]
    w = sd["network.0.1.mlp.fc1.weight"]
    assert params["backbone"]["stage_0_block_1"]["mlp"]["fc1"]["kernel"][3, 9] == w[9, 3]


def test_legacy_pointwise_conv_mlp_is_accepted():
    arch = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), head_dim=4)
    sd = timm_state_dict(arch["depths"], arch["dims"], arch["num_heads"], 4, classes=3, seed=5)
    legacy = {k: (v[:, :, None, None] if ".mlp.fc" in k and k.endswith("weight") else v) for k, v in sd.items()}
    abstract = _abstract(cc.ContextClusterClassifier(num_classes=3, **arch), 32)
    a, b = conv.state_dict_to_flax(sd, abstract), conv.state_dict_to_flax(legacy, abstract)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_converter_errors_name_the_first_bad_key(tmp_path):
    arch = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_heads=(1, 1, 1, 1), head_dim=4)
    sd = timm_state_dict(arch["depths"], arch["dims"], arch["num_heads"], 4, classes=3)
    abstract = _abstract(cc.ContextClusterClassifier(num_classes=3, **arch), 32)
    with pytest.raises(ValueError, match=r"'network.2.0.token_mixer.v.weight' has shape \(4, 7, 1, 1\)"):
        conv.state_dict_to_flax(dict(sd, **{"network.2.0.token_mixer.v.weight": np.zeros((4, 7, 1, 1))}), abstract)
    with pytest.raises(ValueError, match="keys the model lacks, first 'network.0.1.norm1.weight'"):
        conv.state_dict_to_flax(dict(sd, **{"network.0.1.norm1.weight": np.zeros(8)}), abstract)
    with pytest.raises(ValueError, match="lacks 1 keys the model needs, first 'head.bias'"):
        conv.state_dict_to_flax({k: v for k, v in sd.items() if k != "head.bias"}, abstract)
    # The CLI refuses a depth-(1,1,1,1) checkpoint for the coc_tiny preset in one line.
    src = str(tmp_path / "small.safetensors")
    save_file(sd, src)
    with pytest.raises(SystemExit, match="^error: .*lacks"):
        conv.main(["--checkpoint", src, "--model", "coc_tiny", "--output", str(tmp_path / "o.safetensors")])


def test_pth_checkpoint_with_ema_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch")
    sd = timm_state_dict((3, 4, 5, 2), (32, 64, 196, 320), (4, 4, 8, 8), 24, seed=2)
    ema = {k: torch.from_numpy(v + 1) for k, v in sd.items()}
    path = str(tmp_path / "checkpoint.pth.tar")
    torch.save(
        {"epoch": 300, "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "state_dict_ema": ema}, path
    )
    np.testing.assert_array_equal(conv.flax_to_state_dict(conv.convert(path, "coc_tiny"))["head.bias"], sd["head.bias"])
    got = conv.flax_to_state_dict(conv.convert(path, "coc_tiny", ema=True))["head.bias"]
    np.testing.assert_array_equal(got, sd["head.bias"] + 1)


# ----------------------------------------------------------------------------- configs


def _load_config(arg):
    spec = importlib.util.spec_from_file_location("coc_imagenet_config", REPO / "configs" / "coc_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(arg)


def test_configs_select_model_and_recipe():
    module, config = _load_config("coc_small")
    assert set(module.MODELS) == set(cc.PRESETS)
    assert config.model.name == "coc_small"
    assert config.optim.base_lr == 1e-3 and config.optim.lr_base_batch_size == 1024
    assert config.num_epochs == 310.0 and config.optim.grad_clip_norm <= 0
    assert config.classification.label_smoothing == 0.1 and config.input.randaugment == "rand-m9-mstd0.5-inc1"
    _, quick = _load_config("coc_tiny2,quickstart")
    assert quick.model.name == "coc_tiny2" and quick.input.dataset == "digits"
    assert quick.model.kwargs.folds == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="coc_"):
        _load_config("pacavit_tiny_p2cconv_100_0")
