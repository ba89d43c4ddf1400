"""A checkpoint saved on one device count restores on another (8 -> 1 -> 8 virtual CPU devices).

Each step restores what the others saved onto its own mesh's shardings, writes what it got, and saves a state of
its own. The 8-device meshes run in this process (8 CPU devices, tests/conftest.py); the 1-device one in a process
that has a single device (XLA_FLAGS fixes the count per process), as a job on a smaller machine would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import CPU_COMPILE_FLAGS, REPO, load_config, presets


def restore_and_save(directory: str, out: str, mesh: dict, save_step: int, restore_steps: list[int]) -> dict:
    """Restores ``restore_steps`` onto ``mesh`` (saving each as restored_<step>_on_<devices>.npz), then saves a
    random state as ``save_step`` (0: none; also saved_<step>.npz); returns counts of the split leaves."""
    import jax

    from clusterformer_jax import checkpointing, sharding
    from clusterformer_jax.trainers.setup import build

    config = load_config("quickstart.py")
    config.batch_size = 16
    config.sharding.fsdp_min_size = 1024
    setup = build(config, sharding.create_mesh(mesh), presets.DIGITS_INFO, total_steps=10, steps_per_epoch=1.0)
    ckpt = checkpointing.Checkpointer(directory, async_save=False, max_to_keep=None)
    report = {"devices": jax.device_count(), "restored": {}}
    for step in restore_steps:
        state = ckpt.restore(setup.abstract_with_shardings(), step=step)
        leaves, targets = jax.tree.leaves(state), jax.tree.leaves(setup.state_shardings)
        assert all(leaf.sharding == target for leaf, target in zip(leaves, targets))
        report["restored"][step] = sum(not leaf.sharding.is_fully_replicated for leaf in leaves)
        np.savez(f"{out}/restored_{step}_on_{jax.device_count()}.npz", *[np.asarray(x) for x in leaves])
    if save_step:
        rng = np.random.default_rng(save_step)

        def leaf(a):
            if np.issubdtype(a.dtype, np.floating):
                return rng.normal(size=a.shape).astype(a.dtype)
            return rng.integers(0, 1000, size=a.shape).astype(a.dtype)

        state = jax.device_put(jax.tree.map(leaf, setup.abstract_state), setup.state_shardings)
        ckpt.save(save_step, state, force=True)
        np.savez(f"{out}/saved_{save_step}.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
        report["saved_sharded"] = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    ckpt.close()
    return report


CHILD = """
import json, sys
from tests.test_restore_mesh import restore_and_save
directory, out, mesh, save_step, restore_steps = sys.argv[1:6]
steps = [int(s) for s in restore_steps.split(",") if s]
print("REPORT " + json.dumps(restore_and_save(directory, out, json.loads(mesh), int(save_step), steps)))
"""


def _one_device_process(directory: str, out: str, mesh: dict, save_step: int, restore_steps: list[int]) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {CPU_COMPILE_FLAGS}"
    args = [directory, out, json.dumps(mesh), str(save_step), ",".join(map(str, restore_steps))]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.slow
def test_checkpoint_restores_onto_other_device_counts_bitwise(tmp_path):
    directory, out = str(tmp_path / "checkpoints"), str(tmp_path)
    # 8 devices (fsdp 4) save 1; one device restores 1 and saves 2; 8 devices (fsdp 8) restore both
    reports = [
        restore_and_save(directory, out, {"data": 2, "fsdp": 4}, 1, []),
        _one_device_process(directory, out, {"data": 1, "fsdp": 1}, 2, [1]),
        restore_and_save(directory, out, {"data": 1, "fsdp": 8}, 0, [1, 2]),
    ]
    assert [r["devices"] for r in reports] == [8, 1, 8]
    assert reports[0]["saved_sharded"] > 20  # fsdp-split leaves
    assert reports[1]["saved_sharded"] == 0  # one device
    assert reports[2]["restored"][2] > 20  # the 1-device checkpoint split over 8 devices
    for devices, restored in ((1, [1]), (8, [1, 2])):
        for step in restored:
            saved = np.load(tmp_path / f"saved_{step}.npz")
            got = np.load(tmp_path / f"restored_{step}_on_{devices}.npz")
            assert len(saved.files) == len(got.files) > 50
            for key in saved.files:
                np.testing.assert_array_equal(got[key], saved[key])
