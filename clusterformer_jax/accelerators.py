"""Published accelerator figures, TPU slice and GPU node topologies, for the ahead-of-time compile check (``aot.py``).

A leaf: imports nothing of the package. Chip figures are the vendors' published per-chip peaks (dense bf16
matmul, HBM capacity and bandwidth); the roofline step time built on them is a lower bound, not a forecast.

TPU slices are named as Cloud TPU names them (``v5e-8``, ``v4-8``, ``v5p-16``, ``v6e-8``): for v4 and v5p the
number counts TensorCores (two per chip, "megacore"), for v5e and v6e it counts chips. The chip grid of each
slice and the chips per host follow the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
v5e, v5p, v6e): v4/v5p hosts hold 2x2x1 chips; a v5e/v6e slice of 8 chips is one host, larger ones are
hosts of 2x2 chips.

GPU nodes are named ``h100-8``, ``a100-8``, ``h200-8`` (GPUs in all; 8 per host from 16 on). XLA compiles for
an absent GPU from a target description (its ``GpuTargetConfigProto`` text: the device figures the compiler
tunes for), which ``gpu_target_config`` writes from the NVIDIA datasheets and CUDA programming guide's
per-architecture limits (compute capability, SMs, shared memory per SM, L2, clock, memory).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures."""

    name: str
    hbm_gib: float  # memory per chip (GiB)
    bf16_tflops: float  # dense bf16 peak per chip (TFLOP/s)
    hbm_gbps: float  # memory bandwidth per chip (GB/s)


CHIPS: dict[str, Chip] = {
    # Cloud TPU docs, "TPU v4" / "TPU v5e" / "TPU v5p" / "TPU v6e" system-architecture tables.
    "v4": Chip("TPU v4", 32.0, 275.0, 1200.0),
    "v5e": Chip("TPU v5e", 15.75, 197.0, 819.0),  # 16 GiB; 15.75 GiB is what its compiler lets a program use
    "v5p": Chip("TPU v5p", 95.0, 459.0, 2765.0),
    "v6e": Chip("TPU v6e", 32.0, 918.0, 1640.0),
    # NVIDIA A100 (SXM, 80 GB) and H100 (SXM) datasheets, dense (no sparsity) bf16 tensor-core peaks.
    "a100": Chip("NVIDIA A100 80GB SXM", 80.0, 312.0, 2039.0),
    "h100": Chip("NVIDIA H100 SXM", 80.0, 989.0, 3350.0),
    "h200": Chip("NVIDIA H200 SXM", 141.0, 989.0, 4800.0),
}


# jax's device_kind -> CHIPS key, for --topology=local.
_DEVICE_KINDS = {"NVIDIA A100": "a100", "NVIDIA H100": "h100", "NVIDIA H200": "h200"}


def chip_of(device_kind: str) -> str | None:
    """The CHIPS key of a jax ``device_kind`` ('NVIDIA H100 80GB HBM3' -> 'h100'), or None."""
    return next((key for prefix, key in _DEVICE_KINDS.items() if device_kind.startswith(prefix)), None)


@dataclasses.dataclass(frozen=True)
class _Gpu:
    """What XLA's GPU compiler reads of a device (``GpuDeviceInfoProto``): compute capability, streaming
    multiprocessors (SMs), shared memory per SM and per block (opt-in), L2, boost clock, memory."""

    capability: tuple[int, int]
    sms: int
    shared_per_sm_kib: int
    shared_per_block_optin_kib: int
    l2_mib: int
    clock_ghz: float
    memory_gib: float


_GPUS = {
    "a100": _Gpu((8, 0), 108, 164, 163, 40, 1.41, 80.0),  # A100 SXM4 80GB
    "h100": _Gpu((9, 0), 132, 228, 227, 50, 1.98, 80.0),  # H100 SXM5 80GB
    "h200": _Gpu((9, 0), 132, 228, 227, 50, 1.98, 141.0),  # H200 SXM 141GB
}


def gpu_target_config(chip: str) -> str:
    """The ``GpuTargetConfigProto`` text XLA compiles for GPU ``chip`` ('h100', ...) without the device."""
    gpu, figures = _GPUS[chip], CHIPS[chip]
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": gpu.shared_per_sm_kib * 1024,
        "threads_per_core_limit": 2048,
        "core_count": gpu.sms,
        "fpus_per_core": 128 if gpu.capability[0] >= 9 else 64,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(figures.hbm_gbps * 1e9),
        "l2_cache_size": gpu.l2_mib * 2**20,
        "clock_rate_ghz": gpu.clock_ghz,
        "device_memory_size": int(gpu.memory_gib * 2**30),
        "shared_memory_per_block_optin": gpu.shared_per_block_optin_kib * 1024,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    lines = [f"  {key}: {value}" for key, value in info.items()]
    major, minor = gpu.capability
    return "\n".join(
        ["gpu_device_info {", *lines, f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}"]
        + ['platform_name: "CUDA"', f'device_description_str: "{figures.name}"']
    )


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice or GPU node as ``jax.experimental.topologies.get_topology_desc`` takes it."""

    name: str  # the user-facing name, e.g. 'v5e-8', 'h100-8'
    chip: str  # a key of CHIPS
    topology_name: str  # e.g. 'v5e:2x4'; for a GPU node 'slices x hosts x GPUs per host', e.g. '1x1x8'
    chip_config_name: str  # 'megacore' (v4, v5p: one device per chip) or 'default'; '' for GPUs
    chips_per_host_bounds: tuple[int, int, int]
    num_chips: int
    platform: str = "tpu"  # or 'cuda'


# Chip grids by slice size: v4/v5p by TensorCore count (3-D tori), v5e/v6e by chip count (2-D).
_GRIDS_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_PREFIX = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e"}


_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def topology_names() -> list[str]:
    """Every slice and node name ``topology`` accepts."""
    names = [f"{g}-{n}" for g in ("v4", "v5p") for n in _GRIDS_3D]
    names += [f"{g}-{n}" for g in ("v5e", "v6e") for n in _GRIDS_2D]
    return names + [f"{g}-{n}" for g in _GPUS for n in _GPU_COUNTS]


def topology(name: str) -> Topology:
    """The slice or node called ``name`` ('v5e-8', 'v4-8', 'h100-8', ...); ValueError naming the known ones
    otherwise."""
    gpu = re.fullmatch(r"(a100|h100|h200)-(\d+)", name.strip().lower())
    if gpu and int(gpu.group(2)) in _GPU_COUNTS:
        count = int(gpu.group(2))
        per_host = min(count, 8)
        grid = f"1x{count // per_host}x{per_host}"
        return Topology(name, gpu.group(1), grid, "", (per_host, 1, 1), count, platform="cuda")
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    grids = (_GRIDS_3D if match.group(1) in ("v4", "v5p") else _GRIDS_2D) if match else {}
    if not match or int(match.group(2)) not in grids:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(topology_names())}")
    generation, size = match.group(1), int(match.group(2))
    grid = grids[size]
    chips = 1
    for side in grid.split("x"):
        chips *= int(side)
    if generation in ("v4", "v5p"):
        per_host, config = (2, 2, 1), "megacore"
    else:
        per_host, config = ((2, 4, 1) if chips == 8 else (min(chips, 2), min(chips, 2), 1)), "default"
    return Topology(name, generation, f"{_PREFIX[generation]}:{grid}", config, per_host, chips)


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float | None:
    """The step time if the chip ran at its peak on the binding resource: max(compute, memory traffic); None
    for a chip without published peaks (a host CPU)."""
    if not chip.bf16_tflops or not chip.hbm_gbps:
        return None
    return max(flops / (chip.bf16_tflops * 1e12), bytes_accessed / (chip.hbm_gbps * 1e9))
