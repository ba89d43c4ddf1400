"""Gradients of the current code against an older commit's, from the same parameters and images.

  bash launch/python.sh benchmarks/grad_parity.py --baseline c8c399e
  bash launch/python.sh benchmarks/grad_parity.py --baseline c8c399e --models clusterformer_tiny --size 224 --batch 2

For each model (ClusterFormer presets: models with BatchNorm statistics are not handled): parameters
initialised here (seed 0) and random images, the gradient of a softmax cross-entropy (eval mode: no
dropout or stochastic depth) computed with this tree's code, with the execution settings the
trainer resolves on one device of each ``--settings`` backend (default: cpu and tpu; tpu runs the
accelerator's path, unrolled EM and one-pass clustering, here on the CPU); ``--baseline REV`` checks REV out
into a temporary git worktree and computes the same gradient there in a subprocess, from the same parameters
(read from an .npz). Prints, per model and settings, the largest |difference| over all leaves relative to
the largest |gradient| and the worst leaf's own relative difference (leaves under 1e-3 of the largest gradient
are left out of the latter: float noise both ways), and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_ROOT = os.path.abspath(sys.argv[sys.argv.index("--code-root") + 1]) if "--code-root" in sys.argv else REPO
sys.path.insert(0, CODE_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from clusterformer_jax.models.registry import create_model, model_fields  # noqa: E402

NUM_CLASSES = 10


def _model(name: str, settings: str):
    """``name`` with the execution settings its trainer resolves on one device of ``settings`` (cpu | tpu)."""
    from clusterformer_jax.runtime import with_execution_settings

    kwargs = with_execution_settings(model_fields(name), {"num_classes": NUM_CLASSES}, backend=settings, num_devices=1)
    return create_model(name, **kwargs)


def gradients(name: str, settings: str, params: dict | None, images, labels) -> tuple[dict, dict]:
    """(params, grads) as flat {'a/b/c': array}; ``params`` None initialises them (seed 0)."""
    model = _model(name, settings)
    if params is None:
        tree = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"]
    else:
        tree = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in params.items()})

    def loss(p):
        logits = model.apply({"params": p}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    grads = jax.jit(jax.grad(loss))(tree)
    flat = lambda t: {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(t).items()}  # noqa: E731
    return flat(tree), flat(grads)


def compare(ours: dict, theirs: dict) -> tuple[float, float, str]:
    if set(ours) != set(theirs):
        raise SystemExit(f"error: parameter trees differ: {sorted(set(ours) ^ set(theirs))[:5]}")
    top = max(float(np.abs(g).max()) for g in ours.values())
    overall = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) / top
    leaf, worst = 0.0, ""
    for k in ours:
        scale = float(np.abs(ours[k]).max())
        if scale >= 1e-3 * top:
            rel = float(np.abs(ours[k] - theirs[k]).max()) / scale
            if rel > leaf:
                leaf, worst = rel, k
    return overall, leaf, worst


def _baseline(rev: str, name: str, settings: str, path: str) -> dict:
    """The gradients REV's code computes from the parameters and images saved in ``path``."""
    tree = tempfile.mkdtemp(prefix="grad_parity_")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    try:
        out = path + ".baseline.npz"
        cmd = [sys.executable, os.path.abspath(__file__), "--code-root", tree, "--load", path, "--save", out]
        subprocess.run(cmd + ["--models", name, "--settings", settings], check=True)
        return dict(np.load(out))
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["clusterformer_tiny_official", "clusterformer_tiny"])
    parser.add_argument("--baseline", help="git revision to compare against")
    parser.add_argument("--settings", nargs="+", default=["cpu", "tpu"], help="execution settings of these backends")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--code-root", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.load:  # the baseline side: same parameters and images, this tree's code
        saved = dict(np.load(args.load))
        images, labels = saved.pop("__images__"), saved.pop("__labels__")
        _, grads = gradients(args.models[0], args.settings[0], saved, images, labels)
        np.savez(args.save, **grads)
        return
    if not args.baseline:
        parser.error("--baseline REV is required")

    rng = np.random.RandomState(0)
    images = rng.rand(args.batch, args.size, args.size, 3).astype(np.float32)
    labels = rng.randint(0, NUM_CLASSES, args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for settings in args.settings:
                params, ours = gradients(name, settings, None, images, labels)
                path = os.path.join(tmp, f"{name}-{settings}.npz")
                np.savez(path, __images__=images, __labels__=labels, **params)
                overall, leaf, worst = compare(ours, _baseline(args.baseline, name, settings, path))
                rows.append(f"| {name} | {settings} | {overall:.2e} | {leaf:.2e} (`{worst}`) |")
                print(rows[-1], flush=True)
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    table = "\n".join(
        [
            f"\n### Gradient parity, {head.stdout.strip()} against {args.baseline} "
            f"({datetime.date.today()}, {platform.machine()}, jax {jax.__version__}, "
            f"batch {args.batch} at {args.size}, float32, {jax.default_backend()})\n",
            "| model | execution settings of | max abs diff / max abs grad | worst leaf's relative diff |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(table)
    with open(os.path.join(REPO, "benchmarks", "RESULTS.md"), "a") as f:
        f.write(table)


if __name__ == "__main__":
    main()
