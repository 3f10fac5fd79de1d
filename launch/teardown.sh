#!/usr/bin/env bash
# Delete the slice, so that it stops costing money: the TPU VM, or the queued resource
# together with its TPU VM (--force) if it was created with --queued. The workdir and
# data on GCS are not touched.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/teardown.sh [options]

Deletes the TPU slice NAME and its workers' disks (not the bucket). Each option can
also come from the environment variable in brackets; the flag wins.

  --name NAME          [SJ_TPU_NAME] TPU VM name (required)
  --zone ZONE          [SJ_ZONE] its zone (required)
  --project PROJECT    [SJ_PROJECT] default: gcloud's configured project
  --queued             [SJ_QUEUED=1] it was made with launch/create.sh --queued: delete
                       the queued resource NAME together with its TPU VM
  --yes                do not ask for confirmation (gcloud --quiet)
  --dry-run            [SJ_DRY_RUN=1] print the gcloud command, run nothing
  -h, --help           this text
USAGE
}

# common.sh is shellchecked on its own; not following it here keeps shellcheck quick.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "--project --zone --name --queued --yes --dry-run" "$@"
check_target
scope_flags

if ((QUEUED)); then
  # --force deletes the queued resource's TPU VM first; without it an active queued
  # resource cannot be deleted.
  cmd=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}")
fi
if ((YES)); then cmd+=(--quiet); fi
run "${cmd[@]}"
