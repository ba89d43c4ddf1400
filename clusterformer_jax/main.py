r"""Entry point: ``python -m clusterformer_jax.main --config=configs/FILE.py[:arg] --workdir=DIR``.

Override any config field with ``--config.a.b=value``. The config is locked, so an unknown field or a value
of the wrong type stops the program with one line on stderr (exit code 2). A run restarted on the same
workdir resumes from its latest checkpoint.

Multi-process jobs call ``jax.distributed.initialize()`` when ``--config.distributed=True`` or when the
environment sets ``CLUSTERFORMER_DISTRIBUTED=1`` (the launch/ scripts do); ``CLUSTERFORMER_NUM_PROCESSES``
and ``CLUSTERFORMER_PROCESS_ID`` (with JAX's ``JAX_COORDINATOR_ADDRESS``) describe jobs that no cluster
environment (SLURM, TPU, ...) describes on its own.

SIGTERM or SIGINT stops a run after the step in flight, commits a checkpoint of it (with the data position)
and exits with code 75 (``preemption.EXIT_PREEMPTED``); rerunning the same command resumes bit for bit. A
signal while the run still prepares data or compiles stops it before its first step (exit 75, nothing new to
save). A second signal exits at once, compiling or not. A second run on a workdir that a live run holds
(``workdir_lock``) stops with one line before writing anything (exit 2).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clusterformer_jax.errors import one_line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.")

ENV_DISTRIBUTED = "CLUSTERFORMER_DISTRIBUTED"
ENV_NUM_PROCESSES = "CLUSTERFORMER_NUM_PROCESSES"
ENV_PROCESS_ID = "CLUSTERFORMER_PROCESS_ID"

EXIT_USAGE = 2
EXIT_FAILURE = 1


# Config keys that no longer exist, with what to use instead.
_REMOVED_KEYS = {"mesh.tensor": "tensor parallelism is not implemented; use data and fsdp"}


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _override_key(argv: Sequence[str], missing: str) -> str | None:
    """The full dotted name of the ``--config.*`` override that mentions ``missing`` (None: no override does)."""
    for arg in argv:
        match = re.match(r"--config\.([^=\s]+)", arg)
        if match and missing in match.group(1).split("."):
            return match.group(1)
    return None


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    return chain


def _config_path(argv: Sequence[str]) -> str | None:
    """The file of ``--config=FILE[:arg]``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=").split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


def _describe_flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line for a flag-parsing failure: an unknown config key by its full dotted name (ml_collections'
    KeyError carries the missing name; its 'Did you mean' line is kept), a missing config file by its path,
    otherwise the flag's first line, followed by the exception the config file raised when there was one."""
    chain = _chain(error)
    key_errors = [e for e in chain if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str)]
    key = _override_key(argv, key_errors[-1].args[0]) if key_errors else None
    if key is not None:
        hints = [line.strip() for e in key_errors for line in e.args[0].splitlines()[1:] if line.strip()]
        hint = _REMOVED_KEYS.get(key) or " ".join(dict.fromkeys(hints))
        return f"unknown config key 'config.{key}'" + (f" ({hint})" if hint else "")
    path = _config_path(argv)
    if path and not os.path.exists(path):
        return f"config file {path!r} does not exist; pass one, e.g. --config=configs/quickstart.py"
    head, root = one_line(error), chain[-1]
    if root is error or "\n" not in str(error).strip():
        return head
    return f"{head.rstrip(':')}: {one_line(root, with_type=True)}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports errors as one line (exit code 2) instead of a traceback."""
    try:
        remaining = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            getattr(config, "task", None)  # A config file that failed to load raises here.
    except SystemExit:
        raise
    except Exception as e:  # pylint: disable=broad-except
        _fail(_describe_flag_error(e, argv), EXIT_USAGE)
    if config is None:
        _fail("--config is required, e.g. --config=configs/quickstart.py", EXIT_USAGE)
    if not _WORKDIR.value:
        _fail("--workdir is required", EXIT_USAGE)
    if len(remaining) > 1:
        _fail(f'unexpected positional arguments: {" ".join(remaining[1:])}', EXIT_USAGE)
    return remaining


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def maybe_initialize_distributed(config: Any) -> None:
    """Starts jax.distributed when the config or the launcher asks for it."""
    if not (config.distributed or _env_flag(ENV_DISTRIBUTED)):
        return
    import jax

    kwargs: dict[str, Any] = {}
    if os.environ.get(ENV_NUM_PROCESSES):
        kwargs["num_processes"] = int(os.environ[ENV_NUM_PROCESSES])
    if os.environ.get(ENV_PROCESS_ID):
        kwargs["process_id"] = int(os.environ[ENV_PROCESS_ID])
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


class _QuietLibraries:
    """Drops INFO chatter from Orbax, grain and tfds (a few dozen lines per checkpoint) from the absl log, and
    the tracebacks of errors that they and CLU log from background threads: those errors reach the run, which
    ends with one line naming them (a full disk otherwise printed hundreds of tracebacks)."""

    _NOISY = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "grain", "tensorflow_datasets"))
    _THREADED = _NOISY + (f"{os.sep}clu{os.sep}",)

    def filter(self, record: Any) -> bool:
        if record.levelno >= 40 and record.exc_info and any(part in record.pathname for part in self._THREADED):
            record.exc_info, record.exc_text = None, None
        return record.levelno >= 30 or not any(part in record.pathname for part in self._NOISY)


def main(argv: Sequence[str]) -> None:
    del argv
    import logging as py_logging

    py_logging.getLogger("absl").addFilter(_QuietLibraries())
    config = _CONFIG.value
    workdir = _WORKDIR.value
    maybe_initialize_distributed(config)  # Before anything touches a JAX backend.
    # Heavy imports (JAX, TF) only after the flags parse. One task table, one trainer for every task.
    from clusterformer_jax.checkpointing import CheckpointError
    from clusterformer_jax.errors import ConfigError, NonFiniteError, UsageError
    from clusterformer_jax.tasks import registry as task_registry

    if config.task not in task_registry.TASKS:
        _fail(f"unknown config.task {config.task!r}; available: {', '.join(sorted(task_registry.TASKS))}", EXIT_USAGE)
    from clusterformer_jax.preemption import EXIT_PREEMPTED, PreemptionGuard
    from clusterformer_jax.trainers import preflight, trainer

    # The guard covers data preparation and compilation too: a first signal stops at the next safe point,
    # a second one exits at once.
    with PreemptionGuard() as guard:
        try:
            preflight.check(config, workdir)  # Bad input stops here, with the workdir untouched.
            if guard.stop_requested:
                result = {"preempted": True, "steps": None, "saved": False}
            else:
                result = trainer.train_and_evaluate(config, workdir)
        except CheckpointError as e:
            _fail(str(e), EXIT_FAILURE)
        except ConfigError as e:
            _fail(f"config: {e}", EXIT_USAGE)
        except UsageError as e:
            _fail(str(e), EXIT_USAGE)
        except NonFiniteError as e:
            _fail(str(e), EXIT_FAILURE)
    if result.get("preempted"):
        if result.get("saved", True):
            what = f"preempted at step {result['steps']}: checkpoint saved in {workdir}"
        else:
            at = "" if result["steps"] is None else f" (at step {result['steps']})"
            what = f"stopped by {guard.signal_name} before the first step of this run{at}: nothing new to save"
        print(f"{what}; exit code {EXIT_PREEMPTED}, rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
