"""Table 6's ablation configs load and build; every added center update and dispatch matches numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax import ablations
from clusterformer_jax.models import clustering
from clusterformer_jax.models.dispatch import confidence_dispatch
from tests import load_config

RNG = np.random.default_rng(0)


def _softmax(x, axis):
    x = np.exp(x - x.max(axis=axis, keepdims=True))
    return x / x.sum(axis=axis, keepdims=True)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _dense(params, x):
    return x @ np.asarray(params["kernel"]) + np.asarray(params["bias"])


def _gelu(x):
    return np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))


def test_every_row_loads_with_its_options_and_builds_small():
    listed = ablations.rows("abcdef")
    assert len(listed) >= 24
    sizes = {}
    for table, row in listed:
        full = load_config(f"ablations/table6{table}.py", row)
        if table == "f":
            assert full.model.decoder.query_init == row
            full.model.name = "clusterformer_nano"  # the COCO recipe's decoder on a small backbone
            full.model.kwargs.window_counts = (1, 1, 1, 1)
            model, _ = ablations.build_model(full)
            sizes[table, row] = ablations.count_params(model, (1, 64, 64, 3))
            continue
        overrides = ablations.table6().CLASSIFICATION[table][row][0]
        small = load_config(f"ablations/table6{table}.py", f"{row},quickstart")
        for config, name in ((full, "clusterformer_tiny"), (small, "clusterformer_nano")):
            assert config.model.name == name
            assert {k: config.model.kwargs[k] for k in overrides} == overrides
        assert small.model.kwargs.head == "paper_centers"  # rows without dispatch still reach the output
        model, _ = ablations.build_model(small)
        sizes[table, row] = ablations.count_params(model, (1, 32, 32, 3))
    assert sizes["a", "baseline"] < sizes["a", "dispatch"] < sizes["a", "both"]  # the dispatch FC
    assert sizes["d", "e16"] < sizes["d", "e32"] < sizes["d", "e48"]
    assert sizes["c", "vanilla"] > sizes["c", "recurrent"] > sizes["c", "cosine"]  # per-step weights; no W_q
    assert sizes["b", "T1"] == sizes["b", "T4"]  # T steps share one set of weights
    assert len({sizes["f", r] for r in ("free", "scene_adaptive", "encoder_centers")}) == 3


def test_unknown_row_is_refused():
    with pytest.raises(ValueError, match="must name a row"):
        load_config("ablations/table6c.py", "kmean")


def _em_step(update, centers, keys, values):
    step = clustering.EMStep(head_dim=centers.shape[-1], heads=1, update=update)
    variables = step.init(jax.random.PRNGKey(1), centers, keys, values)
    return variables, np.asarray(step.apply(variables, centers, keys, values)[0])


def test_cosine_center_update_matches_numpy():
    c, k, v = (RNG.normal(size=s).astype(np.float32) for s in ((2, 3, 4), (2, 5, 4), (2, 5, 4)))
    variables, got = _em_step("cosine", c, k, v)
    assert "params" not in variables  # parameter-free: no query projection
    assign = _softmax(np.einsum("gke,gne->gkn", _unit(c), _unit(k)), axis=1)
    np.testing.assert_allclose(got, np.einsum("gkn,gne->gke", assign, v), rtol=1e-5, atol=1e-5)


def test_kmeans_center_update_matches_numpy():
    c, k, v = (RNG.normal(size=s).astype(np.float32) for s in ((2, 3, 4), (2, 5, 4), (2, 5, 4)))
    variables, got = _em_step("kmeans", c, k, v)
    logits = np.einsum("gke,gne->gkn", _dense(variables["params"]["conv_c"], c), k)
    hard = np.eye(3, dtype=np.float32)[logits.argmax(axis=1)].transpose(0, 2, 1)  # (G, K, N) one-hot over K
    np.testing.assert_allclose(got, c + np.einsum("gkn,gne->gke", hard, v), rtol=1e-5, atol=1e-5)


def test_criss_cross_mask_is_the_center_row_and_column():
    mask = clustering.criss_cross_mask((4, 4), (2, 2))
    first = np.zeros((4, 4), bool)
    first[1, :] = first[:, 1] = True  # center (0, 0) sits at token (1, 1)
    np.testing.assert_array_equal(mask[0].reshape(4, 4), first)
    last = np.zeros((4, 4), bool)
    last[3, :] = last[:, 3] = True
    np.testing.assert_array_equal(mask[3].reshape(4, 4), last)


@pytest.mark.parametrize("criss_cross", [False, True])
def test_attention_center_updates_match_numpy(criss_cross):
    c, k, v = (RNG.normal(size=s).astype(np.float32) for s in ((2, 4, 4), (2, 16, 4), (2, 16, 4)))
    mask = clustering.criss_cross_mask((4, 4), (2, 2)) if criss_cross else None
    module = clustering.AttentionUpdate(head_dim=4, num_iters=2)
    variables = module.init(jax.random.PRNGKey(2), c, k, v, mask)
    got = np.asarray(module.apply(variables, c, k, v, mask))
    p, want = variables["params"], c
    for t in range(2):
        logits = np.einsum("gke,gne->gkn", _dense(p[f"q_{t}"], want), _dense(p[f"k_{t}"], k)) / 2.0
        if criss_cross:
            logits = np.where(mask[None], logits, -np.inf)
        want = want + _dense(p[f"o_{t}"], np.einsum("gkn,gne->gke", _softmax(logits, 2), _dense(p[f"v_{t}"], v)))
    assert len(p) == 8  # q, k, v, o for each of the two steps: not shared
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_confidence_dispatch_matches_numpy():
    tokens, centers = _unit(RNG.normal(size=(2, 5, 4))), RNG.normal(size=(2, 3, 4))
    alpha = np.array([2.0])
    got = confidence_dispatch(*(jnp.asarray(a, jnp.float32) for a in (tokens, _unit(centers), centers, alpha)))
    prob = _softmax(2.0 * np.einsum("gne,gke->gnk", tokens, _unit(centers)), axis=2)
    choice = prob.argmax(axis=2)
    want = prob.max(axis=2)[..., None] * np.take_along_axis(centers, choice[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def _mixer(dispatch, x):
    config = clustering.MixerConfig(
        head_dim=4, centers=(2, 2), center_update="none", dispatch=dispatch, partition="spatial"
    )
    mixer = clustering.ClusteringMixer(dim=3, heads=1, config=config)
    variables = mixer.init(jax.random.PRNGKey(3), x)
    return variables["params"], np.asarray(mixer.apply(variables, x)[0])


@pytest.mark.parametrize("dispatch", ["none", "fc", "fc_similarity"])
def test_mixer_dispatch_options_match_numpy(dispatch):
    x = RNG.normal(size=(1, 4, 4, 3)).astype(np.float32)
    p, got = _mixer(dispatch, x)
    tokens = x.reshape(16, 3)
    q, values = _dense(p["conv1"], tokens), _dense(p["conv_f"], tokens)
    # 2x2 centers on a 4x4 map: each the mean of a 2x2 block of queries (values)
    blocks = lambda t: t.reshape(2, 2, 2, 2, 4).transpose(0, 2, 1, 3, 4).reshape(4, 4, 4).mean(axis=1)
    centers = blocks(q)
    if dispatch == "none":
        out = values
    elif dispatch == "fc":
        out = _gelu(_dense(p["dispatch_fc"], values + centers.mean(axis=0)))
    else:  # Context Cluster: values aggregated at each token's most similar center, sent back scaled
        sim = 1 / (1 + np.exp(-(p["sim_beta"] + p["sim_alpha"] * _unit(q) @ _unit(centers).T)))  # (N, K)
        choice = sim.argmax(axis=1)
        s = sim[np.arange(16), choice][:, None]
        agg = np.stack([blocks(values)[j] + (s * values)[choice == j].sum(0) for j in range(4)])
        agg = agg / (1 + np.bincount(choice, minlength=4))[:, None]
        out = _gelu(_dense(p["dispatch_fc"], s * agg[choice]))
    want = _dense(p["conv2"], out).reshape(1, 4, 4, 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ablated_options_need_the_spatial_partition():
    with pytest.raises(ValueError, match="partition='spatial'"):
        clustering.MixerConfig(center_update="kmeans", partition="raw").validate()


def test_train_table_trains_rows_with_equal_options_once(monkeypatch, tmp_path):
    calls = []

    def fake_run(table, row, seed, steps, workdir):
        calls.append((table, row, seed))
        return 90.0 + seed, 0.1 * (seed + 1)  # top-1 %, eval loss

    monkeypatch.setattr(ablations, "_train_run", fake_run)
    lines = ablations.train_table("abcde", steps=5, seeds=2, parent=str(tmp_path), jobs=2)
    options = {
        tuple(sorted(opts.items())) for rows in ablations.table6().CLASSIFICATION.values() for opts, *_ in rows.values()
    }
    assert len(calls) == 2 * len(options) == 2 * 18  # the default model is a row of every sub-table
    assert len(lines) == 2 + 23
    both = next(line for line in lines if line.startswith("(b) T3"))
    assert "90.50 +- 0.50" in both and "0.1500 +-0.0500" in both and both.endswith("(a) both")
