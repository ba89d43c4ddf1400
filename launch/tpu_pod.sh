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
# directory), SYNC=1, MAX_RESTARTS (default 10), CLUSTERFORMER_DRY_RUN=1 (print the gcloud commands only).
# Preemption / maintenance: the workers get SIGTERM, stop at one common step, commit the checkpoint and exit
# 75; the command is then run again (up to MAX_RESTARTS times) and resumes from the workdir. A worker VM
# that is gone (preemptible slice deleted) ends the script with gcloud's error: recreate the slice and run
# this script again with the same arguments.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [[ "${1:-}" == --help || "${1:-}" == -h ]]; then
  cf_usage "${BASH_SOURCE[0]}"
  exit 0
fi
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
remote_dir="${REMOTE_DIR:-clusterformer_jax}"
max_restarts="${MAX_RESTARTS:-10}"
gcloud_args=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

run() {  # runs "$@", or prints it in a dry run
  if cf_dry_run; then cf_print_command "$@"; else "$@"; fi
}

if [[ "${SYNC:-0}" == 1 ]]; then
  archive="$(cf_dry_run && echo ARCHIVE.tar.gz || mktemp -t clusterformer.XXXXXX.tar.gz)"
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:clusterformer.tar.gz" "${gcloud_args[@]}"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" \
      --command="mkdir -p $(printf '%q' "$remote_dir") && tar -xzf clusterformer.tar.gz -C $(printf '%q' "$remote_dir")"
  cf_dry_run || rm -f "$archive"
fi

args="$(printf '%q ' "$@")"
train=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}"
  --command="cd $(printf '%q' "$remote_dir") && CLUSTERFORMER_JAX_EXTRA=tpu CLUSTERFORMER_DISTRIBUTED=1 bash launch/local.sh ${args% }")
if cf_dry_run; then
  cf_print_command "${train[@]}"
  echo "# repeated while it exits $CF_EXIT_PREEMPTED, at most $max_restarts more times"
  exit 0
fi
for ((attempt = 0; ; attempt++)); do
  status=0
  "${train[@]}" || status=$?
  if [[ $status -ne $CF_EXIT_PREEMPTED || $attempt -ge $max_restarts ]]; then
    exit "$status"
  fi
  echo "[tpu_pod] preempted at a committed checkpoint; restart $((attempt + 1)) of $max_restarts" >&2
done
