#!/usr/bin/env bash
# Install sparse_jax on every worker of the slice: either this working tree (copied) or
# a git clone, then `pip install -e ".[tpu]"`. Every worker runs one JAX process of the
# same program, so every worker needs the same code.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/setup.sh [options]

Installs sparse_jax into ~/sparse_jax on all workers of the TPU slice NAME, replacing
what was there, with `python3 -m pip install -e ".[tpu]"`. Each option can also come
from the environment variable in brackets; the flag wins.

  --name NAME          [SJ_TPU_NAME] TPU VM name (required)
  --zone ZONE          [SJ_ZONE] its zone (required)
  --project PROJECT    [SJ_PROJECT] default: gcloud's configured project
  --source copy|git    [SJ_SOURCE] copy (default): this working tree, i.e. the files
                       git tracks plus the untracked ones it does not ignore, so
                       uncommitted edits go too; git: a clone of --repo on each worker
  --repo URL           [SJ_REPO] repository to clone (--source git); the workers must
                       be able to read it without credentials
  --ref REF            [SJ_REF] branch, tag or commit to check out (--source git;
                       default: the repository's default branch)
  --python PYTHON      [SJ_PYTHON] interpreter on the workers (default python3)
  --dry-run            [SJ_DRY_RUN=1] print the commands, run nothing
  -h, --help           this text

Stop a running training first (launch/stop.sh): its source directory is replaced. With
--source copy, a tracked file deleted but not committed makes tar fail: commit the
deletion (or restore the file) first.
USAGE
}

# common.sh is shellchecked on its own; not following it here keeps shellcheck quick.
# shellcheck source=/dev/null
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "--project --zone --name --source --repo --ref --python --dry-run" "$@"
check_target
case $SOURCE_MODE in
  copy)
    # The file list comes from git, so that ignored files (virtual environments, build
    # outputs, local workdirs) stay behind.
    [[ -e $REPO_ROOT/.git ]] || die "$REPO_ROOT is not a git checkout, so which files \
to copy is unknown" "work in a git clone of sparse_jax, or use --source git --repo URL" ;;
  git)
    [[ -n $GIT_REPO ]] || die "--source git needs the repository to clone" \
      "pass --repo URL or export SJ_REPO=URL, e.g. https://github.com/OWNER/sparse_jax.git" ;;
  *) die "unknown --source '$SOURCE_MODE'" "use --source copy or --source git" ;;
esac
scope_flags

# The same steps run on each worker; `set -e` makes the first failure fail the ssh.
install="$(quote "$PYTHON") -m pip install --quiet --upgrade pip && \
$(quote "$PYTHON") -m pip install --quiet -e '.[tpu]'"
if [[ $SOURCE_MODE == copy ]]; then
  tarball="${TMPDIR:-/tmp}/sparse_jax_src_$TPU_NAME.tgz"
  pack="git -C $(quote "$REPO_ROOT") ls-files -z --cached --others --exclude-standard \
| tar -C $(quote "$REPO_ROOT") --null -T - -czf $(quote "$tarball")"
  if ((DRY_RUN)); then
    printf '+ %s\n' "$pack"
  else
    printf '+ %s\n' "$pack" >&2
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" "${SCOPE[@]}" \
    --worker=all
  remote="set -e; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR; \
tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR; rm -f $REMOTE_TARBALL; cd $REMOTE_DIR; $install"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all \
    "--command=$remote"
  run rm -f "$tarball"
else
  checkout=""
  if [[ -n $GIT_REF ]]; then
    checkout="git -C $REMOTE_DIR checkout --quiet $(quote "$GIT_REF"); "
  fi
  remote="set -e; rm -rf $REMOTE_DIR; git clone --quiet $(quote "$GIT_REPO") $REMOTE_DIR; \
${checkout}cd $REMOTE_DIR; $install"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all \
    "--command=$remote"
fi
note "Next: launch/train.sh starts the training on all workers."
