"""The training-curve plotter reads CLU's TensorBoard scalars back and draws several runs on one PNG."""

import numpy as np
from clu import metric_writers

from clusterformer_jax import plot


def _run(path, scale):
    writer = metric_writers.create_default_writer(str(path), asynchronous=False)
    for step in (10, 20, 30):
        writer.write_scalars(step, {"train_loss": scale / step, "train_learning_rate": 1e-3 * step})
    writer.write_scalars(30, {"eval_top1": 0.5 * scale, "eval_loss": 0.25, "eval_num_examples": 8})
    writer.close()
    return str(path)


def test_read_scalars_returns_the_written_values(tmp_path):
    scalars = plot.read_scalars(_run(tmp_path / "a", 1.0))
    assert [s for s, _ in scalars["train_loss"]] == [10, 20, 30]
    np.testing.assert_allclose([v for _, v in scalars["train_loss"]], [0.1, 0.05, 1 / 30], rtol=1e-6)
    np.testing.assert_allclose(scalars["eval_top1"], [(30, 0.5)])
    assert plot.panels(scalars) == {
        "loss": ["train_loss", "eval_loss"],
        "metrics": ["eval_top1"],
        "learning rate": ["train_learning_rate"],
    }


def test_plot_runs_writes_one_png_for_two_runs(tmp_path):
    runs = [_run(tmp_path / "a", 1.0), _run(tmp_path / "b", 2.0)]
    out = plot.plot_runs(runs, str(tmp_path / "curves.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
