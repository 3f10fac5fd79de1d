#!/usr/bin/env bash
# Stream the training log of one worker (worker 0 by default: it logs the progress lines
# and writes the summary). Ctrl-C stops the streaming, not the training.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/logs.sh [options]

Shows the last lines of the training log of a worker of the TPU slice NAME and follows
it (tail -F). Each option can also come from the environment variable in brackets; the
flag wins.

  --name NAME              [SJ_TPU_NAME] TPU VM name (required)
  --zone ZONE              [SJ_ZONE] its zone (required)
  --project PROJECT        [SJ_PROJECT] default: gcloud's configured project
  --worker N               [SJ_WORKER] worker index (default 0), or all
  --lines N                lines shown before following (default 100)
  --accelerator-type TYPE  [SJ_ACCELERATOR_TYPE] if given, --worker is checked against it
  --log-file PATH          [SJ_LOG_FILE] as given to launch/train.sh
                           (default sparse_jax_logs/train.log)
  --dry-run                [SJ_DRY_RUN=1] print the gcloud command, run nothing
  -h, --help               this text
USAGE
}

# common.sh is shellchecked on its own; not following it here keeps shellcheck quick.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "--project --zone --name --worker --lines --accelerator-type --log-file \
--dry-run" "$@"
check_target
if [[ $WORKER != all ]]; then
  [[ $WORKER =~ ^[0-9]+$ ]] || die "worker '$WORKER' is not a worker index" \
    "use --worker 0 (the first worker), another index, or --worker all"
  if [[ -n $ACCELERATOR_TYPE ]]; then
    parse_accelerator
    ((10#$WORKER < HOSTS)) || die "$ACCELERATOR_TYPE has workers 0 to $((HOSTS - 1)), \
not $WORKER" "use --worker between 0 and $((HOSTS - 1))"
  fi
fi
[[ $LINES_SHOWN =~ ^[0-9]+$ ]] || die "--lines '$LINES_SHOWN' is not a number" \
  "use e.g. --lines 100"
[[ -n $LOG_FILE ]] || die "empty --log-file" "omit it for sparse_jax_logs/train.log"
scope_flags

run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" "--worker=$WORKER" \
  "--command=tail -n $LINES_SHOWN -F $(quote "$LOG_FILE")"
