#!/usr/bin/env bash
# Ahead-of-time compile check on this (CPU) machine: compiles a config's train and predict steps for a TPU
# slice (or a GPU node) with the real TPU (XLA GPU) compiler and prints memory per chip, FLOPs, a roofline step
# time and compile time (clusterformer_jax/aot.py). Installs libtpu (jax's CUDA plugin) into the venv on first use.
#   launch/aot.sh --config=configs/clusterformer_tiny_imagenet.py --topology=v5e-8 [--per_chip_batch=64]
#   launch/aot.sh --config=configs/clusterformer_tiny_coco_instance.py --topology=v5p-8 --max_batch
#   launch/aot.sh --config=configs/clusterformer_tiny_imagenet.py --topology=h100-8 --per_chip_batch=64
# Exit code 1: the step does not fit the chip's memory (one line says how much it needs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [[ "${1:-}" == --help || "${1:-}" == -h ]]; then
  cf_usage "${BASH_SOURCE[0]}"
  exit 0
fi
cf_env
cd "$REPO_ROOT"
if cf_dry_run; then
  cf_print_command "$PY" -m clusterformer_jax.aot "$@"
  exit 0
fi
if [[ " $* " =~ --topology=(a100|h100|h200)- ]]; then cf_ensure_cuda_aot; else cf_ensure_libtpu; fi
exec "$PY" -m clusterformer_jax.aot "$@"
