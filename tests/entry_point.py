"""``python -m clusterformer_jax.main`` in this process: the entry point's own flag parsing and checks without
a Python start and its imports (seconds each). test_errors keeps one real ``python -m`` run of the contract."""

from __future__ import annotations

import contextlib
import io
import sys
from unittest import mock

from absl import flags


def _reset_flags() -> None:
    """Forgets the last parse: values, and the ``--config.*`` override flags config_flags defined for it."""
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def run_main(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of the entry point on ``argv``, as ``app.run`` would call it; training, should the
    input pass every check, fails the test instead of starting."""
    from clusterformer_jax import main as main_lib
    from clusterformer_jax.trainers import trainer

    def no_training(config, workdir):
        raise AssertionError("the input passed every check and training started")

    _reset_flags()
    err, code = io.StringIO(), 0
    # config_flags reads its overrides from sys.argv, as under app.run.
    with (
        contextlib.redirect_stderr(err),
        mock.patch.object(sys, "argv", ["main"] + argv),
        mock.patch.object(trainer, "train_and_evaluate", no_training),
    ):
        try:
            main_lib.parse_flags(["main"] + argv)
            main_lib.main([])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    _reset_flags()
    return code, err.getvalue()
