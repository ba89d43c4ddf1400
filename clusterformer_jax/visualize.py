r"""Cluster maps (paper Figure 3): which center every pixel is assigned to, at every EM step.

  python -m clusterformer_jax.visualize --workdir=RUN [--image=PATH] [--stage=S --block=B --head=H --step=t] --out=PNG
  python -m clusterformer_jax.visualize --model=clusterformer_tiny --init_from=converted.safetensors --out=PNG
  python -m clusterformer_jax.visualize --workdir=DENSE_RUN --decoder_layer=L [--head=H --step=t] --out=PNG

Runs the model once on the image with flax's ``intermediates`` collection mutable: the clustering mixers sow
their own (T, G, K, N) assignment (ClusterFormer: the E-step's M of each EM step; Context Cluster: the
point-to-center similarity, T = 1), and the map colours each pixel by its argmax center (one colour per
center and window) with each center's position, the assignment-weighted mean of its pixels, as a dot. One
panel per EM step (or only ``--step``), tiled in a strip. ``--decoder_layer`` draws a dense run's cluster
decoder instead: its layer's queries are the centers, the (T, B, heads, Q, N) assignment its EM steps sow,
the map each pixel's query on that layer's pixel-feature grid (stride 32, 16 or 8), upsampled to the image.
The image: ``--image``, else scikit-learn's ``china.jpg`` sample photograph. Weights: a run's workdir
(config.json + latest checkpoint), a converted ``--init_from`` file for ``--model``, or a random
initialisation of ``--model`` (maps of an untrained model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np
from absl import app, flags

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.models import registry as model_registry
from clusterformer_jax.models.clustering import MixerConfig
from clusterformer_jax.models.context_cluster import stage_sizes

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _unchunked(mixer, encoder: bool):
    if encoder and mixer.partition != "spatial":
        raise ConfigError("cluster maps need partition='spatial': the released raw layout's tokens are not pixels")
    return dataclasses.replace(mixer, group_chunk=None, group_chunk_bytes=None)


def capturable(model, encoder: bool = True):
    """``model`` with what hides the sown assignments turned off: block remat and ClusterFormer's chunked
    clustering loop (numbers unchanged; both only trade memory for time). A dense model's backbone is a
    module: turned off in it. ``encoder=False`` (decoder maps) accepts any encoder partition."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, Mapping) and "mixer" in backbone:
        return model.clone(backbone=dict(backbone, mixer=_unchunked(backbone["mixer"], encoder), remat=False))
    if isinstance(backbone, flax.linen.Module):  # DenseModel / HeadModel
        return model.clone(backbone=capturable(backbone, encoder))
    if isinstance(getattr(model, "mixer", None), MixerConfig):  # ClusterFormerBackbone
        return model.clone(mixer=_unchunked(model.mixer, encoder), remat=False)
    return model.clone(remat=False) if hasattr(model, "remat") else model


def _sown(model, variables, images) -> dict[str, list[np.ndarray]]:
    """{'/'-joined path: sown values} of every ``assignment`` the model's own forward pass on ``images`` sows."""
    _, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, images)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
    return {"/".join(path): [np.asarray(v) for v in value] for path, value in flat.items() if path[-1] == "assignment"}


def sown_assignments(model, variables, images) -> dict[tuple[int, int], np.ndarray]:
    """{(stage, block): (T, G, K, N) assignment} sown by the model's own forward pass on ``images``."""
    found: dict[tuple[int, int], np.ndarray] = {}
    for path, steps in _sown(model, variables, images).items():
        match = re.search(r"stage_(\d+)_block_(\d+)", path)
        if match is None or path.startswith("decoder/"):
            continue
        # nn.scan stacks T steps in one array; loops sow one per step
        stacked = (
            steps[0] if len(steps) == 1 and steps[0].ndim == 4 else np.stack([s.reshape(s.shape[-3:]) for s in steps])
        )
        found[(int(match.group(1)), int(match.group(2)))] = stacked.reshape(-1, *stacked.shape[-3:])
    if not found:
        raise ConfigError("the model sowed no cluster assignment: is it ClusterFormer or Context Cluster?")
    return found


def sown_decoder_assignments(model, variables, images) -> dict[int, np.ndarray]:
    """{decoder layer: (T, B, heads, Q, N) assignment} sown by a dense model's cluster decoder on ``images``."""
    found = {}
    for path, steps in _sown(model, variables, images).items():
        match = re.fullmatch(r"decoder/layer_(\d+)/em/assignment", path)
        if match:
            found[int(match.group(1))] = steps[0]  # the layer's nn.scan stacks its T steps
    if not found:
        raise ConfigError("the model sowed no decoder assignment: pass the workdir of a cluster-decoder dense run")
    return found


def decoder_maps(assignment: np.ndarray, map_hw: tuple[int, int], head: int, image: int = 0):
    """``cluster_maps`` of one decoder layer's (T, B, heads, Q, N) assignment: one window, the Q queries as its
    centers. Returns labels (T, h, w), each pixel's argmax query, and positions (T, Q, 2)."""
    steps, batch, heads, queries, n = assignment.shape
    return cluster_maps(assignment.reshape(steps, batch * heads, queries, n), batch, map_hw, head, image)


def cluster_maps(assignment: np.ndarray, batch: int, map_hw: tuple[int, int], head: int, image: int = 0):
    """Per EM step, each pixel's center and each center's position, for one image and head.

    ``assignment`` (T, G, K, N): G = batch * heads * windows**2 groups (image, head, window row, window
    column), N tokens of a window in row-major order, on a ``map_hw`` feature map. Returns labels (T, h, w):
    window * K + argmax_k, and positions (T, windows**2 * K, 2): (row, column) of each center's assignment-
    weighted token mean, in feature-map cells (nan for a center without mass).
    """
    steps, groups, k, n = assignment.shape
    h, w = map_hw
    windows = math.isqrt(h * w // n)
    n_h, n_w = h // windows, w // windows
    heads = groups // (batch * windows * windows)
    if windows * windows * n != h * w or heads * batch * windows * windows != groups:
        raise ValueError(f"assignment {assignment.shape} does not tile a {h}x{w} map for batch {batch}")
    per_image = assignment.reshape(steps, batch, heads, windows, windows, k, n_h, n_w)[:, image, head]
    choice = per_image.argmax(axis=3)  # (T, wi, wj, n_h, n_w)
    offsets = (np.arange(windows)[:, None] * windows + np.arange(windows)[None]) * k
    labels = (choice + offsets[None, :, :, None, None]).transpose(0, 1, 3, 2, 4).reshape(steps, h, w)
    rows, cols = np.meshgrid(np.arange(n_h, dtype=np.float64), np.arange(n_w, dtype=np.float64), indexing="ij")
    mass = per_image.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (per_image * rows).sum(axis=(-2, -1)) / mass + np.arange(windows)[None, :, None, None] * n_h
        c = (per_image * cols).sum(axis=(-2, -1)) / mass + np.arange(windows)[None, None, :, None] * n_w
    return labels, np.stack([r, c], axis=-1).reshape(steps, windows * windows * k, 2)


def demo_image() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")


def prepare(image: np.ndarray, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[np.ndarray, np.ndarray]:
    """(shown uint8 (size, size, 3), normalised float32 (1, size, size, 3)): centre square crop, resize."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    shown = np.asarray(Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC))
    normalised = (shown.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return shown, normalised[None]


def load(workdir: str | None, init_from: str | None, name: str, size: int | None) -> tuple[Any, Any, int, Any]:
    """(model, variables, image size, input config or None) from a workdir, a converted file, or a fresh init.
    A workdir's dataset facts come from its dataset_info.json when it has one (no dataset needed)."""
    if workdir:
        from clusterformer_jax.export import restore_run

        config, info, setup, variables = restore_run(workdir)
        return setup.model, variables, size or int(config.input.get("image_size") or info["image_size"]), config.input
    size = size or (32 if name == "clusterformer_nano" else 224)
    if init_from:
        from clusterformer_jax.convert.common import load_variables

        variables = load_variables(init_from)
        classes = (
            {"num_classes": variables["params"]["head"]["kernel"].shape[-1]} if "head" in variables["params"] else {}
        )
        return model_registry.create_model(name, **classes), variables, size, None
    model = model_registry.create_model(name)
    return model, model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32)), size, None


def draw(shown: np.ndarray, labels: np.ndarray, centers: np.ndarray, titles: Sequence[str], out: str) -> str:
    """The strip: per step the image under its cluster colours, centers as white-edged dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, h, w = labels.shape
    size = shown.shape[0]
    colours = np.random.default_rng(0).uniform(0, 1, (int(labels.max()) + 1, 3))
    fig, axes = plt.subplots(1, steps, figsize=(2.6 * steps, 2.8), squeeze=False)
    for t, ax in enumerate(axes[0]):
        ax.imshow(shown)
        ax.imshow(colours[labels[t]], alpha=0.45, extent=(0, size, size, 0), interpolation="nearest")
        cells = size / h
        ax.scatter((centers[t, :, 1] + 0.5) * cells, (centers[t, :, 0] + 0.5) * cells, s=10, c="k", edgecolors="w")
        ax.set_title(titles[t], fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def decoder_grid(model, layer: int, size: int) -> tuple[int, int]:
    """The (h, w) pixel-feature grid decoder ``layer`` clusters on a ``size`` square input."""
    stride = model.decoder.layer_strides[layer]
    return stage_sizes(size, size)[int(math.log2(stride)) - 2]


def visualize_decoder(shown, normalised, model, variables, layer: int, head: int, step, out):
    found = sown_decoder_assignments(capturable(model, encoder=False), variables, normalised)
    layer = layer if layer >= 0 else len(found) + layer
    if layer not in found:
        raise ConfigError(f"decoder layer {layer} does not exist; layers: 0-{len(found) - 1}")
    labels, centers = decoder_maps(found[layer], decoder_grid(model, layer, shown.shape[0]), head)
    chosen = range(labels.shape[0]) if step is None else [step]
    titles = [f"decoder layer {layer} head {head} step {t + 1}/{labels.shape[0]}" for t in chosen]
    return draw(shown, labels[list(chosen)], centers[list(chosen)], titles, out)


def visualize(
    image: np.ndarray, model, variables, size: int, input_cfg, stage: int, block: int, head: int, step, out, layer=None
):
    """Draws the encoder's maps of ``stage``/``block``, or with ``layer`` set those of that decoder layer."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if input_cfg is None else (input_cfg.mean, input_cfg.std)
    shown, normalised = prepare(image, size, mean, std)
    if layer is not None:
        return visualize_decoder(shown, normalised, model, variables, layer, head, step, out)
    found = sown_assignments(capturable(model), variables, normalised)
    stage = stage if stage >= 0 else max(s for s, _ in found)
    blocks = sorted(b for s, b in found if s == stage)
    if not blocks:
        raise ConfigError(f"stage {stage} has no clustering blocks; stages: {sorted({s for s, _ in found})}")
    block = blocks[block] if block < 0 else block
    labels, centers = cluster_maps(found[(stage, block)], 1, stage_sizes(size, size)[stage], head)
    chosen = range(labels.shape[0]) if step is None else [step]
    titles = [f"stage {stage} block {block} head {head} step {t + 1}/{labels.shape[0]}" for t in chosen]
    return draw(shown, labels[list(chosen)], centers[list(chosen)], titles, out)


def define_flags() -> None:
    """The command line (defined only when run as a script: the modules import side by side)."""
    flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
    flags.DEFINE_string("init_from", None, "Converted weights (.safetensors) for --model.")
    flags.DEFINE_string("model", "clusterformer_nano", "Model name without --workdir.")
    flags.DEFINE_integer("image_size", None, "Input side; default: the run's, else 224 (nano: 32).")
    flags.DEFINE_string("image", None, "Image file; default: scikit-learn's china.jpg sample.")
    flags.DEFINE_integer("stage", -1, "Stage (0-3; -1: the last).")
    flags.DEFINE_integer("block", -1, "Block of the stage (-1: the last).")
    flags.DEFINE_integer("head", 0, "Head.")
    flags.DEFINE_integer("step", None, "Only this EM step (default: every step, tiled).")
    flags.DEFINE_integer(
        "decoder_layer", None, "A dense run's cluster-decoder layer (-1: the last) instead of the encoder."
    )
    flags.DEFINE_string("out", "clusters.png", "The PNG to write.")


def main(argv: Sequence[str]) -> None:
    del argv
    from PIL import Image

    image = np.asarray(Image.open(flags.FLAGS.image).convert("RGB")) if flags.FLAGS.image else demo_image()
    model, variables, size, input_cfg = load(
        flags.FLAGS.workdir, flags.FLAGS.init_from, flags.FLAGS.model, flags.FLAGS.image_size
    )
    args = (flags.FLAGS.stage, flags.FLAGS.block, flags.FLAGS.head, flags.FLAGS.step, flags.FLAGS.out)
    print(visualize(image, model, variables, size, input_cfg, *args, layer=flags.FLAGS.decoder_layer))


if __name__ == "__main__":
    define_flags()
    app.run(main)
