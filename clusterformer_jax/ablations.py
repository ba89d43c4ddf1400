r"""The paper's Table 6 ablations: our size of every row beside the paper's numbers, and a small-scale rerun.

  python -m clusterformer_jax.ablations [--tables=abcdef] [--flops]
  python -m clusterformer_jax.ablations --train [--tables=abcde] [--steps=300] [--seeds=3] [--jobs=2]

The rows are the configs ``configs/ablations/table6{a..f}.py:ROW``. The table lists, per row, the parameter
count of our ClusterFormer-Tiny (1000 classes; (f): the COCO instance-segmentation model) and, with
``--flops``, the forward GFLOPs at 224x224 (XLA's cost analysis), beside the paper's #Params and top-1 /
mask AP. The paper reports no FLOPs in Table 6. ``--train`` trains every row of (a)-(e) on the quickstart's
digits with the nano model (``ROW,quickstart``), ``--steps`` steps for each of ``--seeds`` seeds, ``--jobs`` runs
at a time (rows with equal options are trained once), and prints eval top-1 and loss as mean +- half the range:
a small-scale Table 6, not the paper's ImageNet numbers.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from clusterformer_jax.models import registry as model_registry
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.trainers.setup import model_kwargs

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table6():
    """The module ``configs/ablations/table6.py`` (rows and the paper's numbers)."""
    from configs.ablations import table6 as module  # the repository root is on the path, as for --config

    return module


def rows(tables: str) -> list[tuple[str, str]]:
    """[(table, row)] of Table 6 in the paper's order, for the sub-tables named in ``tables``."""
    t6 = table6()
    listed = [(t, r) for t in "abcde" for r in t6.CLASSIFICATION[t]] + [("f", r) for r in t6.QUERY_INIT_AP]
    return [(t, r) for t, r in listed if t in tables]


def row_config(table: str, row: str, quickstart: bool = False) -> ml_collections.ConfigDict:
    t6 = table6()
    if table == "f":
        return t6.query_init_config(row)
    return t6.classification_config(table, f"{row},quickstart" if quickstart else row)


def build_model(config: ml_collections.ConfigDict):
    """(model, input shape) of a row's config: the classifier with 1000 classes at 224, or the COCO model."""
    kwargs = model_kwargs(config)
    if config.task == "classification":
        return model_registry.create_model(config.model.name, num_classes=1000, **kwargs), (1, 224, 224, 3)
    info = dict(num_thing_classes=80, num_classes=80, image_size=256, category_ids=range(1, 81), class_names=["x"] * 80)
    task = task_registry.create_task(config, info)
    return task.build_model(config.model.name, kwargs), (1, 256, 256, 3)


def count_params(model, shape) -> int:
    """Parameters of ``model`` on inputs of ``shape``, from abstract shapes only (nothing is computed)."""
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def forward_gflops(model, shape) -> float:
    """Forward GFLOPs of ``model`` at ``shape`` from XLA's cost analysis of the lowered (uncompiled) program."""
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    cost = jax.jit(model.apply).lower(variables, images).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / 1e9


def size_table(tables: str, flops: bool) -> list[str]:
    t6 = table6()
    lines = [
        "Table 6 (paper §4.2): our ClusterFormer-Tiny per row beside the paper's; GFLOPs: ours, forward, 224x224",
        f"{'row':<22}{'ours #Params':>13}{'paper #Params':>15}{'ours GFLOPs':>13}{'paper top-1 / AP':>18}",
    ]
    for table, row in rows(tables):
        model, shape = build_model(row_config(table, row))
        ours = f"{count_params(model, shape) / 1e6:.2f}M"
        if table == "f":
            paper_params, score, gflops = "-", f"AP {t6.QUERY_INIT_AP[row][0]:.1f}", "-"
        else:
            _, params, top1, _ = t6.CLASSIFICATION[table][row]
            paper_params, score = (f"{params:.2f}M" if params else "-"), f"{top1:.2f}"
            gflops = f"{forward_gflops(model, shape):.2f}" if flops else "-"
        lines.append(f"{'(' + table + ') ' + row:<22}{ours:>13}{paper_params:>15}{gflops:>13}{score:>18}")
        print(lines[-1], flush=True)
    return lines


def final_eval(workdir: str) -> tuple[float, float]:
    """(top-1, loss) of the last evaluation a run wrote to its TensorBoard events."""
    from clusterformer_jax.plot import read_scalars  # the plotter's reader; keeps matplotlib out of --list

    scalars = read_scalars(workdir)
    if "eval_top1" not in scalars or "eval_loss" not in scalars:
        raise RuntimeError(f"{workdir}: no eval top-1 and loss in its events (tags: {sorted(scalars)})")
    return scalars["eval_top1"][-1][1], scalars["eval_loss"][-1][1]


def _train_run(table: str, row: str, seed: int, steps: int, workdir: str) -> tuple[float, float]:
    """Trains one row for one seed in a subprocess (the trainer's command line); returns eval (top-1 %, loss)."""
    command = [
        sys.executable,
        "-m",
        "clusterformer_jax.main",
        f"--config={os.path.join(_REPO, 'configs', 'ablations', f'table6{table}.py')}:{row},quickstart",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
        f"--config.num_train_steps={steps}",
        f"--config.eval_every_steps={steps}",
        f"--config.checkpoint.every_steps={steps}",
        # a row's seeds run the same programs: the 2nd and 3rd read the 1st's compilations from disk
        f"--config.compilation_cache_dir={os.path.join(os.path.dirname(os.path.abspath(workdir)), 'xla_cache')}",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
    with open(f"{workdir}.log", "w") as log:  # beside the workdir: the trainer refuses a non-empty new one
        done = subprocess.run(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"Table 6{table} {row} seed {seed} failed (exit {done.returncode}); see {workdir}.log")
    top1, loss = final_eval(workdir)
    print(f"(6{table}) {row} seed {seed}: top-1 {100 * top1:.2f}, eval loss {loss:.4f}", flush=True)
    return 100 * top1, loss


def train_table(tables: str, steps: int, seeds: int, parent: str, jobs: int = 1) -> list[str]:
    """Trains every (a)-(e) row ``seeds`` times, ``jobs`` runs at a time. Rows with the same options (the default
    model is a row of every sub-table; (e) 'none' is (a) 'recurrent') are trained once and listed under each."""
    t6 = table6()
    listed = rows("".join(t for t in tables if t != "f"))
    options = {(t, r): tuple(sorted(t6.CLASSIFICATION[t][r][0].items())) for t, r in listed}
    first = {}  # options -> the first row that has them (its workdirs hold the runs)
    for key in listed:
        first.setdefault(options[key], key)
    runs = {  # seed-major, so that a row's first seed has compiled before its others start
        (key, seed): os.path.join(parent, f"6{key[0]}_{key[1]}_seed{seed}")
        for seed in range(seeds)
        for key in first.values()
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {run: pool.submit(_train_run, run[0][0], run[0][1], run[1], steps, wd) for run, wd in runs.items()}
    lines = [
        f"Small-scale Table 6: nano ClusterFormer on 32x32 digits (360 eval images), {steps} steps; eval top-1 and "
        f"loss as mean +- half-range over {seeds} seeds (not ImageNet: compare rows, not the paper's values)",
        f"{'row':<22}{'top-1 (%)':>16}{'eval loss':>18}{'paper top-1':>13}  same runs as",
    ]
    for table, row in listed:
        source = first[options[table, row]]
        top1, loss = np.array([futures[source, seed].result() for seed in range(seeds)]).T
        paper = t6.CLASSIFICATION[table][row][2]
        shared = f"  ({source[0]}) {source[1]}" if source != (table, row) else ""
        lines.append(
            f"{'(' + table + ') ' + row:<22}{top1.mean():>9.2f} +-{np.ptp(top1) / 2:>5.2f}"
            f"{loss.mean():>11.4f} +-{np.ptp(loss) / 2:>5.4f}{paper:>13.2f}{shared}"
        )
    return lines


def define_flags() -> None:
    """The command line (defined only when run as a script: the modules import side by side)."""
    flags.DEFINE_string("tables", "abcdef", "Which of Table 6's sub-tables (a-f) to list or train.")
    flags.DEFINE_bool("flops", False, "Also lower every (a)-(e) row at 224x224 for its forward GFLOPs (slow).")
    flags.DEFINE_bool("train", False, "Train the (a)-(e) rows on the quickstart data and print top-1.")
    flags.DEFINE_integer("steps", 300, "Training steps per run with --train.")
    flags.DEFINE_integer("seeds", 3, "Seeds per row with --train.")
    flags.DEFINE_string("workdir", "runs/ablations", "Parent of the --train workdirs (one per row and seed).")
    flags.DEFINE_integer("jobs", 1, "Training runs at a time with --train.")


def main(argv: Sequence[str]) -> None:
    del argv
    if flags.FLAGS.train:
        lines = train_table(
            flags.FLAGS.tables, flags.FLAGS.steps, flags.FLAGS.seeds, flags.FLAGS.workdir, flags.FLAGS.jobs
        )
    else:
        lines = size_table(flags.FLAGS.tables, flags.FLAGS.flops)
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
