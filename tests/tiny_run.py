"""Training subprocesses of a tiny config for the preemption and checkpoint tests.

The quickstart (digits) through ``clusterformer_jax.main`` with a two-layer model registered in the child,
every random op of the classification task on (dropout, Mixup/CutMix, label smoothing), and a train
iterator that sleeps a little per batch so that a signal lands mid-run. Programs go to a shared persistent
compilation cache, so only the first run compiles.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests import CPU_COMPILE_FLAGS

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 20
EVERY = 10
SAVED = list(range(EVERY, TOTAL_STEPS + 1, EVERY))  # the steps an uninterrupted run checkpoints

CHILD = """
import atexit, json, sys, time
import flax.linen as nn
from clusterformer_jax.data import pipeline
from clusterformer_jax.models import registry

class TinyNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(images)).mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(nn.Dropout(0.2)(x, deterministic=not train))

class Slowed:
    def __init__(self, inner, seconds):
        self._inner, self._seconds = inner, seconds
    def __iter__(self):
        return self
    def __next__(self):
        time.sleep(self._seconds)
        return next(self._inner)
    def get_state(self):
        return json.dumps(self._inner.get_state()).encode()
    def set_state(self, state):
        self._inner.set_state(json.loads(state))
    def start_prefetch(self):
        if hasattr(self._inner, "start_prefetch"):
            self._inner.start_prefetch()
    def close(self):
        if hasattr(self._inner, "close"):
            self._inner.close()

registry.register_model("tiny_test_net", TinyNet)
atexit.register(lambda: print("imported tensorflow:", "tensorflow" in sys.modules, flush=True))
create, seconds = pipeline.create_train_iterator, float(sys.argv.pop(1))
pipeline.create_train_iterator = lambda *a, **k: Slowed(create(*a, **k), seconds)
from clusterformer_jax import main
main.run()
"""


def args(workdir: Path, data_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--config=configs/quickstart.py",
        f"--workdir={workdir}",
        "--config.model.name=tiny_test_net",
        f"--config.input.data_dir={data_dir}",
        f"--config.compilation_cache_dir={cache_dir}",
        "--config.batch_size=16",
        "--config.eval_batch_size=120",
        f"--config.num_train_steps={TOTAL_STEPS}",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=0",
        f"--config.checkpoint.every_steps={EVERY}",
        "--config.checkpoint.keep=5",
        "--config.optim.warmup_steps=5",
        "--config.classification.label_smoothing=0.1",
        "--config.classification.mixup_alpha=0.8",
        "--config.classification.cutmix_alpha=1.0",
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("CLUSTERFORMER_")}
    out.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=CPU_COMPILE_FLAGS,  # one CPU device per process
        PYTHONPATH=str(REPO),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    out.update(extra)
    return out


def start(run_args: list[str], sleep: float = 0.0, child: str = CHILD, **env_extra: str) -> subprocess.Popen:
    """Starts ``child`` (``CHILD`` or a variant of it) on ``run_args``; stdout and stderr in one pipe."""
    return subprocess.Popen(
        [sys.executable, "-c", child, str(sleep), *run_args],
        cwd=REPO,
        env=env(**env_extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(run_args: list[str], num_processes: int, sleep: float = 0.0) -> list[subprocess.Popen]:
    """``num_processes`` runs of ``run_args`` joined by jax.distributed on 127.0.0.1, one CPU device each."""
    port = free_port()
    return [
        start(
            run_args,
            sleep=sleep,
            CLUSTERFORMER_DISTRIBUTED="1",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            CLUSTERFORMER_NUM_PROCESSES=str(num_processes),
            CLUSTERFORMER_PROCESS_ID=str(i),
        )
        for i in range(num_processes)
    ]


def run(run_args: list[str], timeout: float = 240, **env_extra: str) -> tuple[int, str]:
    proc = start(run_args, **env_extra)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(proc: subprocess.Popen, needle: str, lines: list[str], timeout: float = 240) -> None:
    """Reads ``proc``'s output into ``lines`` until a line contains ``needle``."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return
        if time.time() > deadline:
            break
    raise AssertionError(f"never saw {needle!r}; output tail:\n{''.join(lines[-30:])}")


def interrupt(proc: subprocess.Popen, at_step: int, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Sends ``sig`` once the run has logged step ``at_step``; returns (exit code, output)."""
    lines: list[str] = []
    wait_for(proc, f"step {at_step}/{TOTAL_STEPS} ", lines)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    return proc.returncode, "".join(lines) + out


def steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def stored_state(workdir: Path, step: int) -> dict:
    """The 'state' item of one step as stored (numpy leaves), read without the model."""
    path = (workdir / "checkpoints" / str(step) / "state").resolve()
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, restore_args=restore_args)


def assert_states_equal(got: dict, want: dict) -> None:
    flat_got, tree_got = jax.tree.flatten(got)
    flat_want, tree_want = jax.tree.flatten(want)
    assert tree_got == tree_want
    assert len(flat_got) > 5
    for a, b in zip(flat_got, flat_want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
