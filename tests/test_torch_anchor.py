"""The PyTorch transcription of the released ClusterFormer used as the benchmark anchor
(benchmarks/torch_clusterformer.py) computes the same logits as our official-parity model with the same
weights, so timing it side by side compares like with like. Skipped without torch (benchmark extra)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusterformer_jax.convert import mmcls_clusterformer
from clusterformer_jax.models.registry import create_model
from tests import load_benchmark

torch = pytest.importorskip("torch")

SMALL = dict(
    depths=(1, 1, 2, 1),
    dims=(64, 64, 96, 128),
    num_heads=(2, 2, 3, 4),
    window_counts=(4, 2, 1, 1),
    mlp_ratios=(2, 2, 2, 2),
    num_iters=2,
)


def test_torch_anchor_matches_the_official_preset():
    model = create_model("clusterformer_tiny_official", num_classes=7, **SMALL)
    images = np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]))["params"]
    # random non-trivial values where the init is constant (layer scale 1e-5, alpha 1, beta 0, norms)
    rng = np.random.RandomState(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * rng.randn(*x.shape).astype(np.float32)
            if any(k in jax.tree_util.keystr(path) for k in ("layer_scale", "sim_", "scale", "norm"))
            else x
        ),
        params,
    )
    torch_model = load_benchmark("torch_clusterformer.py").create(
        "clusterformer_tiny_official",
        num_classes=7,
        depths=SMALL["depths"],
        dims=SMALL["dims"],
        heads=SMALL["num_heads"],
        window_counts=SMALL["window_counts"],
        mlp_ratios=SMALL["mlp_ratios"],
        num_iters=SMALL["num_iters"],
    )
    state_dict = {k: torch.from_numpy(np.array(v)) for k, v in mmcls_clusterformer.flax_to_state_dict(params).items()}
    torch_model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(images)))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
