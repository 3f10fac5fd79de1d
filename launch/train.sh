#!/usr/bin/env bash
# Start `python3 -m sparse_jax.main` with the same arguments on every worker of the slice,
# detached from the ssh session (nohup + setsid, output appended to a log file on each
# worker), so that closing the terminal or losing the connection does not stop it.
# Each worker is one JAX process; sparse_jax.main joins them (jax.distributed) by itself.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/train.sh [options] [--config.KEY=VALUE ...] [-- MAIN_ARGS ...]

Runs, in ~/sparse_jax on every worker of the TPU slice NAME, in the background:
  python3 -m sparse_jax.main --config CONFIG --workdir WORKDIR
      [--config.data_dir=DATA_DIR] [--config.KEY=VALUE ...] [MAIN_ARGS ...]
with its output appended to ~/LOG_FILE on each worker. Rerun it on the same workdir to
resume from the last checkpoint (after a preemption, say). Each option can also come
from the environment variable in brackets; the flag wins.

  --name NAME              [SJ_TPU_NAME] TPU VM name (required)
  --zone ZONE              [SJ_ZONE] its zone (required)
  --project PROJECT        [SJ_PROJECT] default: gcloud's configured project
  --config FILE[:ARGS]     [SJ_CONFIG] relative to the repository root, e.g.
                           configs/vit_imagenet.py:sparsified (required)
  --workdir DIR            [SJ_WORKDIR] gs://BUCKET/runs/NAME (required): all workers
                           must see the same checkpoints, so multi-host needs gs://
  --data-dir DIR           [SJ_DATA_DIR] tfds data_dir, e.g. gs://BUCKET/tfds
  --accelerator-type TYPE  [SJ_ACCELERATOR_TYPE] the slice's type: checked, and needed
                           only to allow a local workdir on a single-host slice
  --log-file PATH          [SJ_LOG_FILE] on each worker, relative to home
                           (default sparse_jax_logs/train.log)
  --python PYTHON          [SJ_PYTHON] interpreter on the workers (default python3)
  --dry-run                [SJ_DRY_RUN=1] print the gcloud command, run nothing
  -h, --help               this text

--config.KEY=VALUE flags (e.g. --config.mesh_shape='(-1, 2, 1)' for the (data, fsdp,
tensor) mesh) and everything after `--` go to sparse_jax.main unchanged.
USAGE
}

# common.sh is shellchecked on its own; not following it here keeps shellcheck quick.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "--project --zone --name --accelerator-type --config --workdir --data-dir \
--log-file --python --dry-run --config.KEY=VALUE" "$@"
check_target
if [[ -n $ACCELERATOR_TYPE ]]; then parse_accelerator; fi
[[ -n $CONFIG ]] || die "no config given" \
  "pass --config FILE[:ARGS] or export SJ_CONFIG=..., e.g. configs/vit_imagenet.py:sparsified"
check_config_file
[[ -n $WORKDIR ]] || die "no workdir given" \
  "pass --workdir gs://BUCKET/runs/NAME or export SJ_WORKDIR=gs://BUCKET/runs/NAME"
if [[ $WORKDIR != gs://* ]]; then
  # Every process restores from and writes to the workdir; on a pod, local disks differ.
  [[ -n $ACCELERATOR_TYPE ]] || die "workdir '$WORKDIR' is not on GCS, and the slice \
size is unknown: a multi-host slice needs one directory that every worker sees" \
    "use --workdir gs://BUCKET/runs/NAME, or pass the --accelerator-type of a single-host slice"
  ((HOSTS == 1)) || die "workdir '$WORKDIR' is not on GCS, but $ACCELERATOR_TYPE has \
$HOSTS workers: every worker must write and restore the same checkpoints, so all of them \
must see one workdir" "use --workdir gs://BUCKET/runs/NAME (a bucket the TPU's service \
account can write, ideally in the TPU's region)"
  [[ $WORKDIR == /* ]] || die "local workdir '$WORKDIR' is relative, so it would land \
in ~/$REMOTE_DIR, which launch/setup.sh deletes" "use an absolute path or gs://"
fi
[[ -n $LOG_FILE ]] || die "empty --log-file" "omit it for sparse_jax_logs/train.log"
scope_flags

main=("$PYTHON" -m sparse_jax.main --config "$CONFIG" --workdir "$WORKDIR")
if [[ -n $DATA_DIR ]]; then main+=("--config.data_dir=$DATA_DIR"); fi
main+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})

# On each worker (the remote shell expands the \$ parts): refuse to start a second
# run next to a live one, then start the run in its own session (setsid; nohup as well)
# so that the end of the ssh session does not stop it, and record its pid (which is
# also its process group) for launch/stop.sh. A bash around the run appends its exit
# code to the log (75: another process of the run stopped; 1: this one's own error);
# its TERM trap only makes it wait for the run, which handles the signal itself.
started_run="trap : TERM; $(quote_all "${main[@]}"); rc=\$?; \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) exit \$rc on \$(hostname)\"; exit \$rc"
log=$(quote "$LOG_FILE")
pid=$(quote "$(pid_file)")
log_dir=.
if [[ $LOG_FILE == */* ]]; then log_dir=${LOG_FILE%/*}; fi
remote="set -e; mkdir -p $(quote "$log_dir"); \
if $(remote_run_is_live "$pid"); then \
echo \"\$(hostname): a run is still going (pid \$(cat $pid)); stop it with launch/stop.sh\" >&2; \
exit 1; fi; \
echo \"=== \$(date -u '+%Y-%m-%dT%H:%M:%SZ') start on \$(hostname)\" >> $log; \
( cd $REMOTE_DIR && export PYTHONUNBUFFERED=1 && exec nohup setsid bash -c $(quote "$started_run") ) \
>> $log 2>&1 < /dev/null & \
echo \$! > $pid; echo \"\$(hostname): started pid \$!, log:\" $log"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all "--command=$remote"
note "Follow it with launch/logs.sh; stop it with launch/stop.sh."
