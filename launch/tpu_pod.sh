#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU VM pod slice; jax.distributed.initialize()
# discovers the slice. The repository must be at REMOTE_DIR on every worker (SYNC=1 copies `git archive HEAD`
# there first). The workdir should be a gs:// bucket shared by all workers.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh \
#       --config=configs/clusterformer_small_imagenet.py --config.input.data_dir=gs://bucket/tfds \
#       --workdir=gs://bucket/runs/cf_small
#
# Environment: TPU_NAME, ZONE (required), PROJECT, REMOTE_DIR (default clusterformer_jax in the home
# directory), SYNC=1.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
remote_dir="${REMOTE_DIR:-clusterformer_jax}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_args=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

if [[ "${SYNC:-0}" == 1 ]]; then
  archive="$(mktemp -t clusterformer.XXXXXX.tar.gz)"
  git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:clusterformer.tar.gz" "${gcloud_args[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" \
      --command="mkdir -p $(printf '%q' "$remote_dir") && tar -xzf clusterformer.tar.gz -C $(printf '%q' "$remote_dir")"
  rm -f "$archive"
fi

args="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" \
    --command="cd $(printf '%q' "$remote_dir") && CLUSTERFORMER_JAX_EXTRA=tpu CLUSTERFORMER_DISTRIBUTED=1 bash launch/local.sh ${args}"
