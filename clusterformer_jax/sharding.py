"""Device mesh, batch sharding and rule-based parameter sharding.

The mesh always has the axes ('data', 'fsdp', 'tensor'); one device is simply the (1, 1, 1) mesh, so the
same code path serves a laptop and a pod. Batches are split over ('data', 'fsdp'). Parameters (and any
optimizer-state leaf of the same name and shape) follow two rules:

* tensor > 1: a Dense/Conv ``kernel`` has its output-feature (last) axis split over 'tensor' when divisible;
* fsdp > 1: a leaf with at least ``fsdp_min_size`` elements has its largest still-free axis that is
  divisible by the fsdp size split over 'fsdp'.

Everything else is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clusterformer_jax.errors import ConfigError

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2**14


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves ``{'data': -1, 'fsdp': 1, 'tensor': 1}`` to concrete sizes for ``num_devices`` devices.

    At most one axis may be -1; it takes the devices the other axes leave over.
    """
    unknown = sorted(set(mesh_config) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh axis {unknown[0]!r} is not one of {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} "
            "are available; set config.mesh so the product matches (or use -1 for one axis)"
        )
    return tuple(sizes)  # type: ignore[return-value]


def create_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axis types.

    Without ``devices`` all global devices are used, arranged by ``mesh_utils.create_device_mesh`` so the
    fastest interconnect serves the innermost axes; an explicit device list is used in the given order.
    """
    explicit = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    grid = None
    if not explicit:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = None
    if grid is None:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_partition_spec() -> P:
    """Leading (batch) axis split over ('data', 'fsdp'); the rest replicated."""
    return P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_partition_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """Number of batch shards; global batch sizes must be multiples of it."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_partition_spec(
    names: Sequence[str],
    shape: Sequence[int],
    *,
    fsdp: int,
    tensor: int,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
) -> P:
    """The partition spec of one leaf, from its path names and shape (see the module docstring)."""
    spec: list[str | None] = [None] * len(shape)
    if not shape:
        return P()
    leaf = names[-1] if names else ""
    if tensor > 1 and leaf == "kernel" and len(shape) >= 2 and shape[-1] % tensor == 0:
        spec[-1] = "tensor"
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        free = [i for i, s in enumerate(shape) if spec[i] is None and s % fsdp == 0]
        if free:
            axis = max(free, key=lambda i: (shape[i], -i))
            spec[axis] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_partition_specs(tree: Any, mesh_sizes: Mapping[str, int], fsdp_min_size: int) -> Any:
    """Applies ``param_partition_spec`` to every array leaf of ``tree`` (params, optimizer state, ...)."""

    def spec(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return param_partition_spec(
            [_key_name(k) for k in path],
            shape,
            fsdp=int(mesh_sizes.get("fsdp", 1)),
            tensor=int(mesh_sizes.get("tensor", 1)),
            fsdp_min_size=fsdp_min_size,
        )

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """NamedShardings for every leaf of ``tree`` by the rules above."""
    specs = tree_partition_specs(tree, dict(mesh.shape), fsdp_min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's slice of a batch into global arrays split along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
