r"""Training curves from runs' TensorBoard event files: loss, eval metrics and learning rate in one PNG.

  python -m clusterformer_jax.plot --workdir=RUN[,RUN2,...] --out=curves.png

Reads every ``events.out.tfevents.*`` under each workdir (CLU's writer logs scalars as tensors) and draws
three panels: train/eval loss, the eval metrics (top-1/top-5, AP, mIoU, PQ: every ``eval_*`` tag but the
loss and example counts), and the learning rate; one colour per run, so several runs compare on one figure.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

_SKIP = ("eval_loss", "eval_num_examples")


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)] sorted by step} of the scalar summaries in ``workdir``'s event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    files = sorted(glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise FileNotFoundError(f"{workdir!r} holds no TensorBoard event files")
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        events = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        for tag in events.Tags()["tensors"]:
            for event in events.Tensors(tag):
                value = tensor_util.make_ndarray(event.tensor_proto)
                if value.shape == () and np.issubdtype(value.dtype, np.number):
                    scalars.setdefault(tag, {})[event.step] = float(value)
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


def panels(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[str]]:
    """The tags of each panel: 'loss', 'metrics', 'learning rate'."""
    metrics = sorted(t for t in scalars if t.startswith("eval_") and t not in _SKIP)
    return {
        "loss": [t for t in ("train_loss", "eval_loss") if t in scalars],
        "metrics": metrics,
        "learning rate": [t for t in ("train_learning_rate",) if t in scalars],
    }


def plot_runs(workdirs: Sequence[str], out: str) -> str:
    """Draws ``workdirs``' curves into ``out`` (PNG); returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for index, workdir in enumerate(workdirs):
        scalars = read_scalars(workdir)
        colour = f"C{index % 10}"
        run = os.path.basename(os.path.normpath(workdir))
        for ax, (title, tags) in zip(axes, panels(scalars).items()):
            for style, tag in zip(("-", "--", ":", "-."), tags):
                steps, values = zip(*scalars[tag])
                marker = "o" if len(steps) < 12 else None
                ax.plot(steps, values, style, color=colour, marker=marker, ms=3, label=f"{run}: {tag}")
            ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def define_flags() -> None:
    """The command line (defined only when run as a script: the modules import side by side)."""
    flags.DEFINE_list("workdir", [], "Training workdirs (comma-separated) to draw on one figure.")
    flags.DEFINE_string("out", "curves.png", "The PNG to write.")


def main(argv: Sequence[str]) -> None:
    del argv
    if not flags.FLAGS.workdir:
        raise app.UsageError("pass --workdir=RUN[,RUN2,...]")
    print(plot_runs(flags.FLAGS.workdir, flags.FLAGS.out))


if __name__ == "__main__":
    define_flags()
    app.run(main)
