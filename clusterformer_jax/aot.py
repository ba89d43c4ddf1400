r"""Ahead-of-time compile check: does a recipe fit a TPU slice or GPU node, and what does a step cost?

  bash launch/aot.sh --config=configs/clusterformer_tiny_imagenet.py --topology=v5e-8 [--config.a=b ...]
  python -m clusterformer_jax.aot --config=... --topology=v5e-8 [--per_chip_batch=64] [--max_batch] [--json=F]

Builds the run's ``Setup`` (``trainers/setup.build``: the very jitted train and predict steps that training
runs) on a mesh of the slice's devices, with that accelerator's execution settings, from abstract state and an
abstract batch (shapes from the task and the input config: no data is read, no parameter is created), and
compiles both steps with the real TPU compiler (libtpu, loaded on this CPU host; the approach of MaxText's
``train_compile.py``). Per chip it prints the compiler's memory analysis (arguments / outputs / temporaries /
total against the chip's HBM), its cost analysis (FLOPs and bytes accessed per step), a roofline step time at
the chip's published bf16 peak and HBM bandwidth (``accelerators.py``), the compile time and the chip-hours
of the config's schedule at that step time.

``--topology=h100-8`` (a100-N, h100-N, h200-N) compiles with XLA's GPU compiler for a node of absent GPUs,
described by ``accelerators.gpu_target_config`` (jax's CUDA plugin in compile-only mode); that compiler gives
memory but no cost analysis (jax 0.10.2), so a GPU report has no FLOPs, bytes or roofline.
``--topology=local`` compiles for this process's own devices instead (a GPU where one is attached, or the CPU
against the host's memory).

Exit codes: 0 fits; 1 does not fit (one line: GiB needed vs available); 2 bad flags or config. ``--max_batch``
finds the largest per-chip batch whose train step fits (an affine fit of two compiles, then checked by
compiling the boundary); without it, one compile bounds that batch (``batch_bound``).

The compilers are not dependencies of training: ``launch/aot.sh`` installs libtpu into ``.venv/libtpu_aot``
(or ``$CLUSTERFORMER_LIBTPU_DIR``) and, for GPU nodes, jax's CUDA plugin with CUDA's compiler parts into
``.venv/cuda_aot`` (or ``$CLUSTERFORMER_CUDA_AOT_DIR``); only this module puts those folders on ``sys.path``,
with ``JAX_PLATFORMS=cpu`` so that jax never tries to open a TPU or GPU on the host.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

if __name__ == "__main__" and "--topology=local" not in sys.argv:  # before the configs import jax: no TPU here
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several checks (or test workers) at a time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from clusterformer_jax import accelerators  # noqa: E402
from clusterformer_jax import main as entry  # noqa: E402  # its --config flag and one-line flag errors (imports no jax)

# platform: (environment variable naming its folder, the folder inside the venv, a path inside it that shows an
# install, launch/_env.sh's package list)
COMPILERS = {
    "tpu": ("CLUSTERFORMER_LIBTPU_DIR", "libtpu_aot", os.path.join("libtpu", "__init__.py"), "CF_LIBTPU_PACKAGES"),
    "cuda": ("CLUSTERFORMER_CUDA_AOT_DIR", "cuda_aot", "jax_plugins", "CF_CUDA_AOT_PACKAGES"),
}

EXIT_DOES_NOT_FIT = 1
EXIT_USAGE = 2
GIB = 1024**3

_CONFIG = entry._CONFIG  # pylint: disable=protected-access
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    "v5e-8",
    f"TPU slice or GPU node ({', '.join(accelerators.topology_names())}) or 'local' (this process's devices).",
)
_PER_CHIP_BATCH = flags.DEFINE_integer("per_chip_batch", 0, "Train batch per chip (0: the config's batch_size).")
_MAX_BATCH = flags.DEFINE_boolean("max_batch", False, "Also find the largest per-chip train batch that fits.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per chip to check against (0: the chip's published HBM).")
_TRAIN = flags.DEFINE_boolean("train", True, "Compile the train step (false: the predict step alone).")
_PREDICT = flags.DEFINE_boolean("predict", True, "Also compile the predict (eval) step.")
_JSON = flags.DEFINE_string("json", "", "Write the report to this JSON file.")


def compiler_dir(platform: str) -> str:
    """Where launch/aot.sh installs the compiler for ``platform`` ('tpu': libtpu, 'cuda': jax's CUDA plugin):
    the folder its environment variable names, else one inside the venv."""
    env, default, _, _ = COMPILERS[platform]
    return os.environ.get(env) or os.path.join(sys.prefix, default)


def compiler_installed(platform: str) -> bool:
    """Whether launch/aot.sh (or the user) has installed ``platform``'s compiler in ``compiler_dir``."""
    return os.path.exists(os.path.join(compiler_dir(platform), COMPILERS[platform][2]))


def use_compiler(platform: str) -> None:
    """Puts the platform's compiler on the import path of this process only (jax finds it when the topology is
    requested)."""
    folder = compiler_dir(platform)
    if not compiler_installed(platform):
        env, _, _, packages = COMPILERS[platform]
        raise FileNotFoundError(
            f"the {platform} compiler is not installed in {folder}; run the check through `bash launch/aot.sh "
            f"...` (installs it), or `pip install --no-deps --target DIR ${packages}` (launch/_env.sh) and set "
            f"{env}=DIR"
        )
    sys.path.insert(0, folder)
    if platform == "cuda" and "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
        # without a device, XLA's GPU compiler fails to tile some of CF-T's Triton GEMMs ("Couldn't find output
        # tile sizes", stage 0's center FFN at 64 images/GPU); with cuBLAS GEMMs the same program compiles
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()


def _abstract(tree: Any, sharding: Any) -> Any:
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def abstract_batch(module: Any, config: Any, global_batch: int, sharding: Any, eval_mode: bool) -> dict[str, Any]:
    """A batch of ``global_batch`` rows shaped like the input pipeline's, as sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    row = module.example_spec(config.input, eval_mode)
    return {
        k: jax.ShapeDtypeStruct((global_batch, *np.shape(v)), np.asarray(v).dtype, sharding=sharding)
        for k, v in row.items()
    }


def _memory(compiled: Any) -> dict[str, float]:
    stats = compiled.memory_analysis()
    args, outs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {
        "arguments_gib": args / GIB,
        "outputs_gib": outs / GIB,
        "aliased_gib": alias / GIB,  # donated inputs written in place: counted once
        "temporaries_gib": temp / GIB,
        "code_gib": stats.generated_code_size_in_bytes / GIB,
        "total_gib": (args + outs - alias + temp + stats.generated_code_size_in_bytes) / GIB,
    }


def _cost(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes accessed per chip; empty where the compiler gives none (XLA GPU without a device)."""
    cost = compiled.cost_analysis()
    if not cost:
        return {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"tflop": float(cost.get("flops", 0.0)) / 1e12, "gb_accessed": float(cost.get("bytes accessed", 0.0)) / 1e9}


_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collectives(hlo_text: str) -> dict[str, float]:
    """GiB per chip that each kind of collective produces in a compiled module's text (tuple results
    summed). Under data parallelism with replicated parameters an all-gather means the partitioner gathered
    activations (a merged axis that hides the batch), which costs memory and interconnect."""
    totals: dict[str, float] = {}
    for result, op in _COLLECTIVE.findall(hlo_text):
        size = sum(
            _BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(result)
        )
        totals[op] = totals.get(op, 0.0) + size / GIB
    return totals


_OOM = re.compile(r"(?:Ran out of memory|RESOURCE_EXHAUSTED)", re.I)
_NEEDED = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def _needed_gib(message: str) -> float | None:
    match = _NEEDED.search(message)
    if not match:
        return None
    scale = {"K": 2**-20, "M": 2**-10, "G": 1.0, "T": 1024.0}
    return float(match.group(1)) * scale[match.group(2)]


def compile_program(jitted: Any, args: Sequence[Any], hbm_gib: float) -> dict[str, Any]:
    """Compiles ``jitted`` for ``args``; the memory and cost per chip, or fits=False with the GiB needed."""
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except  # the TPU compiler's OOM is an XlaRuntimeError
        if not _OOM.search(str(e)):
            raise
        return {"fits": False, "total_gib": _needed_gib(str(e)), "compile_s": time.perf_counter() - start}
    report = {**_memory(compiled), **_cost(compiled), "compile_s": time.perf_counter() - start}
    report["collectives_gib"] = collectives(compiled.as_text())
    report["fits"] = report["total_gib"] <= hbm_gib
    return report


def topology_devices(topology: accelerators.Topology) -> list[Any]:
    """The devices of a TPU slice or GPU node as its compiler describes them, with no hardware present (the
    compiler must be on the import path: ``use_compiler``)."""
    from jax.experimental import topologies

    if topology.platform == "cuda":
        described = topologies.get_topology_desc(
            platform="cuda",
            target_config=accelerators.gpu_target_config(topology.chip),
            topology=topology.topology_name,
        )
    else:
        described = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.topology_name,
            chip_config_name=topology.chip_config_name,
            chips_per_host_bounds=topology.chips_per_host_bounds,
            num_slices=1,
        )
    return described.devices


class CompileCheck:
    """One config on one slice: ``train(per_chip_batch)`` and ``predict()`` compile reports."""

    def __init__(self, config: Any, topology: accelerators.Topology, chip: accelerators.Chip, hbm_gib: float):
        import jax

        from clusterformer_jax import sharding
        from clusterformer_jax.tasks import registry as task_registry

        self.config, self.topology = config, topology
        self.chip, self.hbm_gib = chip, hbm_gib
        if topology.name == "local":  # this process's own devices (a lent GPU, or the CPU), its own settings
            self.devices, self.machine = jax.devices(), None
        else:
            self.devices = topology_devices(topology)
            backend = "gpu" if topology.platform == "cuda" else "tpu"
            self.machine = {"backend": backend, "num_devices": len(self.devices), "allocator": "none"}
        self.mesh = sharding.create_mesh(config.mesh, devices=self.devices)
        self.module = task_registry.input_module(config)
        self.dataset_info = self.module.offline_dataset_info(config.input)
        self._jax = jax

    def _setup(self, global_batch: int) -> Any:
        from clusterformer_jax.trainers import setup as setup_lib
        from clusterformer_jax.trainers import trainer

        config = self.config.copy_and_resolve_references()
        with config.unlocked():
            config.batch_size = global_batch
        trainer._validate(config, self.mesh)  # pylint: disable=protected-access
        total_steps, per_epoch = trainer.resolve_run_lengths(config, int(self.dataset_info["num_train"]))
        setup = setup_lib.build(
            config,
            self.mesh,
            self.dataset_info,
            total_steps=total_steps,
            steps_per_epoch=per_epoch,
            machine=self.machine,
        )
        return setup, total_steps

    def train(self, per_chip_batch: int) -> dict[str, Any]:
        """The train step at ``per_chip_batch`` images per chip."""
        from clusterformer_jax import sharding
        from clusterformer_jax.trainers.setup import Health

        global_batch = per_chip_batch * len(self.devices)
        setup, total_steps = self._setup(global_batch)
        repl = sharding.replicated(self.mesh)
        acc = _abstract(self._jax.eval_shape(lambda: (setup.train_metrics_cls.empty(), Health.empty())), repl)
        batch = abstract_batch(self.module, setup.config, global_batch, setup.batch_sharding, eval_mode=False)
        report = compile_program(setup.train_step, (setup.abstract_with_shardings(), batch, acc), self.hbm_gib)
        report.update(per_chip_batch=per_chip_batch, global_batch=global_batch, total_steps=total_steps)
        if int(setup.config.grad_accum_steps) > 1 and "tflop" in report:
            # XLA's cost analysis counts a loop's body once, so with micro-batches (a scan) it counts one of them
            # plus the update: no step cost or roofline from it
            report["micro_batch_tflop"] = report.pop("tflop")
            report["micro_batch_gb_accessed"] = report.pop("gb_accessed")
        step_s = None
        if "tflop" in report:
            step_s = accelerators.roofline_seconds(report["tflop"] * 1e12, report["gb_accessed"] * 1e9, self.chip)
        if step_s is not None:
            report["roofline_step_s"] = step_s
            report["schedule_chip_hours"] = step_s * total_steps * len(self.devices) / 3600
        return report

    def predict(self) -> dict[str, Any]:
        """The predict step at the config's eval batch."""
        eval_batch = int(self.config.eval_batch_size) if self.config.eval_batch_size > 0 else self.config.batch_size
        setup, _ = self._setup(int(self.config.batch_size))
        batch = abstract_batch(self.module, setup.config, eval_batch, setup.batch_sharding, eval_mode=True)
        report = compile_program(setup.predict_step, (setup.abstract_with_shardings(), batch), self.hbm_gib)
        report.update(per_chip_batch=eval_batch // len(self.devices), global_batch=eval_batch)
        return report

    def max_batch(self, first: dict[str, Any]) -> tuple[int, list[int]]:
        """The largest per-chip train batch that fits (0: not even one image) and the batches compiled.

        A step's memory is affine in the batch (the compiler reports what a step needs even when it does not
        fit), so a second compile beside ``first`` (the train report at some batch) gives the line; its
        prediction is then checked by compiling it and its neighbour, stepping by one until the boundary
        is found (each compile of a paper-size model takes minutes, so a plain bisection would take hours)."""
        cache: dict[int, dict[str, Any]] = {first["per_chip_batch"]: first}

        def report(batch: int) -> dict[str, Any]:
            if batch not in cache:
                cache[batch] = self.train(batch)
            return cache[batch]

        b1 = first["per_chip_batch"]
        b2 = b1 // 2 if b1 > 1 else 2
        (x1, y1), (x2, y2) = ((b, report(b)["total_gib"]) for b in (b1, b2))
        if y1 is None or y2 is None or y1 == y2:
            guess = b1 if first["fits"] else 1
        else:
            per_image = (y1 - y2) / (x1 - x2)
            guess = max(1, int((self.hbm_gib - (y1 - per_image * x1)) // per_image))
        while guess > 0 and not report(guess)["fits"]:
            guess -= 1
        while guess > 0 and report(guess + 1)["fits"]:
            guess += 1
        return guess, sorted(cache)


def batch_bound(step: dict[str, Any], hbm_gib: float) -> int:
    """What one compiled train step says of the largest per-chip batch that fits, without another compile.

    A step that fits: its temporaries taken as all per-image and the rest (arguments, outputs, code) as fixed.
    If memory is affine in the batch with a non-negative fixed part (gradients, optimizer scratch), that is a
    lower bound, to within the input batch's own bytes (counted as fixed); larger batches can only do better,
    since the TPU compiler rematerialises on its own when a program exceeds the chip (CF-T paper on v5e-8: 0.129
    GiB of temporaries per image in float32 at 128/chip, over the chip, against 0.198 in bfloat16 at 64/chip,
    which fits). A step that does not fit: the batch below it (for the same reason, no line extrapolates from an
    over-budget compile)."""
    batch = step["per_chip_batch"]
    if not step["fits"]:
        return batch - 1
    per_image = step["temporaries_gib"] / batch
    return max(batch, int((hbm_gib - (step["total_gib"] - step["temporaries_gib"])) // per_image))


def _row(name: str, r: dict[str, Any], hbm: float) -> str:
    if "temporaries_gib" not in r:
        needed = f"{r['total_gib']:.2f}" if r.get("total_gib") else "?"
        return f"{name:8s} batch/chip {r['per_chip_batch']:4d}: does not fit, needs {needed} GiB of {hbm:.2f}"
    text = (
        f"{name:8s} batch/chip {r['per_chip_batch']:4d}: args {r['arguments_gib']:.2f} + out {r['outputs_gib']:.2f}"
        f" - aliased {r['aliased_gib']:.2f} + temp {r['temporaries_gib']:.2f} = {r['total_gib']:.2f} GiB of"
        f" {hbm:.2f} ({'fits' if r['fits'] else 'DOES NOT FIT'}); "
    )
    if "tflop" in r:
        text += f"{r['tflop']:.4g} TFLOP, {r['gb_accessed']:.1f} GB accessed; "
    text += f"compile {r['compile_s']:.0f} s"
    if "roofline_step_s" in r:
        text += f"; roofline {r['roofline_step_s'] * 1e3:.0f} ms/step, schedule {r['schedule_chip_hours']:.0f} chip-h"
    return text


def run(
    config: Any,
    topology_name: str,
    per_chip_batch: int,
    hbm_gib: float,
    predict: bool,
    max_batch: bool,
    train: bool = True,
):
    """The whole check; returns (report dict, exit code)."""
    if not (train or predict):
        raise ValueError("nothing to compile: --train=false needs --predict=true")
    if topology_name == "local":
        import jax

        kind = jax.devices()[0].device_kind
        key = accelerators.chip_of(kind)
        if key:
            chip = accelerators.CHIPS[key]
        else:  # the host CPU (its memory), or a device without published figures
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB if kind == "cpu" else 0.0
            chip = accelerators.Chip(kind, hbm_gib or total, 0.0, 0.0)
        topology = accelerators.Topology("local", key or kind, "", "", (1, 1, 1), jax.device_count())
    else:
        topology = accelerators.topology(topology_name)
        use_compiler(topology.platform)
        chip = accelerators.CHIPS[topology.chip]
    if not (hbm_gib or chip.hbm_gib):
        raise ValueError(f"no memory size known for device {chip.name!r}; pass --hbm_gib")
    check = CompileCheck(config, topology, chip, hbm_gib or chip.hbm_gib)
    chips = len(check.devices)
    if not per_chip_batch:
        if config.batch_size % chips:
            raise ValueError(f"batch_size={config.batch_size} does not split over {chips} chips; set --per_chip_batch")
        per_chip_batch = config.batch_size // chips
    report: dict[str, Any] = {
        "config": config.model.name,
        "task": config.task,
        "topology": topology.name,
        "chip": check.chip.name,
        "chips": chips,
        "hbm_gib": check.hbm_gib,
        "dtype": config.model.kwargs.get("dtype"),
    }
    print(f"{topology.name} ({chips} x {check.chip.name}), model {config.model.name}, task {config.task}")
    if train:
        report["train"] = check.train(per_chip_batch)
        print(_row("train", report["train"], check.hbm_gib))
    if predict:
        report["predict"] = check.predict()
        print(_row("predict", report["predict"], check.hbm_gib))
    if train and max_batch:
        report["max_per_chip_batch"], report["max_batch_compiled"] = check.max_batch(report["train"])
        print(f"largest per-chip train batch that fits: {report['max_per_chip_batch']}")
    elif train:
        side = "at least" if report["train"]["fits"] else "at most"
        bound = batch_bound(report["train"], check.hbm_gib)
        print(f"largest per-chip train batch that fits: {side} {bound} by this compile (--max_batch finds it)")
    failed = [k for k in ("train", "predict") if k in report and not report[k]["fits"]]
    if failed:
        r = report[failed[0]]
        needed = f"{r['total_gib']:.2f} GiB" if r.get("total_gib") else "more than the chip has"
        print(
            f"error: the {failed[0]} step does not fit on {topology.name}: needs {needed} per chip, "
            f"{check.hbm_gib:.2f} GiB available; lower the per-chip batch (--max_batch finds the largest) or "
            "turn on remat",
            file=sys.stderr,
        )
    return report, EXIT_DOES_NOT_FIT if failed else 0


def _parse(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            getattr(config, "task", None)
    except SystemExit:
        raise
    except Exception as e:  # pylint: disable=broad-except
        print(f"error: {entry._describe_flag_error(e, argv)}", file=sys.stderr)  # pylint: disable=protected-access
        sys.exit(EXIT_USAGE)
    if config is None:
        print("error: --config is required, e.g. --config=configs/quickstart.py", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return remaining


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        report, code = run(
            _CONFIG.value,
            _TOPOLOGY.value,
            _PER_CHIP_BATCH.value,
            _HBM_GIB.value,
            _PREDICT.value,
            _MAX_BATCH.value,
            _TRAIN.value,
        )
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        print(f"error: {first}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=lambda v: None if math.isnan(v) else v)
    sys.exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
