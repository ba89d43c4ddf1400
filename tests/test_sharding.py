"""Mesh construction from config and the parameter sharding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from clusterformer_jax import sharding
from clusterformer_jax.errors import ConfigError


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": -1, "fsdp": 2, "tensor": 1}, (4, 2, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": 8}, (8, 1, 1)),
    ],
)
def test_mesh_shape_expands_minus_one(config, expected):
    assert sharding.mesh_shape(config, 8) == expected


@pytest.mark.parametrize(
    "config",
    [
        {"data": 3, "fsdp": 1, "tensor": 1},  # product 3 != 8
        {"data": -1, "fsdp": 3, "tensor": 1},  # 8 not divisible by 3
        {"data": -1, "fsdp": -1, "tensor": 1},  # two free axes
        {"data": 0, "fsdp": 1, "tensor": 1},
        {"data": -1, "model": 2},  # unknown axis
    ],
)
def test_mesh_shape_errors(config):
    with pytest.raises(ConfigError):
        sharding.mesh_shape(config, 8)


def test_create_mesh_uses_all_devices_with_auto_axes():
    mesh = sharding.create_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    one = sharding.create_mesh({"data": -1}, devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "names, shape, fsdp, tensor, min_size, expected",
    [
        (["fc1", "kernel"], (256, 1024), 2, 1, 0, P(None, "fsdp")),  # largest divisible axis
        (["fc1", "kernel"], (256, 1024), 2, 2, 0, P("fsdp", "tensor")),  # tensor takes the output axis
        (["fc1", "kernel"], (256, 1024), 1, 4, 0, P(None, "tensor")),
        (["conv", "kernel"], (3, 3, 64, 128), 2, 4, 0, P(None, None, "fsdp", "tensor")),
        (["fc1", "kernel"], (6, 10), 2, 4, 0, P(None, "fsdp")),  # 10 % 4 != 0: no tensor split
        (["fc1", "kernel"], (3, 5), 2, 1, 0, P()),  # nothing divisible: replicated
        (["fc1", "bias"], (1024,), 1, 2, 0, P()),  # tensor only splits kernels
        (["fc1", "bias"], (1024,), 2, 1, 0, P("fsdp")),
        (["fc1", "bias"], (1024,), 2, 1, 2048, P()),  # below the fsdp size threshold
        (["fc1", "kernel"], (64, 64), 1, 1, 0, P()),  # 1 x 1 x 1: replicated
        (["count"], (), 2, 2, 0, P()),
    ],
)
def test_param_partition_spec_rules(names, shape, fsdp, tensor, min_size, expected):
    spec = sharding.param_partition_spec(names, shape, fsdp=fsdp, tensor=tensor, fsdp_min_size=min_size)
    assert spec == expected


def test_optimizer_state_follows_param_specs():
    tree = {
        "params": {"fc": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros((32,))}},
        "opt": (
            {
                "count": jnp.zeros((), jnp.int32),
                "mu": {"fc": {"kernel": jnp.zeros((16, 32)), "bias": jnp.zeros((32,))}},
            },
        ),
    }
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.tree_shardings(tree, mesh, fsdp_min_size=64)
    assert shardings["params"]["fc"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["opt"][0]["mu"]["fc"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["params"]["fc"]["bias"].spec == P()  # 32 < 64 elements
    assert shardings["opt"][0]["count"].spec == P()


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = sharding.create_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2), "label": np.arange(16, dtype=np.int32)}
    out = sharding.shard_batch(batch, sharding.batch_sharding(mesh))
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    assert out["label"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out["image"].addressable_shards} == {(2, 2)}
    assert sharding.batch_divisor(mesh) == 8
