"""Cluster maps: the right shape, every pixel labelled, equal to the argmax of the model's sown assignment
(encoder blocks, and the cluster decoder's layers of a dense run)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clusterformer_jax import visualize
from clusterformer_jax.data import dense_pipeline
from clusterformer_jax.models import registry
from clusterformer_jax.models.context_cluster import stage_sizes
from tests import presets
from tests.test_export import _trained_run

REPO = Path(__file__).resolve().parents[1]


def _check_maps(assignment, map_hw, head):
    labels, centers = visualize.cluster_maps(assignment, 1, map_hw, head)
    steps, groups, k, n = assignment.shape
    windows2 = map_hw[0] * map_hw[1] // n
    heads = groups // windows2
    assert labels.shape == (steps, *map_hw) and centers.shape == (steps, windows2 * k, 2)
    assert labels.min() >= 0 and labels.max() < windows2 * k  # every pixel holds one window's center
    windows, (h, w) = int(np.sqrt(windows2)), map_hw
    n_h, n_w = h // windows, w // windows
    for t in range(steps):
        for wi in range(windows):
            for wj in range(windows):
                group = head * windows2 + wi * windows + wj
                want = assignment[t, group].argmax(axis=0).reshape(n_h, n_w) + (wi * windows + wj) * k
                got = labels[t, wi * n_h : (wi + 1) * n_h, wj * n_w : (wj + 1) * n_w]
                np.testing.assert_array_equal(got, want)
    assert heads >= 1
    return labels, centers


@pytest.fixture(scope="module")
def nano():
    model = registry.create_model("clusterformer_nano")
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))


def test_clusterformer_maps_are_the_argmax_of_each_em_step(nano):
    model, variables = nano
    images = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    found = visualize.sown_assignments(visualize.capturable(model), variables, images)
    assert sorted(found) == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    assignment = found[(1, 0)]
    assert assignment.shape == (3, 2, 16, 16)  # T=3 steps, 2 heads, 4x4 centers, 4x4 tokens
    np.testing.assert_allclose(assignment.sum(axis=2), 1.0, rtol=1e-5)  # the E-step's softmax over centers
    assert not np.array_equal(assignment[0].argmax(1), assignment[2].argmax(1))  # the steps differ
    _, centers = _check_maps(assignment, stage_sizes(32, 32)[1], head=1)
    head = assignment[:, 1]  # (T, K, N) of head 1; token n sits in row n // 4
    rows = np.einsum("tkn,n->tk", head, np.repeat(np.arange(4.0), 4)) / head.sum(-1)
    np.testing.assert_allclose(centers[:, :, 0], rows, rtol=1e-5)


def test_context_cluster_maps_cover_its_regions():
    model = registry.create_model(
        "coc_tiny", depths=(1, 1, 1, 1), dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2), head_dim=8, num_classes=3
    )
    images = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    found = visualize.sown_assignments(visualize.capturable(model), variables, images)
    assignment = found[(0, 0)]
    assert assignment.shape == (1, 2 * 64, 4, 4)  # one step; 2 heads x 8x8 folds; 2x2 proposals; 2x2 points
    labels, _ = _check_maps(assignment, stage_sizes(64, 64)[0], head=1)
    assert len(np.unique(labels)) > 64  # every fold has its own centers


def test_maps_refuse_an_assignment_that_does_not_tile_the_map():
    with pytest.raises(ValueError, match="does not tile"):
        visualize.cluster_maps(np.ones((1, 3, 4, 16)), 1, (8, 8), 0)


def test_visualize_writes_a_strip(tmp_path, nano):
    model, variables = nano
    image = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    out = visualize.visualize(image, model, variables, 32, None, 2, -1, 3, None, str(tmp_path / "maps.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, shapes_dir, persistent_compilation_cache):
    """A tiny instance-segmentation workdir as the trainer leaves one (config.json, dataset_info.json, a
    checkpoint) with random weights (test_export's): the maps need the run's model and weights, not training.
    The shared tiny dense preset (tests/presets.py: ClusterFormer nano on the 64 px small shapes; decoder: 2
    layers (strides 32, 16), 8 queries, 2 heads)."""
    workdir = tmp_path_factory.mktemp("dense_run") / "run"
    config = presets.tiny_dense_config(shapes_dir)
    _trained_run(str(workdir), config.model.name, config, dense_pipeline.get_dataset_info(config.input))
    return workdir


def test_decoder_maps_are_the_argmax_of_each_layers_sown_assignment(dense_run):
    model, variables, size, _ = visualize.load(str(dense_run), None, "unused", None)
    assert size == 64
    images = np.random.default_rng(3).normal(size=(1, 64, 64, 3)).astype(np.float32)
    found = visualize.sown_decoder_assignments(visualize.capturable(model, encoder=False), variables, images)
    assert sorted(found) == [0, 1]
    for layer, (h, w) in ((0, (2, 2)), (1, (4, 4))):  # strides 32 and 16 of 64 px
        assignment = found[layer]
        assert visualize.decoder_grid(model, layer, size) == (h, w)
        assert assignment.shape == (3, 1, 2, 8, h * w)  # T=3 EM steps, 1 image, 2 heads, 8 queries, pixels
        np.testing.assert_allclose(assignment.sum(axis=3), 1.0, rtol=1e-5)  # E-step softmax over the queries
        labels, centers = visualize.decoder_maps(assignment, (h, w), head=1)
        assert labels.shape == (3, h, w) and centers.shape == (3, 8, 2)
        assert labels.min() >= 0 and labels.max() < 8  # every pixel holds a query
        np.testing.assert_array_equal(labels, assignment[:, 0, 1].argmax(axis=1).reshape(3, h, w))
    assert not np.array_equal(found[1][0].argmax(2), found[1][2].argmax(2))  # the EM steps move the clusters


def test_visualize_command_draws_a_decoder_layer(dense_run, tmp_path):
    out = tmp_path / "decoder.png"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,  # the fixture's programs compile once
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    command = [sys.executable, "-m", "clusterformer_jax.visualize", f"--workdir={dense_run}", f"--out={out}"]
    proc = subprocess.run(
        [*command, "--decoder_layer=-1", "--head=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(out))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
