"""A checkpoint saved on one device count restores on another (8 -> 1 -> 8 virtual CPU devices).

The device count is fixed per process (XLA_FLAGS), so each mesh runs in its own subprocess: it restores the
steps the others saved onto its own shardings, writes what it got, and saves a state of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import CPU_COMPILE_FLAGS, REPO

CHILD = r"""
import json, sys
import jax
import numpy as np
from clusterformer_jax import checkpointing, sharding
from clusterformer_jax.trainers.setup import build
from tests import load_config

directory, out, mesh_json, save_step, restore_steps = sys.argv[1:6]
config = load_config("quickstart.py")
config.batch_size = 16
config.sharding.fsdp_min_size = 1024
info = {"num_classes": 10, "num_train": 1437, "num_eval": 360, "image_size": 32}
setup = build(config, sharding.create_mesh(json.loads(mesh_json)), info, total_steps=10, steps_per_epoch=1.0)
ckpt = checkpointing.Checkpointer(directory, async_save=False, max_to_keep=None)
report = {"devices": jax.device_count(), "restored": {}}
for step in [int(s) for s in restore_steps.split(",") if s]:
    state = ckpt.restore(setup.abstract_with_shardings(), step=step)
    leaves, targets = jax.tree.leaves(state), jax.tree.leaves(setup.state_shardings)
    assert all(leaf.sharding == target for leaf, target in zip(leaves, targets))
    sharded = sum(not leaf.sharding.is_fully_replicated for leaf in leaves)
    report["restored"][step] = sharded
    np.savez(f"{out}/restored_{step}_on_{jax.device_count()}.npz", *[np.asarray(x) for x in leaves])
if int(save_step):
    rng = np.random.default_rng(int(save_step))
    def leaf(a):
        if np.issubdtype(a.dtype, np.floating):
            return rng.normal(size=a.shape).astype(a.dtype)
        return rng.integers(0, 1000, size=a.shape).astype(a.dtype)
    state = jax.device_put(jax.tree.map(leaf, setup.abstract_state), setup.state_shardings)
    ckpt.save(int(save_step), state, force=True)
    np.savez(f"{out}/saved_{save_step}.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
    report["saved_sharded"] = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
ckpt.close()
print("REPORT " + json.dumps(report))
"""

# (devices, mesh, step saved, steps restored): 8 -> 1, 1 -> 8, and leaves split 4 ways re-split 8 ways
PLAN = [
    (8, {"data": 2, "fsdp": 4}, 1, []),
    (1, {"data": 1, "fsdp": 1}, 2, [1]),
    (8, {"data": 1, "fsdp": 8}, 0, [1, 2]),
]


def _child(directory, out, devices, mesh, save_step, restore_steps):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {CPU_COMPILE_FLAGS}"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            directory,
            out,
            json.dumps(mesh),
            str(save_step),
            ",".join(map(str, restore_steps)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.slow
def test_checkpoint_restores_onto_other_device_counts_bitwise(tmp_path):
    directory = str(tmp_path / "checkpoints")
    reports = [_child(directory, str(tmp_path), *entry) for entry in PLAN]
    assert [r["devices"] for r in reports] == [8, 1, 8]
    assert reports[0]["saved_sharded"] > 20  # fsdp-split leaves
    assert reports[1]["saved_sharded"] == 0  # one device
    assert reports[2]["restored"]["2"] > 20  # the 1-device checkpoint split over 8 devices
    for devices, _, _, restored in PLAN:
        for step in restored:
            saved = np.load(tmp_path / f"saved_{step}.npz")
            got = np.load(tmp_path / f"restored_{step}_on_{devices}.npz")
            assert len(saved.files) == len(got.files) > 50
            for key in saved.files:
                np.testing.assert_array_equal(got[key], saved[key])
