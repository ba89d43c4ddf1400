"""The paper recipes on TPU slices, from this CPU: runs the ahead-of-time compile check (clusterformer_jax/aot.py)
for every recipe under configs/ and prints the markdown table of benchmarks/RESULTS.md.

  bash launch/python.sh benchmarks/aot_table.py --out=aot_results [--topologies=v5e-8,v5p-8] [--only=tiny]

Each row is one ``python -m clusterformer_jax.aot`` process (train step only, at the recipe's global batch
split over the slice's chips); its JSON lands in --out and a rerun skips rows whose JSON exists, so the table
can be filled over several sessions (files are named by config, slice and a hash of the extra flags). The
max-batch column is what the one compile bounds (aot.batch_bound: ">= N" where the row fits, "<= batch - 1"
where it does not); ``--max_batch`` finds the batch itself (3-5 compiles a row).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clusterformer_jax.aot import batch_bound  # noqa: E402

# (label, config argument): the paper's and the released recipes, the peers' ImageNet recipes, the dense ones.
RECIPES = (
    ("CF-T paper ImageNet", "configs/clusterformer_tiny_imagenet.py"),
    ("CF-T official ImageNet", "configs/clusterformer_tiny_imagenet.py:official"),
    ("CF-S paper ImageNet", "configs/clusterformer_small_imagenet.py"),
    ("CF-S official ImageNet", "configs/clusterformer_small_imagenet.py:official"),
    ("Context Cluster coc_tiny ImageNet", "configs/coc_imagenet.py:coc_tiny"),
    ("PaCa-ViT paca_tiny ImageNet", "configs/paca_imagenet.py:paca_tiny"),
    ("GroupMixFormer gmf_miny ImageNet", "configs/gmf_imagenet.py:gmf_miny"),
    ("CF-T COCO detection", "configs/clusterformer_tiny_coco_detection.py"),
    ("CF-T COCO instance", "configs/clusterformer_tiny_coco_instance.py"),
    ("CF-T COCO panoptic", "configs/clusterformer_tiny_coco_panoptic.py"),
    ("CF-S COCO detection", "configs/clusterformer_small_coco_detection.py"),
    ("CF-S COCO instance", "configs/clusterformer_small_coco_instance.py"),
    ("CF-S COCO panoptic", "configs/clusterformer_small_coco_panoptic.py"),
    ("CF-T ADE20K", "configs/clusterformer_tiny_ade20k.py"),
    ("CF-S ADE20K", "configs/clusterformer_small_ade20k.py"),
    ("PaCa-ViT paca_tiny ADE20K", "configs/paca_tiny_ade20k.py"),
)


def compile_check(config: str, topology: str, out: str, max_batch: bool, extra: list[str], run: bool) -> dict | None:
    """One aot process (train step at the recipe's batch, optionally --max_batch); its JSON report, named by
    the config, the slice and the flags (the extra ones and --max_batch). With ``run`` False, only a report
    already in ``out`` (or None)."""
    flags = hashlib.sha1(" ".join(extra + ["--max_batch"] * max_batch).encode()).hexdigest()[:8]
    path = os.path.join(out, f"{config.replace('/', '_').replace(':', '-')}_{topology}_{flags}.json")
    if not os.path.exists(path) and not run:
        return None
    if not os.path.exists(path):
        command = [sys.executable, "-m", "clusterformer_jax.aot", f"--config={config}", f"--topology={topology}"]
        command += ["--predict=false", f"--max_batch={max_batch}", f"--json={path}", *extra]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode not in (0, 1) or not os.path.exists(path):
            tail = [line for line in result.stderr.splitlines() if line.startswith("error")] or ["(no error line)"]
            raise RuntimeError(f"exit {result.returncode}: {tail[-1]}")
    with open(path) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="aot_results")
    parser.add_argument("--topologies", default="v5e-8")
    parser.add_argument("--only", default="", help="rows whose label or config contains this text")
    parser.add_argument("--max_batch", action="store_true", help="the largest per-chip batch itself (3-5 compiles)")
    parser.add_argument("--existing", action="store_true", help="only the rows already in --out; compile nothing")
    parser.add_argument("extra", nargs="*", help="flags for every aot run, e.g. --config.model.kwargs.remat=True")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(
        "| recipe | slice | batch/chip (global) | GiB/chip needed | fits | max batch/chip | TFLOP/step/chip "
        "| roofline ms/step | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, config in RECIPES:
        if args.only and args.only not in label and args.only not in config:
            continue
        for topology in args.topologies.split(","):
            try:
                report = compile_check(config, topology, args.out, args.max_batch, args.extra, not args.existing)
            except RuntimeError as e:
                print(f"| {label} | {topology} | error: {e} |")
                continue
            if report is None:
                continue
            t = report["train"]
            needed = f"{t['total_gib']:.2f}" if t.get("total_gib") else "?"
            flops = f"{t['tflop']:.2f}" if "tflop" in t else "-"
            step = f"{t['roofline_step_s'] * 1e3:.0f}" if "roofline_step_s" in t else "-"
            largest = report.get("max_per_chip_batch")
            if largest is None:
                largest = f"{'≥' if t['fits'] else '≤'} {batch_bound(t, report['hbm_gib'])}"
            print(
                f"| {label} | {topology} | {t['per_chip_batch']} ({t['global_batch']}) | {needed} "
                f"| {'yes' if t['fits'] else 'no'} | {largest} | {flops} | {step} "
                f"| {t['compile_s']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
