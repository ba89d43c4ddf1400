"""Device mesh, batch sharding and rule-based parameter sharding (data parallelism and FSDP).

The mesh always has the axes ('data', 'fsdp'); one device is simply the (1, 1) mesh, so the same code path
serves a laptop and a pod. Batches are split over both axes. A parameter (and every optimizer-state leaf of
the same name and shape, e.g. AdamW's mu and nu) with at least ``fsdp_min_size`` elements has its largest
axis that is divisible by the fsdp size split over 'fsdp'; everything else is replicated. XLA inserts the
all-gathers and reduce-scatters that this layout needs.

There is no tensor (model) parallelism: it would need column/row-paired splits of matching layers, which
these rules do not express, so a config that names a 'tensor' axis is rejected.
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

MESH_AXES: tuple[str, str] = ("data", "fsdp")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2**14
NO_TENSOR_PARALLELISM = "tensor parallelism is not implemented; use data and fsdp"


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int]:
    """Resolves ``{'data': -1, 'fsdp': 1}`` to concrete sizes for ``num_devices`` devices.

    At most one axis may be -1; it takes the devices the other axis leaves over.
    """
    if "tensor" in mesh_config:
        raise ConfigError(f"mesh axis 'tensor': {NO_TENSOR_PARALLELISM} (remove mesh.tensor)")
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
    """Builds the ('data', 'fsdp') mesh with Auto axis types.

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


def param_partition_spec(shape: Sequence[int], *, fsdp: int, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """The partition spec of one leaf of this shape (see the module docstring)."""
    spec: list[str | None] = [None] * len(shape)
    if fsdp > 1 and shape and math.prod(shape) >= fsdp_min_size:
        divisible = [i for i, s in enumerate(shape) if s % fsdp == 0]
        if divisible:
            axis = max(divisible, key=lambda i: (shape[i], -i))  # the largest; the first of equals
            spec[axis] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_partition_specs(tree: Any, mesh_sizes: Mapping[str, int], fsdp_min_size: int) -> Any:
    """Applies ``param_partition_spec`` to every array leaf of ``tree`` (params, optimizer state, ...)."""
    fsdp = int(mesh_sizes.get("fsdp", 1))
    return jax.tree.map(
        lambda leaf: param_partition_spec(tuple(getattr(leaf, "shape", ())), fsdp=fsdp, fsdp_min_size=fsdp_min_size),
        tree,
    )


def tree_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """NamedShardings for every leaf of ``tree`` by the rules above."""
    specs = tree_partition_specs(tree, dict(mesh.shape), fsdp_min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's slice of a batch into global arrays split along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
