"""Mesh construction from config (data and fsdp axes only) and the parameter sharding rules."""

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
        ({"data": -1, "fsdp": 1}, (8, 1)),
        ({"data": -1, "fsdp": 2}, (4, 2)),
        ({"data": 2, "fsdp": -1}, (2, 4)),
        ({"data": 8}, (8, 1)),
        ({"fsdp": 8}, (1, 8)),
    ],
)
def test_mesh_shape_expands_minus_one(config, expected):
    assert sharding.mesh_shape(config, 8) == expected


@pytest.mark.parametrize(
    "config",
    [
        {"data": 3, "fsdp": 1},  # product 3 != 8
        {"data": -1, "fsdp": 3},  # 8 not divisible by 3
        {"data": -1, "fsdp": -1},  # two free axes
        {"data": 0, "fsdp": 1},
        {"data": -1, "model": 2},  # unknown axis
    ],
)
def test_mesh_shape_errors(config):
    with pytest.raises(ConfigError):
        sharding.mesh_shape(config, 8)


@pytest.mark.parametrize("config", [{"data": -1, "fsdp": 1, "tensor": 1}, {"data": 4, "tensor": 2}])
def test_a_tensor_axis_is_one_line_error_naming_the_fix(config):
    with pytest.raises(ConfigError) as error:
        sharding.mesh_shape(config, 8)
    message = str(error.value)
    assert "\n" not in message
    assert "tensor parallelism is not implemented; use data and fsdp" in message


def test_create_mesh_uses_all_devices_with_auto_axes():
    mesh = sharding.create_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    one = sharding.create_mesh({"data": -1}, devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1}


@pytest.mark.parametrize(
    "shape, fsdp, min_size, expected",
    [
        ((256, 1024), 2, 0, P(None, "fsdp")),  # largest divisible axis
        ((1024, 256), 4, 0, P("fsdp")),
        ((3, 3, 64, 128), 2, 0, P(None, None, None, "fsdp")),  # a conv kernel: its output axis
        ((6, 10), 4, 0, P()),  # nothing divisible by 4: replicated
        ((12, 10), 4, 0, P("fsdp")),  # the largest *divisible* axis, not the largest axis
        ((64, 64), 2, 0, P("fsdp")),  # equal sizes: the first
        ((3, 5), 2, 0, P()),
        ((1024,), 2, 0, P("fsdp")),
        ((1024,), 2, 2048, P()),  # below the fsdp size threshold
        ((64, 64), 1, 0, P()),  # fsdp 1: replicated
        ((), 2, 0, P()),
    ],
)
def test_param_partition_spec_rules(shape, fsdp, min_size, expected):
    assert sharding.param_partition_spec(shape, fsdp=fsdp, fsdp_min_size=min_size) == expected


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
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
    shardings = sharding.tree_shardings(tree, mesh, fsdp_min_size=64)
    assert shardings["params"]["fc"]["kernel"].spec == P(None, "fsdp")
    assert shardings["opt"][0]["mu"]["fc"]["kernel"].spec == P(None, "fsdp")
    assert shardings["params"]["fc"]["bias"].spec == P()  # 32 < 64 elements
    assert shardings["opt"][0]["mu"]["fc"]["bias"].spec == P()
    assert shardings["opt"][0]["count"].spec == P()


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = sharding.create_mesh({"data": 4, "fsdp": 2})
    batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2), "label": np.arange(16, dtype=np.int32)}
    out = sharding.shard_batch(batch, sharding.batch_sharding(mesh))
    np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
    assert out["label"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out["image"].addressable_shards} == {(2, 2)}
    assert sharding.batch_divisor(mesh) == 8
