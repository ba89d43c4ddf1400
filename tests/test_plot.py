"""The trainer's TensorBoard event files read back by TensorBoard's own reader, and the training-curve plotter
that draws several runs on one PNG."""

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from clusterformer_jax import plot
from clusterformer_jax.trainers.summaries import EventWriter


def _run(path, scale):
    writer = EventWriter(str(path))
    writer.write_hparams({"model.name": "clusterformer_nano", "batch_size": 16, "optim.base_lr": 1e-3, "remat": False})
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


def test_hparams_and_scalars_carry_the_tensorboard_plugins(tmp_path):
    _run(tmp_path / "a", 1.0)
    (path,) = (tmp_path / "a").glob("events.out.tfevents.*.v2")
    events = EventAccumulator(str(path), size_guidance={"tensors": 0})
    events.Reload()
    assert events.SummaryMetadata("train_loss").plugin_data.plugin_name == "scalars"
    (content,) = events.PluginTagToContent("hparams").values()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.name"].string_value == "clusterformer_nano" and hparams["batch_size"].number_value == 16
    assert hparams["optim.base_lr"].number_value == 1e-3 and hparams["remat"].bool_value is False
    silent = EventWriter(None)  # the processes other than the first
    silent.write_scalars(1, {"train_loss": 1.0})
    assert silent.path is None and len(list(tmp_path.iterdir())) == 1


def test_plot_runs_writes_one_png_for_two_runs(tmp_path):
    runs = [_run(tmp_path / "a", 1.0), _run(tmp_path / "b", 2.0)]
    out = plot.plot_runs(runs, str(tmp_path / "curves.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
