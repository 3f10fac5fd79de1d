#!/usr/bin/env bash
# Create a Cloud TPU VM slice: on demand, as Spot VMs, or through a queued resource
# (which waits in Google's queue until the capacity is there, optionally Spot or
# best-effort).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/create.sh [options]

Creates the TPU VM slice NAME, all of its workers. Each option can also come from the
environment variable in brackets; the flag wins.

  --name NAME                [SJ_TPU_NAME] TPU VM name (required)
  --zone ZONE                [SJ_ZONE] e.g. us-central2-b (required)
  --project PROJECT          [SJ_PROJECT] default: gcloud's configured project
  --accelerator-type TYPE    [SJ_ACCELERATOR_TYPE] (required) v4-N, v5litepod-N (v5e),
                             v5p-N or v6e-N
  --runtime-version VERSION  [SJ_RUNTIME_VERSION] TPU software version; default:
                             tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                             v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  --spot                     [SJ_SPOT=1] Spot VMs: cheaper, preemptible at any time
  --queued                   [SJ_QUEUED=1] request it through a queued resource (also
                             named NAME) that waits for capacity; pass --queued to
                             launch/teardown.sh too
  --best-effort              [SJ_BEST_EFFORT=1] queue at the best-effort tier (needs
                             --queued, excludes --spot; uses gcloud alpha)
  --valid-until-duration D   [SJ_VALID_UNTIL_DURATION] give up a queued request after
                             D, e.g. 6h
  --config FILE[:ARGS]       [SJ_CONFIG] first compile this config here for the slice's
                             topology (python3 -m sparse_jax.main --compile_for=TYPE,
                             with libtpu; no TPU needed) and create nothing if it does
                             not fit or compile; --config.KEY=VALUE flags go with it
  --dry-run                  [SJ_DRY_RUN=1] print the gcloud command, run nothing
  -h, --help                 this text

The compile check runs with SJ_LOCAL_PYTHON (default python3) in this repository,
which needs `pip install -e ".[tpu]"` (or the test extra) here.

Example:
  launch/create.sh --name vit-b16 --zone us-central2-b --accelerator-type v4-32 --spot \
      --config configs/vit_imagenet.py:sparsified
USAGE
}

# common.sh is shellchecked on its own; not following it here keeps shellcheck quick.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "--project --zone --name --accelerator-type --runtime-version --spot --queued \
--best-effort --valid-until-duration --config --config.KEY=VALUE --dry-run" "$@"
check_target
parse_accelerator
RUNTIME_VERSION=${RUNTIME_VERSION:-$DEFAULT_RUNTIME}
# The combinations gcloud cannot express: best-effort is a queue tier and excludes Spot,
# and only a queued request has a deadline.
if ((BEST_EFFORT && !QUEUED)); then
  die "--best-effort is a tier of queued resources" "add --queued (or SJ_QUEUED=1)"
fi
if ((BEST_EFFORT && SPOT)); then
  die "--spot and --best-effort are two different provisioning models" \
    "choose one: --queued --spot, or --queued --best-effort"
fi
if [[ -n $VALID_UNTIL ]] && ((!QUEUED)); then
  die "--valid-until-duration only applies to a queued request" "add --queued, or drop it"
fi
scope_flags

if [[ -z $CONFIG && ${#OVERRIDES[@]} -gt 0 ]]; then
  die "config overrides given without --config (${OVERRIDES[0]})" \
    "add --config FILE[:ARGS] to compile that config for the slice first, or drop them"
fi
if [[ -n $CONFIG ]]; then
  # The slice's programs, compiled here by the real TPU compiler before any slice is
  # paid for: a config that does not fit or compile stops here (sparse_jax.main prints
  # why, and the fix).
  check_config_file
  compile=("${SJ_LOCAL_PYTHON:-python3}" -m sparse_jax.main --config "$CONFIG"
    "--compile_for=$ACCELERATOR_TYPE" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  if ((DRY_RUN)); then
    run "${compile[@]}"
  else
    (cd "$REPO_ROOT" && run "${compile[@]}") || die "$CONFIG does not fit or compile on \
$ACCELERATOR_TYPE (see above); no slice was created" "follow the fix above, or choose \
another --accelerator-type"
  fi
elif ((!DRY_RUN)); then
  note "Tip: --config FILE checks here that the config fits and compiles on $ACCELERATOR_TYPE."
fi

if ((QUEUED)); then
  # The queued resource and its node share NAME, so every other script just uses NAME.
  cmd=(gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME")
  # The best-effort tier exists only in gcloud's alpha track.
  if ((BEST_EFFORT)); then cmd=(gcloud alpha "${cmd[@]:1}"); fi
  cmd+=("${SCOPE[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
    "--runtime-version=$RUNTIME_VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  if ((BEST_EFFORT)); then cmd+=(--best-effort); fi
  if [[ -n $VALID_UNTIL ]]; then cmd+=("--valid-until-duration=$VALID_UNTIL"); fi
  run "${cmd[@]}"
  note "Queued. The slice exists once the state is ACTIVE; check with:"
  note "  gcloud compute tpus queued-resources describe $TPU_NAME $(quote_all "${SCOPE[@]}")"
else
  cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  run "${cmd[@]}"
fi
note "Next: launch/setup.sh installs sparse_jax on all $HOSTS worker(s)."
