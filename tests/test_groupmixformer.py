"""GroupMixFormer: NumPy references (NCHW / (B, N, C) as upstream), checkpoint conversion, BatchNorm modes,
parameter counts of the published configurations, registry and configs."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from clusterformer_jax.convert import groupmixformer as conv
from clusterformer_jax.models import groupmixformer as gmf
from clusterformer_jax.models.registry import create_model, list_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- official state_dict layout


def official_shapes(dims, depths, mlp_ratios, classes=1000):
    """Parameter and buffer shapes of the official model (AILab-CVC/GroupMixFormer ``models/groupmixformer.py``)."""
    shapes = {}

    def bn(prefix, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def sep(prefix, cin, cout, k):
        shapes[f"{prefix}.conv1.weight"] = (cin, 1, k, k)
        shapes[f"{prefix}.pointwise_conv.weight"] = (cout, cin, 1, 1)

    mid = dims[0] // 2
    shapes["conv_stem.proj1.weight"], shapes["conv_stem.proj1.bias"] = (mid, 3, 3, 3), (mid,)
    bn("conv_stem.norm1", mid)
    shapes["conv_stem.proj2.weight"], shapes["conv_stem.proj2.bias"] = (dims[0], mid, 3, 3), (dims[0],)
    bn("conv_stem.norm2", dims[0])
    for i, (c, depth, ratio) in enumerate(zip(dims, depths, mlp_ratios)):
        sep(f"patch_embed_layers.{i}.proj", dims[i - 1] if i else c, c, 3)
        bn(f"patch_embed_layers.{i}.norm", c)
        s, ch = c // 5, c // 5 * 4 // 8
        hidden = int(c * ratio)
        for j in range(depth):
            p = f"groupmixformer_backbone.{i}.gma_stage.{j}."
            shapes[p + "cpe.proj.weight"], shapes[p + "cpe.proj.bias"] = (c, 1, 3, 3), (c,)
            for norm in ("norm1", "norm2"):
                shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (c,)
            shapes[p + "att.qkv.weight"], shapes[p + "att.qkv.bias"] = (3 * c, c), (3 * c,)
            shapes[p + "att.proj.weight"], shapes[p + "att.proj.bias"] = (c, c), (c,)
            for n, k in ((1, 3), (2, 5), (3, 7)):
                sep(p + f"att.aggregator.agg{n}", s, s, k)
            for n in range(4):
                bn(p + f"att.aggregator.norm{n}", s)
            sep(p + "att.aggregator.agg0.conv", 3 * s, s, 3)
            shapes[p + "att.aggregator.agg0.norm.weight"] = shapes[p + "att.aggregator.agg0.norm.bias"] = (s,)
            for n, (k, heads) in enumerate(((3, 2), (5, 3), (7, 3))):
                shapes[p + f"att.crpe.conv_list.{n}.weight"] = (heads * ch, 1, k, k)
                shapes[p + f"att.crpe.conv_list.{n}.bias"] = (heads * ch,)
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (hidden, c), (hidden,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (c, hidden), (c,)
    bn("norm4", dims[3])
    shapes["head.weight"], shapes["head.bias"] = (classes, dims[3]), (classes,)
    return shapes


def official_state_dict(shapes, seed=0):
    """Random values of a sensible scale for every key (weights ~ 1/sqrt(fan_in), positive variances)."""
    rng = np.random.RandomState(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif len(shape) >= 2:
            sd[key] = (rng.randn(*shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith("weight"):  # norm scales
            sd[key] = (1.0 + 0.1 * rng.randn(*shape)).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.randn(*shape)).astype(np.float32)
    return sd


def parameter_count(shapes):
    """What ``sum(p.numel() for p in model.parameters())`` counts: no BatchNorm buffers."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(buffers))


# ----------------------------------------------------------------------------- NumPy reference (upstream layout)


def np_conv2d(x, w, b=None, stride=1, pad=0, groups=1):
    """torch.nn.functional.conv2d on NCHW with OIHW weights."""
    bsz, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    xg = xp.reshape(bsz, groups, cin_g, *xp.shape[2:])
    wg = w.reshape(groups, cout // groups, cin_g, kh, kw)
    out = np.zeros((bsz, groups, cout // groups, ho, wo), np.float64)
    for i in range(kh):
        for j in range(kw):
            tap = xg[:, :, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            out += np.einsum("bgihw,goi->bgohw", tap, wg[:, :, :, i, j])
    out = out.reshape(bsz, cout, ho, wo)
    return out if b is None else out + b[None, :, None, None]


def np_bn(x, sd, p, train=False):
    """BatchNorm2d on NCHW: running stats in eval, biased batch statistics in training."""
    if train:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    else:
        mean, var = sd[p + "running_mean"], sd[p + "running_var"]
    x = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    return x * sd[p + "weight"][None, :, None, None] + sd[p + "bias"][None, :, None, None]


def np_ln(x, sd, p, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[p + "weight"] + sd[p + "bias"]


def np_hardswish(x):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def np_gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_linear(x, sd, p):
    return x @ sd[p + "weight"].T + sd[p + "bias"]


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_separable(x, sd, p, stride, pad):
    x = np_conv2d(x, sd[p + "conv1.weight"], None, stride, pad, groups=x.shape[1])
    return np_conv2d(x, sd[p + "pointwise_conv.weight"])


def np_aggregator(x, sd, p, size, num_head, train=False):
    """``Aggregator.forward``: x is (3B, N, C)."""
    bsz, n, c = x.shape
    h, w = size
    x = x.transpose(0, 2, 1).reshape(bsz, c, h, w)
    s = c // 5
    x = [x[:, i * s : (i + 1) * s] for i in range(5)]
    x_local = x[4].reshape(3, bsz // 3, s, h, w).transpose(1, 0, 2, 3, 4).reshape(bsz // 3, 3 * s, h, w)
    x_local = np_separable(x_local, sd, p + "agg0.conv.", 1, 1)
    b2, c2 = x_local.shape[:2]
    x_local = np_hardswish(np_ln(x_local.reshape(b2, c2, -1).transpose(0, 2, 1), sd, p + "agg0.norm.", 1e-5))
    x0 = np_hardswish(np_bn(x[0], sd, p + "norm0.", train))
    x1 = np_hardswish(np_bn(np_separable(x[1], sd, p + "agg1.", 1, 1), sd, p + "norm1.", train))
    x2 = np_hardswish(np_bn(np_separable(x[2], sd, p + "agg2.", 1, 2), sd, p + "norm2.", train))
    x3 = np_hardswish(np_bn(np_separable(x[3], sd, p + "agg3.", 1, 3), sd, p + "norm3.", train))
    x = np.concatenate([x0, x1, x2, x3], axis=1)
    c = c // 5 * 4
    x = x.reshape(3, bsz // 3, num_head, c // num_head, h * w).transpose(0, 1, 2, 4, 3)
    return x, x_local


def np_crpe(q, v, sd, p, size):
    """``ConvRelPosEnc.forward`` with window {3: 2, 5: 3, 7: 3}."""
    bsz, h, n, ch = q.shape
    hh, ww = size
    v_img = v.transpose(0, 1, 3, 2).reshape(bsz, h * ch, hh, ww)  # B h (H W) Ch -> B (h Ch) H W
    outs, start = [], 0
    for i, (k, heads) in enumerate(((3, 2), (5, 3), (7, 3))):
        part = v_img[:, start : start + heads * ch]
        outs.append(
            np_conv2d(
                part, sd[p + f"conv_list.{i}.weight"], sd[p + f"conv_list.{i}.bias"], 1, k // 2, groups=heads * ch
            )
        )
        start += heads * ch
    conv_v = np.concatenate(outs, axis=1).reshape(bsz, h, ch, hh * ww).transpose(0, 1, 3, 2)
    return q * conv_v


def np_efficient_att(x, sd, p, size, num_heads=8, train=False):
    """``EfficientAtt.forward``: x is (B, N, C)."""
    bsz, n, c = x.shape
    scale = (c // num_heads) ** -0.5
    qkv = np_linear(x, sd, p + "qkv.").reshape(bsz, n, 3, c).transpose(2, 0, 1, 3).reshape(3 * bsz, n, c)
    qkv, x_agg0 = np_aggregator(qkv, sd, p + "aggregator.", size, num_heads, train)
    q, k, v = qkv[0], qkv[1], qkv[2]
    k_softmax = np_softmax(k, axis=2)
    kv = np.einsum("bhnk,bhnv->bhkv", k_softmax, v)
    eff = np.einsum("bhnk,bhkv->bhnv", q, kv)
    crpe = np_crpe(q, v, sd, p + "crpe.", size)
    x = (scale * eff + crpe).transpose(0, 2, 1, 3).reshape(bsz, n, c // 5 * 4)
    x = np.concatenate([x, x_agg0], axis=-1)
    return np_linear(x, sd, p + "proj.")


def np_model(images, sd, depths):
    """``GroupMixFormer.forward`` (eval) on NCHW images: (logits, [4 NCHW stage maps])."""
    x = np_hardswish(
        np_bn(np_conv2d(images, sd["conv_stem.proj1.weight"], sd["conv_stem.proj1.bias"], 2, 1), sd, "conv_stem.norm1.")
    )
    x = np_hardswish(
        np_bn(np_conv2d(x, sd["conv_stem.proj2.weight"], sd["conv_stem.proj2.bias"], 2, 1), sd, "conv_stem.norm2.")
    )
    bsz, outs = x.shape[0], []
    for i, depth in enumerate(depths):
        p = f"patch_embed_layers.{i}."
        x = np_hardswish(np_bn(np_separable(x, sd, p + "proj.", 2 if i else 1, 1), sd, p + "norm."))
        _, c, h, w = x.shape
        x = x.reshape(bsz, c, h * w).transpose(0, 2, 1)
        for j in range(depth):
            p = f"groupmixformer_backbone.{i}.gma_stage.{j}."
            feat = x.transpose(0, 2, 1).reshape(bsz, c, h, w)
            feat = np_conv2d(feat, sd[p + "cpe.proj.weight"], sd[p + "cpe.proj.bias"], 1, 1, groups=c) + feat
            x = feat.reshape(bsz, c, h * w).transpose(0, 2, 1)
            x = x + np_efficient_att(np_ln(x, sd, p + "norm1.", 1e-6), sd, p + "att.", (h, w))
            y = np_linear(np_gelu(np_linear(np_ln(x, sd, p + "norm2.", 1e-6), sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")
            x = x + y
        x = x.reshape(bsz, h, w, c).transpose(0, 3, 1, 2)
        outs.append(x)
    pooled = np_bn(outs[-1], sd, "norm4.").mean(axis=(2, 3))
    return np_linear(pooled, sd, "head."), outs


# ----------------------------------------------------------------------------- helpers

_ATT_PREFIX = "groupmixformer_backbone.0.gma_stage.0.att."


def _abstract(model, shape):
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros(shape, jnp.float32)))


def _att_variables(sd, abstract):
    """Converts the ``att.*`` keys of a block into variables of a standalone ``GroupMixAttention``."""
    wrap = {c: {"backbone": {"stage_0_block_0": {"att": t}}} for c, t in abstract.items()}
    full = conv.state_dict_to_flax(sd, wrap)
    return {c: t["backbone"]["stage_0_block_0"]["att"] for c, t in full.items()}


def _att_state_dict(dim, seed):
    shapes = official_shapes((dim, 10, 10, 10), (1, 0, 0, 0), (4, 4, 4, 4))
    sd = official_state_dict(shapes, seed)
    return {k: v for k, v in sd.items() if k.startswith(_ATT_PREFIX)}


# ----------------------------------------------------------------------------- Group-Mix Attention


@pytest.mark.parametrize("train", [False, True])
def test_group_mix_attention_matches_numpy(train):
    dim, b, h, w = 40, 2, 4, 6  # s = 8, 8 heads of Ch = 4; a non-square map catches H/W mix-ups
    sd = _att_state_dict(dim, seed=1)
    module = gmf.GroupMixAttention(dim)
    x = np.random.RandomState(2).randn(b, h, w, dim).astype(np.float32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(x), False))
    variables = _att_variables(sd, abstract)
    apply = jax.jit(lambda v, x: module.apply(v, x, train, mutable=["batch_stats"] if train else False))
    got = apply(variables, jnp.asarray(x))
    got, updated = got if train else (got, None)

    local = {k[len(_ATT_PREFIX) :]: v.astype(np.float64) for k, v in sd.items()}
    want = np_efficient_att(x.reshape(b, h * w, dim).astype(np.float64), local, "", (h, w), train=train)
    np.testing.assert_allclose(np.asarray(got).reshape(b, h * w, dim), want, rtol=1e-5, atol=1e-5)
    if train:
        # batch statistics are shared by q, k and v: norm0 sees all 3B segment-0 maps
        qkv = x.reshape(b, h * w, dim) @ sd[_ATT_PREFIX + "qkv.weight"].T + sd[_ATT_PREFIX + "qkv.bias"]
        seg0 = qkv.reshape(b, h * w, 3, dim)[..., :8].transpose(2, 0, 1, 3).reshape(-1, 8)
        old = sd[_ATT_PREFIX + "aggregator.norm0.running_mean"]
        new = updated["batch_stats"]["aggregator"]["norm0"]["mean"]
        np.testing.assert_allclose(np.asarray(new), 0.9 * old + 0.1 * seg0.mean(0), rtol=1e-5, atol=1e-6)
        old_var = sd[_ATT_PREFIX + "aggregator.norm0.running_var"]
        new_var = updated["batch_stats"]["aggregator"]["norm0"]["var"]  # Flax: biased batch variance
        np.testing.assert_allclose(np.asarray(new_var), 0.9 * old_var + 0.1 * seg0.var(0), rtol=1e-5, atol=1e-6)


def test_heads_fall_on_segment_boundaries():
    """Zeroing segment 3 (the k7 proxies) of q|k|v changes only heads 6-7, in NumPy and in Flax."""
    dim, b, h, w = 40, 2, 3, 3
    sd = _att_state_dict(dim, seed=3)
    local = {k[len(_ATT_PREFIX) :]: v.astype(np.float64) for k, v in sd.items()}
    x = np.random.RandomState(4).randn(3 * b, h * w, dim)
    cut = x.copy()
    cut[:, :, 24:32] = 0.0
    ref_a, _ = np_aggregator(x, local, "aggregator.", (h, w), 8)
    ref_b, _ = np_aggregator(cut, local, "aggregator.", (h, w), 8)
    assert (np.abs(ref_a - ref_b).max(axis=(0, 1, 3, 4)) > 0).tolist() == [False] * 6 + [True] * 2

    module = gmf.Aggregator(dim)
    maps = [jnp.asarray(t.reshape(3 * b, h, w, dim), jnp.float32) for t in (x, cut)]
    variables = jax.jit(module.init, static_argnums=2)(jax.random.PRNGKey(0), maps[0], False)
    apply = jax.jit(lambda v, m: module.apply(v, m, False)[0])
    got_a, got_b = (apply(variables, m) for m in maps)
    heads = np.abs(np.asarray(got_a - got_b)).reshape(3, b, h * w, 8, 4).max(axis=(0, 1, 2, 4))
    assert (heads > 0).tolist() == [False] * 6 + [True] * 2


# ----------------------------------------------------------------------------- whole model + converter


_TINY = dict(num_classes=7, dims=(20, 30, 40, 40), depths=(1, 1, 2, 1), mlp_ratios=(4, 4, 2, 2))
_TINY_MODEL = gmf.GroupMixFormer(**_TINY)
_TINY_IMAGES = np.random.RandomState(6).rand(2, 32, 64, 3).astype(np.float32)  # stage maps 8x16 ... 1x2


def _is_backbone(module, method_name):
    return isinstance(module, gmf.GroupMixFormerBackbone)


@jax.jit
def _tiny_eval(variables, images):
    """Eval logits and the backbone's stage maps of the shared tiny model (compiled once per test run)."""
    logits, inter = _TINY_MODEL.apply(variables, images, capture_intermediates=_is_backbone, mutable=["intermediates"])
    return logits, inter["intermediates"]["backbone"]["__call__"][0]["stages"]


def _tiny_state_dict():
    return official_state_dict(official_shapes(_TINY["dims"], _TINY["depths"], _TINY["mlp_ratios"], 7), seed=5)


def test_model_from_official_state_dict_matches_numpy():
    sd = _tiny_state_dict()
    variables = conv.state_dict_to_flax(sd, _abstract(_TINY_MODEL, _TINY_IMAGES.shape))
    logits, stages = _tiny_eval(variables, jnp.asarray(_TINY_IMAGES))
    sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
    want_logits, want_stages = np_model(_TINY_IMAGES.transpose(0, 3, 1, 2).astype(np.float64), sd64, _TINY["depths"])
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7)
    assert len(stages) == 4
    for got, want in zip(stages, want_stages):
        assert got.shape == want.transpose(0, 2, 3, 1).shape
        np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)


def test_round_trip_miny(tmp_path):
    shapes = official_shapes((40, 80, 160, 160), (3, 3, 12, 4), (4, 4, 4, 4))
    sd = official_state_dict(shapes, seed=7)
    path = str(tmp_path / "groupmixformer_miny.safetensors")
    save_file(sd, path)
    variables = conv.convert(path, "gmf_miny")
    assert set(variables) == {"params", "batch_stats"}
    back = conv.flax_to_state_dict(variables)
    assert sorted(back) == sorted(sd)
    for key in sd:
        if key.endswith("num_batches_tracked"):
            assert back[key].shape == () and back[key].dtype == np.int64
        else:
            np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    # where the layouts put single entries
    p = variables["params"]["backbone"]
    w = sd["conv_stem.proj2.weight"]  # (O, I, kh, kw) -> (kh, kw, I, O)
    assert p["conv_stem"]["proj2"]["kernel"][2, 0, 5, 7] == w[7, 5, 2, 0]
    w = sd["groupmixformer_backbone.2.gma_stage.3.att.qkv.weight"]  # Linear (O, I) -> (I, O)
    assert p["stage_2_block_3"]["att"]["qkv"]["kernel"][10, 100] == w[100, 10]
    w = sd["groupmixformer_backbone.1.gma_stage.0.att.crpe.conv_list.2.weight"]  # depthwise (C, 1, k, k)
    assert p["stage_1_block_0"]["att"]["crpe"]["conv_list_2"]["kernel"][6, 1, 0, 11] == w[11, 0, 6, 1]
    stats = variables["batch_stats"]["backbone"]["stage_0_block_2"]["att"]["aggregator"]["norm3"]
    key = "groupmixformer_backbone.0.gma_stage.2.att.aggregator.norm3.running_var"
    np.testing.assert_array_equal(stats["var"], sd[key])


def test_converter_errors_name_the_key(tmp_path, monkeypatch):
    dims, depths, ratios = (20, 30, 40, 40), (1, 1, 1, 1), (4, 4, 4, 4)
    shapes = official_shapes(dims, depths, ratios)
    sd = official_state_dict(shapes)
    model = gmf.GroupMixFormer(dims=dims, depths=depths, mlp_ratios=ratios)
    abstract = _abstract(model, (1, 32, 32, 3))
    bad = dict(sd, **{"norm4.running_var": np.ones((41,), np.float32)})
    with pytest.raises(ValueError, match=r"'norm4.running_var' has shape \(41,\)"):
        conv.state_dict_to_flax(bad, abstract)
    with pytest.raises(ValueError, match="keys the model lacks, first 'extra.weight'"):
        conv.state_dict_to_flax(dict(sd, **{"extra.weight": np.zeros(1)}), abstract)
    missing = {k: v for k, v in sd.items() if k != "conv_stem.norm1.running_mean"}
    with pytest.raises(ValueError, match="lacks 1 keys the model needs, first 'conv_stem.norm1.running_mean'"):
        conv.state_dict_to_flax(missing, abstract)
    # the CLI refuses a checkpoint of another configuration with one line
    src = str(tmp_path / "tiny.safetensors")
    save_file(sd, src)
    monkeypatch.setattr(sys, "argv", ["x", "--checkpoint", src, "--model", "gmf_miny", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        conv.main()
    message = str(exit_info.value.code)
    assert message.startswith("error: checkpoint") and "\n" not in message
    with pytest.raises(ValueError, match="needs PyTorch|unsupported"):
        if importlib.util.find_spec("torch") is None:
            conv.read_checkpoint(str(tmp_path / "x.pth"))
        else:
            conv.read_checkpoint(str(tmp_path / "x.ckpt"))


def test_pth_checkpoint_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch")
    shapes = official_shapes((20, 30, 40, 40), (1, 1, 1, 1), (4, 4, 4, 4))
    sd = official_state_dict(shapes, seed=8)
    path = str(tmp_path / "groupmixformer.pth")
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)
    model = gmf.GroupMixFormer(dims=(20, 30, 40, 40), depths=(1, 1, 1, 1))
    variables = conv.state_dict_to_flax(conv.read_checkpoint(path), _abstract(model, (1, 32, 32, 3)))
    np.testing.assert_array_equal(conv.flax_to_state_dict(variables)["head.weight"], sd["head.weight"])


# ----------------------------------------------------------------------------- BatchNorm modes, outputs


def test_train_updates_batch_stats_and_eval_uses_them():
    variables = conv.state_dict_to_flax(_tiny_state_dict(), _abstract(_TINY_MODEL, _TINY_IMAGES.shape))
    images = jnp.asarray(_TINY_IMAGES)
    train = jax.jit(lambda v, x: _TINY_MODEL.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updated = train(variables, images)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7)
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(updated["batch_stats"])
    assert len(old) == len(new) == 2 * (2 + 4 + 4 * sum(_TINY["depths"]) + 1)  # stem, embeds, blocks, norm4
    assert all(not np.allclose(a, b) for a, b in zip(old, new))
    # the stem's first BatchNorm: running mean <- 0.9 old + 0.1 batch mean of the conv output
    proj1 = variables["params"]["backbone"]["conv_stem"]["proj1"]
    w, b = proj1["kernel"], proj1["bias"]
    pre = (
        jax.lax.conv_general_dilated(images, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        + b
    )
    stem = variables["batch_stats"]["backbone"]["conv_stem"]["norm1"]["mean"]
    np.testing.assert_allclose(
        updated["batch_stats"]["backbone"]["conv_stem"]["norm1"]["mean"],
        0.9 * stem + 0.1 * np.asarray(pre).mean(axis=(0, 1, 2)),
        rtol=1e-5,
        atol=1e-6,
    )
    a, _ = _tiny_eval({"params": variables["params"], **updated}, images)
    b, _ = _tiny_eval(variables, images)
    assert not np.allclose(a, b)  # eval reads the running statistics, not the batch's
    np.testing.assert_array_equal(a, _tiny_eval({"params": variables["params"], **updated}, images)[0])


def test_backbone_stage_shapes_and_bfloat16():
    backbone = gmf.GroupMixFormerBackbone(dims=(20, 30, 40, 50), depths=(1, 1, 1, 1))
    out = jax.eval_shape(lambda: backbone.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 64, 96, 3))))[0]
    assert [s.shape for s in out["stages"]] == [(2, 16, 24, 20), (2, 8, 12, 30), (2, 4, 6, 40), (2, 2, 3, 50)]
    model = create_model("gmf_miny", num_classes=10, dtype="bfloat16")
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))[0]
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    model = gmf.GroupMixFormer(
        num_classes=3, dims=(20, 20, 20, 20), depths=(1, 1, 1, 1), drop_path_rate=0.1, remat=True
    )
    key = jax.random.PRNGKey(0)
    logits = jax.eval_shape(
        lambda: model.init_with_output({"params": key, "dropout": key}, jnp.zeros((2, 32, 32, 3)), train=True)
    )[0]
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match="multiple of 10"):
        jax.eval_shape(
            lambda: gmf.GroupMixFormerBackbone(dims=(25, 30, 40, 50)).init(
                jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
            )
        )


# ----------------------------------------------------------------------------- published configurations

PUBLISHED = {  # name: (count in M of the official model's parameters, the upstream README's count)
    "gmf_miny": (5.733, 5.7),
    "gmf_tiny": (10.949, 11.0),
    "gmf_small": (22.421, 22.4),
    "gmf_base": (45.827, 45.8),
    "gmf_large": (71.834, 70.3),  # the yaml as released; the README's 70.3M comes from another config
}


def test_parameter_counts_of_published_configs():
    """Every preset's official parameter shapes count what the upstream README states; the model of the smallest
    preset (the others differ only in widths and depths) has exactly those shapes' count."""
    for name, (computed, readme) in PUBLISHED.items():
        preset = gmf.PRESETS[name]
        spec = official_shapes(preset["dims"], preset["depths"], preset["mlp_ratios"])
        count = parameter_count(spec)
        assert round(count / 1e6, 3) == computed, name
        if name != "gmf_large":
            assert abs(count / 1e6 - readme) < 0.06, name  # the README rounds 10.949M to 11.0M
        if name == "gmf_miny":
            abstract = _abstract(create_model(name), (1, 32, 32, 3))
            assert sum(x.size for x in jax.tree_util.tree_leaves(abstract["params"])) == count
            stats = sum(x.size for x in jax.tree_util.tree_leaves(abstract["batch_stats"]))
            running = [s for k, s in spec.items() if k.endswith(("running_mean", "running_var"))]
            assert stats == sum(int(np.prod(s)) for s in running)


def test_registry_names_and_overrides():
    assert {"gmf_miny", "gmf_tiny", "gmf_small", "gmf_base", "gmf_large"} <= set(list_models())
    model = create_model("gmf_small", num_classes=10, dims=[40, 80, 160, 160], drop_path_rate=0.3)
    assert model.dims == (40, 80, 160, 160) and model.depths == (2, 4, 12, 4) and model.drop_path_rate == 0.3
    with pytest.raises(ValueError, match="has no field 'num_iters'"):
        create_model("gmf_small", num_iters=3)


def _load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def test_configs():
    config = _load_config("gmf_imagenet.py", "gmf_small")
    assert config.model.name == "gmf_small" and config.batch_size == 512
    assert config.optim.base_lr == 5e-4 and config.optim.lr_base_batch_size == 512
    assert config.optim.base_lr * config.optim.warmup_start_ratio == pytest.approx(5e-7)
    assert config.optim.base_lr * config.optim.min_lr_ratio == pytest.approx(5e-6)
    assert _load_config("gmf_imagenet.py", "miny").model.name == "gmf_miny"
    with pytest.raises(ValueError, match="gmf_huge"):
        _load_config("gmf_imagenet.py", "gmf_huge")
    # the quickstart switches to GroupMixFormer-M with one override; 32x32 gives stage maps 8/4/2/1
    quick = _load_config("quickstart.py")
    kwargs = {k: v for k, v in quick.model.kwargs.to_dict().items() if v is not None}
    model = create_model("gmf_miny", num_classes=10, **kwargs)
    size = quick.input.image_size
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3))))[0]
    assert logits.shape == (2, 10)
