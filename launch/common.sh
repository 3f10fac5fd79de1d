# shellcheck shell=bash
# Shared by the launch/*.sh scripts; sourced, never run. It holds the settings (SJ_*
# environment variables, then flags: a flag wins), the argument checks, which all run
# before the first gcloud command, and `run`, which prints each command and, unless
# --dry-run, runs it.
#
# A script defines usage() before sourcing it, then calls parse_args with the long options
# it takes; any other option is an error, so a typo is never silently ignored.
#
# Written for bash 3.2 too (macOS): no associative arrays, no ${x,,}, and empty arrays
# are expanded as ${a[@]+"${a[@]}"} so that `set -u` accepts them.
#
# SC2034 ("appears unused") is off for this file: the scripts that source it read the
# settings and results that it sets.
# shellcheck disable=SC2034

# The scripts source this file as DIR/common.sh, so BASH_SOURCE here always has a '/'.
REPO_ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
SCRIPT_NAME="launch/${0##*/}"

# On each worker, relative to the login user's home directory (where ssh starts). The
# source directory is fixed, not an option, because setup.sh deletes and replaces it.
REMOTE_DIR=sparse_jax
REMOTE_TARBALL=sparse_jax_src.tgz

ACCEPTED_TYPES="v4-N (N = TensorCores, a multiple of 8: v4-8, v4-16, v4-32, ...),\
 v5litepod-N (v5e; N = chips: 1, 4, 8, 16, 32, 64, 128, 256),\
 v5p-N (N = TensorCores, a multiple of 8: v5p-8, v5p-16, ...),\
 v6e-N (Trillium; N = chips: 1, 4, 8, 16, ..., 256)"

die() {  # die MESSAGE FIX: a bad argument. Exit code 2, and nothing has run yet.
  printf '%s: error: %s\nFix: %s\n' "$SCRIPT_NAME" "$1" "$2" >&2
  exit 2
}

env_bool() {  # env_bool NAME VAR: set NAME to 1 or 0 from the SJ_* switch VAR, or die.
  case "${!2:-}" in
    1 | true | yes) printf -v "$1" 1 ;;
    "" | 0 | false | no) printf -v "$1" 0 ;;
    *) die "$2='${!2}' is not a switch value" "set $2 to 1 (on) or 0 (off)" ;;
  esac
}

# Settings from the environment; parse_args overrides them with flags.
PROJECT=${SJ_PROJECT:-}  # Empty: gcloud's default project (gcloud config get project).
ZONE=${SJ_ZONE:-}
TPU_NAME=${SJ_TPU_NAME:-}
ACCELERATOR_TYPE=${SJ_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${SJ_RUNTIME_VERSION:-}  # Empty: the default of the generation.
env_bool SPOT SJ_SPOT
env_bool QUEUED SJ_QUEUED
env_bool BEST_EFFORT SJ_BEST_EFFORT
VALID_UNTIL=${SJ_VALID_UNTIL_DURATION:-}
SOURCE_MODE=${SJ_SOURCE:-copy}
GIT_REPO=${SJ_REPO:-}
GIT_REF=${SJ_REF:-}
PYTHON=${SJ_PYTHON:-python3}  # TPU VM images have python3, not always python.
CONFIG=${SJ_CONFIG:-}
WORKDIR=${SJ_WORKDIR:-}
DATA_DIR=${SJ_DATA_DIR:-}
LOG_FILE=${SJ_LOG_FILE:-sparse_jax_logs/train.log}
WORKER=${SJ_WORKER:-0}
LINES_SHOWN=100
YES=0
env_bool DRY_RUN SJ_DRY_RUN
OVERRIDES=()  # --config.KEY=VALUE flags and everything after `--` (train.sh, create.sh).

accepts() {  # accepts OPTION: whether this script takes OPTION.
  [[ " $SCRIPT_OPTIONS " == *" $1 "* ]]
}

# parse_args "OPTION..." ARG...: check ARGs against the space-separated long OPTIONs this
# script takes (--config.KEY=VALUE stands for config overrides) and apply them.
parse_args() {
  local arg opt value
  SCRIPT_OPTIONS=$1
  shift
  # --help first, so that it works whatever else is on the line.
  for arg in "$@"; do
    if [[ $arg == -- ]]; then break; fi
    if [[ $arg == -h || $arg == --help ]]; then usage; exit 0; fi
  done
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --)
        accepts --config.KEY=VALUE || die "$SCRIPT_NAME takes no arguments after --" \
          "remove them; see $SCRIPT_NAME --help"
        OVERRIDES+=("$@")
        break ;;
      --config.*=*)
        accepts --config.KEY=VALUE || die "$SCRIPT_NAME takes no config overrides ($arg)" \
          "pass overrides to launch/train.sh (or launch/create.sh with --config)"
        OVERRIDES+=("$arg")
        continue ;;
      --config.*)
        die "config override '$arg' has no value" "write it as one word: $arg=VALUE" ;;
      --*=*) opt=${arg%%=*} value=${arg#*=} ;;
      --*) opt=$arg value="" ;;
      *) die "unexpected argument '$arg'" "options start with --; see $SCRIPT_NAME --help" ;;
    esac
    accepts "$opt" || die "$SCRIPT_NAME has no option $opt" "see $SCRIPT_NAME --help"
    case $opt in
      --dry-run | --spot | --queued | --best-effort | --yes)
        if [[ $arg == *=* ]]; then die "$opt is a switch and takes no value" "write just $opt"; fi ;;
      *)
        if [[ $arg != *=* ]]; then
          [[ $# -gt 0 && $1 != --* ]] || die "$opt needs a value" "write $opt VALUE"
          value=$1
          shift
        fi ;;
    esac
    case $opt in
      --project) PROJECT=$value ;;
      --zone) ZONE=$value ;;
      --name) TPU_NAME=$value ;;
      --accelerator-type) ACCELERATOR_TYPE=$value ;;
      --runtime-version) RUNTIME_VERSION=$value ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --best-effort) BEST_EFFORT=1 ;;
      --valid-until-duration) VALID_UNTIL=$value ;;
      --source) SOURCE_MODE=$value ;;
      --repo) GIT_REPO=$value ;;
      --ref) GIT_REF=$value ;;
      --python) PYTHON=$value ;;
      --config) CONFIG=$value ;;
      --workdir) WORKDIR=$value ;;
      --data-dir) DATA_DIR=$value ;;
      --log-file) LOG_FILE=$value ;;
      --worker) WORKER=$value ;;
      --lines) LINES_SHOWN=$value ;;
      --yes) YES=1 ;;
      --dry-run) DRY_RUN=1 ;;
    esac
  done
}

check_target() {  # The TPU every script talks to: name and zone are required.
  local name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$' zone_re='^[a-z]+-[a-z]+[0-9]+-[a-z]$'
  [[ -n $TPU_NAME ]] || die "no TPU name given" \
    "pass --name NAME or export SJ_TPU_NAME=NAME (the slice's name, as created)"
  [[ $TPU_NAME =~ $name_re ]] || die "TPU name '$TPU_NAME' is not valid" \
    "use lowercase letters, digits and '-', starting with a letter, e.g. --name vit-b16"
  [[ -n $ZONE ]] || die "no zone given" \
    "pass --zone ZONE or export SJ_ZONE=ZONE, e.g. us-central2-b (v4), us-east5-a (v5p), \
us-west4-a (v5e); list them with: gcloud compute tpus locations list"
  [[ $ZONE =~ $zone_re ]] || die "zone '$ZONE' is not a zone name" \
    "use a zone such as us-central2-b, not a region such as us-central2"
}

# parse_accelerator: from ACCELERATOR_TYPE set HOSTS (the number of workers, one JAX
# process each) and DEFAULT_RUNTIME (the TPU software version for JAX on that
# generation, from Google's table of TPU software versions).
parse_accelerator() {
  local type_re='^(v4|v5p|v5litepod|v6e)-([0-9]+)$' v5e_re='^v5e-([0-9]+)$' gen size
  [[ -n $ACCELERATOR_TYPE ]] || die "no accelerator type given" \
    "pass --accelerator-type TYPE or export SJ_ACCELERATOR_TYPE=TYPE; accepted: $ACCEPTED_TYPES"
  if [[ $ACCELERATOR_TYPE =~ $v5e_re ]]; then
    die "unknown accelerator type '$ACCELERATOR_TYPE': gcloud names v5e slices v5litepod-N" \
      "use --accelerator-type v5litepod-${BASH_REMATCH[1]}"
  fi
  [[ $ACCELERATOR_TYPE =~ $type_re ]] || die \
    "unknown accelerator type or generation '$ACCELERATOR_TYPE'" "use one of: $ACCEPTED_TYPES"
  gen=${BASH_REMATCH[1]}
  size=$((10#${BASH_REMATCH[2]}))
  case $gen in
    v4 | v5p)  # Named by TensorCores: 2 per chip, 4 chips (8 cores) per host.
      ((size >= 8 && size % 8 == 0)) || die \
        "'$ACCELERATOR_TYPE' is not a $gen slice size" "use one of: $ACCEPTED_TYPES"
      HOSTS=$((size / 8)) ;;
    v5litepod | v6e)  # Named by chips: up to 8 on one host, 4 per host in multi-host slices.
      case $size in
        1 | 4 | 8) HOSTS=1 ;;
        16 | 32 | 64 | 128 | 256) HOSTS=$((size / 4)) ;;
        *) die "'$ACCELERATOR_TYPE' is not a $gen slice size" "use one of: $ACCEPTED_TYPES" ;;
      esac ;;
  esac
  case $gen in
    v4) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
    v6e) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  esac
}

check_config_file() {  # CONFIG names a config file of this repository, as workers see it.
  local config_file=${CONFIG%%:*}
  [[ $config_file != /* && -f $REPO_ROOT/$config_file ]] || die \
    "config file '$config_file' is not in this repository" \
    "name it relative to the repository root, e.g. configs/t5_c4.py:base,sparsified"
}

# gcloud's location flags, shared by every command. With no --project, gcloud uses its
# configured default project.
scope_flags() {
  SCOPE=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then SCOPE+=("--project=$PROJECT"); fi
}

# Quoting for printed and remote commands, without subshells (they are slow to fork).
quote_to() {  # quote_to NAME WORD: set NAME to WORD as bash/zsh read it back.
  local s=$2 out="" safe_re='^[A-Za-z0-9_@%+:,./-][A-Za-z0-9_@%+=:,./-]*$'
  if [[ $s =~ $safe_re ]]; then
    printf -v "$1" '%s' "$s"
    return
  fi
  while [[ $s == *"'"* ]]; do  # Each ' becomes '\'' (close, escaped quote, reopen).
    out+="${s%%"'"*}'\\''"
    s=${s#*"'"}
  done
  printf -v "$1" "'%s'" "$out$s"
}

join_quoted() {  # join_quoted NAME WORD...: set NAME to the words quoted, space-separated.
  local name=$1 word q joined="" sep=""
  shift
  for word in "$@"; do
    quote_to q "$word"
    joined+="$sep$q"
    sep=" "
  done
  printf -v "$name" '%s' "$joined"
}

quote() { local q; quote_to q "$1"; printf '%s' "$q"; }
quote_all() { local line; join_quoted line "$@"; printf '%s' "$line"; }

# run COMMAND...: print it as `+ COMMAND` (copy-pasteable), then run it unless this is
# a dry run. A dry run prints on stdout; a real run logs the line on stderr.
run() {
  local line
  join_quoted line "$@"
  if ((DRY_RUN)); then
    printf '+ %s\n' "$line"
    return 0
  fi
  printf '+ %s\n' "$line" >&2
  "$@"
}

# The training's pid is kept next to its log on each worker: LOG_FILE with .pid for .log.
pid_file() { printf '%s.pid' "${LOG_FILE%.log}"; }

# remote_run_is_live QUOTED_PID_FILE: a test for the remote shell, true while the process
# in the pid file is a sparse_jax run (a stale file whose pid was reused does not count).
remote_run_is_live() {
  printf "[ -f %s ] && ps -ww -o args= -p \"\$(cat %s)\" 2>/dev/null | grep -q sparse_jax.main" \
    "$1" "$1"
}

note() {  # A hint for the next step; on stderr, so stdout holds only commands.
  printf '%s\n' "$*" >&2
}
