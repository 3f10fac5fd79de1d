#!/usr/bin/env bash
# Stop the training on every worker (SIGTERM to the process group that launch/train.sh
# started), for example to restart it with other flags; the slice keeps running. (When
# one worker's run stops, the others' stop by themselves within a minute, exit code 75.)
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/stop.sh [options]

Stops the run that launch/train.sh started on the workers of the TPU slice NAME. The
workdir keeps its checkpoints: launch/train.sh with the same workdir resumes from the
last one. Each option can also come from the environment variable in brackets; the
flag wins.

  --name NAME          [SJ_TPU_NAME] TPU VM name (required)
  --zone ZONE          [SJ_ZONE] its zone (required)
  --project PROJECT    [SJ_PROJECT] default: gcloud's configured project
  --log-file PATH      [SJ_LOG_FILE] as given to launch/train.sh
                       (default sparse_jax_logs/train.log)
  --dry-run            [SJ_DRY_RUN=1] print the gcloud command, run nothing
  -h, --help           this text
USAGE
}

# common.sh is shellchecked on its own; not following it here keeps shellcheck quick.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "--project --zone --name --log-file --dry-run" "$@"
check_target
[[ -n $LOG_FILE ]] || die "empty --log-file" "omit it for sparse_jax_logs/train.log"
scope_flags

# The pid that train.sh recorded leads its own process group (setsid), so `kill -- -PID`
# also ends the processes it started.
pid=$(quote "$(pid_file)")
remote="if $(remote_run_is_live "$pid"); then \
kill -TERM -- \"-\$(cat $pid)\"; echo \"\$(hostname): stopped pid \$(cat $pid)\"; \
else echo \"\$(hostname): no run going\"; fi"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all "--command=$remote"
