"""ClusterFormer model tests: values against NumPy references, scan semantics, shapes, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax import runtime
from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models import clustering, dispatch, em, kernels, layers, layout
from clusterformer_jax.models.clustering import MixerConfig
from clusterformer_jax.models.clusterformer import ClusterFormerBackbone
from clusterformer_jax.models.registry import create_backbone, create_model, list_models
from tests import presets
from tests import reference_numpy as ref


def _count(tree) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


def _mixer(dim, heads, windows=1, **config):
    return clustering.ClusteringMixer(dim, heads, windows, MixerConfig(**config))


def _abstract_params(model, size):
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))["params"]


# ----------------------------------------------------------------------------- adaptive pooling


@pytest.mark.parametrize(
    "in_size,out_size,expected",
    [
        (7, 2, [(0, 4), (3, 7)]),
        (7, 4, [(0, 2), (1, 4), (3, 6), (5, 7)]),
        (7, 10, [(0, 1), (0, 2), (1, 3), (2, 3), (2, 4), (3, 5), (4, 5), (4, 6), (5, 7), (6, 7)]),
        (8, 2, [(0, 4), (4, 8)]),
    ],
)
def test_adaptive_pool_bins_follow_pytorch(in_size, out_size, expected):
    assert layers.adaptive_pool_bins(in_size, out_size) == expected


@pytest.mark.parametrize("in_hw,out_hw", [((7, 7), (10, 10)), ((7, 5), (2, 4)), ((4, 4), (4, 4))])
def test_adaptive_avg_pool_values(in_hw, out_hw):
    x = np.random.RandomState(0).randn(3, *in_hw, 5).astype(np.float32)
    got = layers.adaptive_avg_pool(jnp.asarray(x), out_hw)
    want = ref.adaptive_avg_pool_nchw(x.transpose(0, 3, 1, 2), *out_hw).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- EM step (Eq. 3)


def _em_scan(num_iters, **kwargs):
    return em.em_scan(clustering.EMStep, num_iters, num_broadcast=2, remat=True, unroll=1, **kwargs)


@pytest.mark.parametrize("axis", ["clusters", "tokens"])
@pytest.mark.parametrize("num_iters", [1, 3])
def test_em_matches_numpy_eq3(axis, num_iters):
    rng = np.random.RandomState(1)
    g, k, n, e = 3, 5, 11, 8
    centers, keys, values = (rng.randn(g, m, e).astype(np.float32) for m in (k, n, n))
    module = _em_scan(num_iters, head_dim=e, heads=1, estep_axis=axis)
    params = module.init(jax.random.PRNGKey(0), centers, keys, values)
    got, _ = module.apply(params, centers, keys, values)
    w = np.asarray(params["params"]["conv_c"]["kernel"])
    bias = np.asarray(params["params"]["conv_c"]["bias"])
    want = ref.em_steps(centers, keys, values, w, bias, num_iters, axis)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    if axis == "clusters":  # the soft assignment of one E-step sums to one over the K centers
        logits = (centers @ w + bias) @ keys.transpose(0, 2, 1)
        np.testing.assert_allclose(ref.softmax(logits, 1).sum(1), 1.0, rtol=1e-6)


def test_em_mean_mstep_normalises_by_mass():
    rng = np.random.RandomState(2)
    centers, keys = rng.randn(2, 4, 6).astype(np.float32), rng.randn(2, 9, 6).astype(np.float32)
    values = np.ones((2, 9, 6), np.float32)  # a mass-normalised mean of ones is exactly one
    module = _em_scan(2, head_dim=6, heads=1, mstep="mean", query_proj=False)
    params = module.init(jax.random.PRNGKey(0), centers, keys, values)
    out, _ = module.apply(params, centers, keys, values)
    np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-5)


def test_scan_equals_unrolled_loop_and_params_do_not_grow_with_t():
    rng = np.random.RandomState(3)
    centers, keys, values = (rng.randn(2, m, 8).astype(np.float32) for m in (4, 10, 10))
    kwargs = dict(head_dim=8, heads=1, estep_axis="clusters")
    scanned = _em_scan(4, **kwargs)
    params = scanned.init(jax.random.PRNGKey(5), centers, keys, values)
    got, _ = scanned.apply(params, centers, keys, values)
    step = clustering.EMStep(**kwargs)
    c = centers
    for _ in range(4):
        c, _ = step.apply(params, c, keys, values)
    np.testing.assert_allclose(np.asarray(got), np.asarray(c), rtol=1e-6, atol=1e-6)

    counts = {t: _count(_abstract_params(create_model("clusterformer_nano", num_iters=t), 32)) for t in (1, 3, 6)}
    assert len(set(counts.values())) == 1, counts


# ----------------------------------------------------------------------------- full mixer parity


def _torch_layout(params):
    """Flax mixer params -> the released state_dict layout (1x1 conv weights (out, in, 1, 1))."""
    sd = {}
    for name in ("conv1", "conv_v", "conv_f", "conv2"):
        sd[f"{name}.weight"] = np.asarray(params[name]["kernel"]).T[:, :, None, None]
        sd[f"{name}.bias"] = np.asarray(params[name]["bias"])
    if "conv_c" in params.get("em", {}):
        sd["conv_c.weight"] = np.asarray(params["em"]["conv_c"]["kernel"]).T[:, :, None, None]
        sd["conv_c.bias"] = np.asarray(params["em"]["conv_c"]["bias"])
    sd["sim_alpha"] = np.asarray(params["sim_alpha"])
    sd["sim_beta"] = np.asarray(params["sim_beta"])
    return sd


@pytest.mark.parametrize(
    "variant,windows,size,center_hw",
    # 2x2 maps pooled to 4x4 centers give identical centers, so the dispatch argmax meets exact ties
    [("clusters", 2, 8, (10, 10)), ("clusters", 1, 6, (3, 3)), ("tokens", 2, 8, (5, 5)), ("clusters", 2, 4, (4, 4))],
)
def test_raw_mixer_matches_released_forward(variant, windows, size, center_hw):
    dim, heads, e = 12, 2, 8
    mixer = _mixer(
        dim,
        heads,
        windows,
        head_dim=e,
        centers=center_hw,
        num_iters=3,
        estep_axis=variant,
        query_proj=variant == "clusters",
        partition="raw",
    )
    x = np.random.RandomState(4).randn(2, size, size, dim).astype(np.float32)
    params = mixer.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    params = dict(params, sim_alpha=jnp.array([1.7]), sim_beta=jnp.array([-0.3]))
    got, centers = mixer.apply({"params": params}, jnp.asarray(x))
    want = ref.official_clustering(
        x.transpose(0, 3, 1, 2).astype(np.float64),
        _torch_layout(params),
        heads,
        e,
        windows,
        center_hw,
        3,
        variant,
    )
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=2e-4, atol=2e-5)
    assert centers.shape == (2, windows * windows * center_hw[0] * center_hw[1], heads * e)


def _dense_dispatch(token_dirs, center_dirs, alpha, beta, values, center_values):
    """The released dispatch as written there: sim * one-hot mask and two dense K x N x e products."""
    sim = jax.nn.sigmoid(beta + alpha * jnp.einsum("gke,gne->gkn", center_dirs, token_dirs))
    mask = jax.nn.one_hot(jnp.argmax(sim, axis=1), center_dirs.shape[1], axis=1)
    sim = sim * mask
    agg = (jnp.einsum("gkn,gne->gke", sim, values) + center_values) / (mask.sum(2, keepdims=True) + 1.0)
    return jnp.einsum("gkn,gke->gne", sim, agg)


def test_first_argmax_equals_argmax_with_ties():
    x = jnp.asarray(np.random.RandomState(3).randint(0, 3, (5, 7, 6)), jnp.float32)  # many tied maxima
    for axis in range(3):
        np.testing.assert_array_equal(layers.first_argmax(x, axis), jnp.argmax(x, axis=axis))


@pytest.mark.parametrize("impl", ["scatter", "onehot"])
def test_gather_dispatch_equals_dense_form_with_gradients(impl):
    rng = np.random.RandomState(7)
    g, k, n, e = 4, 9, 13, 5
    dirs = [layers.l2_normalize(jnp.asarray(rng.randn(g, m, e), jnp.float32)) for m in (n, k)]
    dirs[1] = dirs[1].at[:, 3].set(dirs[1][:, 1])  # duplicate centers: ties must go to the first index
    values, center_values = (jnp.asarray(rng.randn(g, m, e), jnp.float32) for m in (n, k))
    args = (*dirs, jnp.array([2.5]), jnp.array([-0.4]), values, center_values)
    # ours takes the token directions channel-first
    ours = lambda t, *rest: dispatch.hard_dispatch(jnp.swapaxes(t, 1, 2), *rest, impl=impl)  # noqa: E731
    np.testing.assert_allclose(ours(*args), _dense_dispatch(*args), rtol=1e-5, atol=1e-6)
    probe = jnp.asarray(rng.randn(g, n, e), jnp.float32)
    grads = [
        jax.grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=tuple(range(6)))(*args) for fn in (ours, _dense_dispatch)
    ]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("over_clusters,scale", [(True, 1.0), (False, 0.25)])
def test_soft_assign_sum_vjp_equals_autodiff(over_clusters, scale):
    rng = np.random.RandomState(9)
    g, k, n, e = 3, 6, 11, 4
    q, keys, values = (jnp.asarray(rng.randn(g, m, e), jnp.float32) for m in (k, n, n))
    probe = jnp.asarray(rng.randn(g, k, e), jnp.float32)

    def plain(q, keys, values):
        logits = scale * jnp.einsum("gke,gne->gkn", q, keys)
        return jnp.einsum("gkn,gne->gke", jax.nn.softmax(logits, axis=1 if over_clusters else 2), values)

    custom = lambda *a: kernels.soft_assign_sum(*a, over_clusters, scale)  # noqa: E731
    np.testing.assert_allclose(custom(q, keys, values), plain(q, keys, values), rtol=1e-5, atol=1e-6)
    grads = [jax.grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=(0, 1, 2))(q, keys, values) for fn in (custom, plain)]
    for got, want in zip(*grads):
        assert float(jnp.max(jnp.abs(want))) > 1e-2  # every input gets a real gradient
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_affine_sigmoid_vjp_equals_autodiff():
    rng = np.random.RandomState(8)
    cos, probe = (jnp.asarray(rng.uniform(-1, 1, (3, 7, 5)), jnp.float32) for _ in range(2))
    alpha, beta = jnp.array([1.3]), jnp.array([0.2])
    loss = lambda fn: lambda c, a, b: jnp.sum(fn(c, a, b) * probe)  # noqa: E731
    got = jax.grad(loss(kernels.affine_sigmoid), argnums=(0, 1, 2))(cos, alpha, beta)
    want = jax.grad(loss(lambda c, a, b: jax.nn.sigmoid(b + a * c)), argnums=(0, 1, 2))(cos, alpha, beta)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_em_remat_and_unroll_change_no_number():
    x = jnp.asarray(np.random.RandomState(9).randn(2, 8, 8, 12), jnp.float32)
    results = []
    for remat, unroll in ((False, 1), (True, 1), (True, 3)):  # rolled, rematted rolled and unrolled
        mixer = _mixer(12, 2, 2, head_dim=6, centers=(3, 3), em_remat=remat, em_unroll=unroll)
        params = mixer.init(jax.random.PRNGKey(0), x)
        loss = lambda p: jnp.sum(jnp.sin(mixer.apply(p, x)[0]))  # noqa: E731
        results.append((loss(params), jax.grad(loss)(params)))
    for other in results[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[0], other)


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # the released layout and dispatch
        dict(estep_axis="tokens"),  # the flash layout mixes the heads of one window: chunks keep them together
        dict(partition="spatial", dispatch="paper", center_ffn=True, mstep="mean"),
    ],
)
def test_group_chunks_change_no_number(variant):
    x = jnp.asarray(np.random.RandomState(4).randn(2, 8, 8, 12), jnp.float32)  # G = 2 images * 2 heads * 4
    results = []
    for group_chunk in (16, 2):  # one pass; a loop over chunks of one window's heads (the smallest chunk)
        mixer = _mixer(12, 2, 2, head_dim=6, centers=(3, 3), em_unroll=3, group_chunk=group_chunk, **variant)
        params = mixer.init(jax.random.PRNGKey(0), x)
        loss = lambda p: jnp.sum(jnp.sin(mixer.apply(p, x)[0])) + jnp.sum(mixer.apply(p, x)[1] ** 2)  # noqa: E731
        text = jax.jit(loss).lower(params).as_text()
        assert ("while" in text) == (group_chunk < 16)
        # one compiled program per chunking: op by op (every primitive compiled on its own) took ~1.4x the CPU
        results.append(jax.jit(lambda p: (mixer.apply(p, x), jax.grad(loss)(p)))(params))  # noqa: B023
    for other in results[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), results[0], other)


def test_group_chunk_resolution():
    def per_chunk(groups, heads, assignment_size, **config):
        return MixerConfig(**config).groups_per_chunk(groups, heads, assignment_size)

    # explicit: the largest multiple of heads that divides the groups and is at most the request
    assert per_chunk(1536, 3, 4900, group_chunk=48) == 48
    assert per_chunk(1536, 3, 4900, group_chunk=50) == 48
    assert per_chunk(24, 3, 10, group_chunk=4) == 3
    assert per_chunk(24, 3, 10, group_chunk=2) == 24  # no multiple of 3 fits: one pass
    assert per_chunk(24, 3, 10, group_chunk=1000) == 24
    # by bytes: the (K, N) float32 assignments of one chunk within group_chunk_bytes
    mib = runtime.GROUP_CHUNK_BYTES
    assert per_chunk(1536, 3, 100 * 49, group_chunk_bytes=mib) == 48  # 1 MiB / 19600 B = 53 -> 48 divides 1536
    assert per_chunk(192, 24, 100 * 49, group_chunk_bytes=mib) == 48  # 53 -> the multiple of 24 heads below it
    assert per_chunk(192, 24, 100 * 4900, group_chunk_bytes=mib) == 24  # chunks never split a window's heads
    assert per_chunk(64, 2, 16 * 64, group_chunk_bytes=mib) == 64  # everything fits: one pass
    assert per_chunk(1536, 3, 100 * 49, group_chunk=6, group_chunk_bytes=mib) == 6  # explicit wins
    assert per_chunk(1536, 3, 100 * 49) == 1536  # neither: all groups at once
    with pytest.raises(ModelConfigError, match="group_chunk=0 must be >= 1"):
        MixerConfig(group_chunk=0).validate()


def test_execution_settings_are_resolved_from_the_machine_not_the_model():
    one_cpu = runtime.execution_settings("cpu", 1, "glibc")
    assert one_cpu == dict(
        depthwise_impl="shifted",
        remat_impl="tied",
        em_unroll=1,
        group_chunk_bytes=1 << 20,
        norm_impl="grouped",
        dispatch_impl="scatter",
    )
    assert runtime.execution_settings("cpu", 1, "tcmalloc")["em_unroll"] is None  # all T: no loop
    assert runtime.execution_settings("cpu", 8, "glibc")["group_chunk_bytes"] is None  # the group axis is sharded
    accelerator = dict(
        depthwise_impl="grouped", remat_impl="barrier", em_unroll=None, group_chunk_bytes=None, norm_impl="ungrouped"
    )
    assert runtime.execution_settings("gpu", 1, "glibc") == dict(accelerator, dispatch_impl="scatter")
    assert runtime.execution_settings("tpu", 8, "tcmalloc") == dict(accelerator, dispatch_impl="onehot")
    # only the fields a model has; what the user set wins
    resolved = runtime.with_execution_settings(
        {"remat_impl", "em_unroll", "num_iters"}, {"em_unroll": 2, "num_iters": None}, backend="cpu", num_devices=1
    )
    assert resolved == {"em_unroll": 2, "num_iters": None, "remat_impl": "tied"}


def test_create_model_takes_this_machines_execution_settings_unless_passed():
    here = runtime.execution_settings()  # the test process: CPU, 8 virtual devices
    assert create_model("gmf_miny").depthwise_impl == here["depthwise_impl"] == "shifted"
    assert create_backbone("paca_tiny").remat_impl == here["remat_impl"] == "tied"
    mixer = create_model("clusterformer_nano").backbone["mixer"]
    assert (mixer.em_unroll, mixer.group_chunk_bytes) == (here["em_unroll"], here["group_chunk_bytes"])
    # what the caller passes wins, None included (the trainer passes settings resolved for its target machine)
    assert create_model("gmf_miny", depthwise_impl="grouped").depthwise_impl == "grouped"
    assert create_backbone("paca_tiny", remat_impl="barrier").remat_impl == "barrier"
    assert create_model("clusterformer_nano", em_unroll=None).backbone["mixer"].em_unroll is None


@pytest.mark.parametrize("kernel,stride", [(3, 1), (5, 1), (7, 1), (3, 2)])
def test_depthwise_shifted_sums_equal_grouped_conv(kernel, stride):
    x = jnp.asarray(np.random.RandomState(kernel).randn(2, 9, 9, 6), jnp.float32)
    results = []
    for impl in ("shifted", "grouped"):
        conv = layers.DepthwiseConv(kernel, stride, impl=impl)
        params = conv.init(jax.random.PRNGKey(0), x)
        loss = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))  # noqa: E731
        results.append((conv.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *results)
    assert results[0][0].shape == (2, -(-9 // stride), -(-9 // stride), 6)


def test_depthwise_shifted_backward_keeps_no_copy_per_tap():
    x = jnp.zeros((4, 32, 32, 64), jnp.float32)
    conv = layers.DepthwiseConv(7, impl="shifted")
    params = conv.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x))), argnums=(0, 1)))
    temp = grad.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 12 * x.nbytes  # autodiff's backward held its 49 tap products at once: 48x


def test_em_unroll_resolution():
    assert MixerConfig(em_unroll=2, num_iters=3).unroll() == 2
    assert MixerConfig(em_unroll=8, num_iters=3).unroll() == 3
    assert MixerConfig(em_unroll=None, num_iters=3).unroll() == 3
    with pytest.raises(ModelConfigError, match="em_unroll=0 must be >= 1"):
        MixerConfig(em_unroll=0).validate()


def test_spatial_windows_are_true_windows():
    x = jnp.arange(2 * 4 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 4, 6)
    parts = layout.window_partition(x, heads=2, windows=2, partition="spatial")
    assert parts.shape == (2 * 2 * 4, 2, 2, 3)
    # group 0 = image 0, head 0, top-left window: rows 0-1, cols 0-1, channels 0-2
    np.testing.assert_array_equal(np.asarray(parts[0]), np.asarray(x[0, :2, :2, :3]))
    # group 3 = image 0, head 0, bottom-right window
    np.testing.assert_array_equal(np.asarray(parts[3]), np.asarray(x[0, 2:, 2:, :3]))
    for mode in ("spatial", "raw"):
        parts = layout.window_partition(x, 2, 2, mode)
        np.testing.assert_array_equal(np.asarray(layout.window_merge(parts, 2, 2, 2, mode)), np.asarray(x))


def test_paper_dispatch_is_similarity_weighted_mean_of_centers():
    """Eq. 6 before its MLP: (1/K) sum_k sigmoid(alpha*cos(C_k, p_i) + beta) C_k (checked via a probe)."""
    mixer = _mixer(8, 1, head_dim=8, centers=(2, 2), num_iters=1, dispatch="paper", partition="spatial")
    x = jnp.asarray(np.random.RandomState(5).randn(1, 4, 4, 8).astype(np.float32))
    params = mixer.init(jax.random.PRNGKey(1), x)["params"]
    out, centers = mixer.apply({"params": params}, x)
    q = np.asarray(x.reshape(16, 8) @ params["conv1"]["kernel"] + params["conv1"]["bias"])
    c = np.asarray(centers[0])
    cos = ref._normalize(c) @ ref._normalize(q).T
    sim = 1 / (1 + np.exp(-(params["sim_beta"][0] + params["sim_alpha"][0] * cos)))
    dispatched = sim.T @ c / 4
    hidden = jax.nn.gelu(
        dispatched @ params["dispatch_fc"]["kernel"] + params["dispatch_fc"]["bias"], approximate=False
    )
    want = hidden @ params["conv2"]["kernel"] + params["conv2"]["bias"]
    np.testing.assert_allclose(np.asarray(out).reshape(16, 8), np.asarray(want), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- whole model


def test_parameter_counts_of_released_configurations():
    # Counted from the released code (mmcls backbone + 1440 -> 1000 head), conv_c included.
    assert _count(_abstract_params(create_model("clusterformer_tiny_official"), 224)) == 31_633_696
    assert _count(_abstract_params(create_model("clusterformer_small_official"), 224)) == 52_949_176


def test_parameter_count_independent_of_resolution_and_t():
    base = _count(_abstract_params(create_model("clusterformer_tiny_official"), 224))
    other = create_model("clusterformer_tiny_official", num_iters=1, window_counts=(32, 16, 8, 4))
    assert _count(_abstract_params(other, 512)) == base


@pytest.mark.parametrize(
    "name,size,windows",
    [
        ("clusterformer_tiny_official", 224, (8, 4, 2, 1)),
        ("clusterformer_tiny_official", 512, (32, 16, 8, 4)),
        ("clusterformer_tiny", 224, (8, 4, 2, 1)),
        ("clusterformer_tiny", 512, (8, 4, 2, 1)),
    ],
)
def test_stage_output_shapes(name, size, windows):
    model = create_model(name, window_counts=windows)
    images = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))
    backbone = model.backbone  # the fields the registry passed to the backbone
    bb = ClusterFormerBackbone(**backbone)
    out = jax.eval_shape(lambda v: bb.apply({"params": v["params"]["backbone"]}, images), variables)
    s = size // 4
    dims = backbone["dims"]
    assert [o.shape for o in out["stages"]] == [
        (2, s, s, dims[0]),
        (2, s // 2, s // 2, dims[1]),
        (2, s // 4, s // 4, dims[2]),
        (2, s // 8, s // 8, dims[3]),
    ]
    logits = jax.eval_shape(lambda v: model.apply(v, images), variables)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def test_indivisible_window_counts_give_a_clear_error():
    model = create_model("clusterformer_tiny_official", window_counts=(32, 16, 8, 4))
    with pytest.raises(ValueError, match=r"stage 1 map 56x56 is not divisible by window count 32"):
        jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 224, 224, 3))))


def test_registry_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown model 'clusterformer_huge'"):
        create_model("clusterformer_huge")
    with pytest.raises(ValueError, match="has no field 'num_iter'"):
        create_model("clusterformer_tiny", num_iter=2)
    assert {
        "clusterformer_tiny",
        "clusterformer_small",
        "clusterformer_base",
        "clusterformer_tiny_official",
        "clusterformer_small_official",
    } <= set(list_models())


def test_drop_path_is_identity_in_eval_and_stochastic_in_train():
    model = create_model("clusterformer_nano", drop_path_rate=0.5, layer_scale_init=1.0, **presets.NANO_CUT)
    images = jnp.asarray(np.random.RandomState(0).rand(4, 32, 32, 3).astype(np.float32))
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, images)
    apply = jax.jit(lambda key: model.apply(variables, images, train=True, rngs={"dropout": key}))
    evaluate = jax.jit(lambda: model.apply(variables, images))
    np.testing.assert_array_equal(np.asarray(evaluate()), np.asarray(evaluate()))
    t1, t2 = apply(jax.random.PRNGKey(1)), apply(jax.random.PRNGKey(2))
    assert not np.allclose(np.asarray(t1), np.asarray(t2))


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
    images = jnp.asarray(np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32))
    f32 = create_model("clusterformer_nano", **presets.NANO_CUT)
    bf16 = create_model("clusterformer_nano", dtype="bfloat16", **presets.NANO_CUT)
    variables = jax.jit(f32.init)({"params": jax.random.PRNGKey(0)}, images)
    bf16_params = jax.eval_shape(bf16.init, {"params": jax.random.PRNGKey(0)}, images)
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
    a, b = jax.jit(f32.apply)(variables, images), jax.jit(bf16.apply)(variables, images)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * float(jnp.abs(a).max()) + 1e-2)


def test_cosine_normalisation_has_finite_gradient_at_zero():
    """An empty cluster gives an all-zero center; its cosine must not turn the gradient into NaN."""
    grad = jax.grad(lambda v: layers.l2_normalize(v).sum())(jnp.zeros((2, 4)))
    assert bool(jnp.all(jnp.isfinite(grad)))
    x = jnp.asarray([[3.0, 4.0], [1e-14, 0.0]])
    np.testing.assert_allclose(np.asarray(layers.l2_normalize(x)), [[0.6, 0.8], [1e-2, 0.0]], rtol=1e-6)


def test_gelu_is_the_exact_erf_form():
    import math

    x = np.linspace(-6, 6, 25).astype(np.float32)
    want = [0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)]
    np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)


def test_group_norm_impls_share_parameters_values_and_gradients():
    """norm_impl 'ungrouped' (GroupNorm1) against 'grouped' (flax's ``nn.GroupNorm(num_groups=1)``, the PyTorch
    GroupNorm(1, C) of the released models): the same parameters, values and gradients, on inputs far from
    zero mean and unit variance."""
    ours, flax_norm = (layers.group_norm("norm", jnp.float32, impl) for impl in ("ungrouped", "grouped"))
    assert isinstance(ours, layers.GroupNorm1) and flax_norm.num_groups == 1 and flax_norm.epsilon == 1e-5
    with pytest.raises(ModelConfigError, match="norm_impl='flat' is not one of"):
        layers.group_norm("norm", jnp.float32, "flat")
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 7))
    variables = flax_norm.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda v: v + jax.random.normal(jax.random.PRNGKey(2), v.shape), variables)
    np.testing.assert_allclose(ours.apply(variables, x), flax_norm.apply(variables, x), rtol=1e-6, atol=1e-6)
    y = ours.apply(variables, x) - variables["params"]["bias"]
    np.testing.assert_allclose(np.mean(y / variables["params"]["scale"], axis=(1, 2, 3)), 0.0, atol=1e-5)

    def grads(module):
        return jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(flax_norm))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
