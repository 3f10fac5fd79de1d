"""A run's writes that fail: a disk that fills, a workdir made read-only or removed.

A run writes its workdir from several places, some of them in background threads
(orbax's asynchronous checkpoint saves, clu's TensorBoard writer). When one of those
writes fails, the library raises its own error (orbax: `ValueError: RESOURCE_EXHAUSTED
... [os_error_code='28']`, clu: `AsyncError`, Python: `OSError`), often far from the
write and after logging it in every thread involved. `write_failure` recognises the
operating-system error under any of them, and `WriteError` is the one message the user
gets: which file, what the system said, what the next checkpoint needs, and which step
a rerun resumes from (the last complete checkpoint: nothing written before is lost).
"""
import contextlib
import errno
import logging
import os
import re
import shutil
from typing import Any

from sparse_jax.errors import WriteError

# The errors a write can meet that the user fixes on the machine, not in the config.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device",
                  errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted",
                  errno.ENOENT: "no such file or directory",
                  errno.EIO: "input/output error"}
# The same, as libraries that do not keep the errno spell them (TensorFlow's file
# writer, tensorstore's messages, which do keep a code: os_error_code='28').
_STRERRORS = {os.strerror(code).lower(): code for code in STORAGE_ERRNOS}
_CODE = re.compile(r"os_error_code='?(\d+)")


def exception_chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it wraps (its causes and contexts), outermost first:
  libraries re-raise the operating system's error (or the user's) inside their own."""
  out = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def os_error(error: BaseException) -> tuple[int, str | None] | None:
  """(errno, path or None) of the storage error under `error` (through the causes
  that orbax, clu and tensorstore wrap it in), or None if it is not one."""
  for e in exception_chain(error):
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return e.errno, e.filename
  for e in exception_chain(error):  # Named in the text too: write_failure finds it.
    text = str(e)
    code = _CODE.search(text)
    if code and int(code[1]) in STORAGE_ERRNOS:
      return int(code[1]), None
    lowered = text.lower()
    for words, code in _STRERRORS.items():
      if words in lowered:
        return code, None
  return None


@contextlib.contextmanager
def named_on_error(path: Any):
  """Re-raises an OSError of writing `path` with `path` as its filename: a failed
  write() (a full disk) names no file, and the run's message must name it."""
  try:
    yield
  except OSError as e:
    if e.filename is not None:
      raise
    raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def directory_bytes(path: Any) -> int:
  """Bytes of the files under `path` (0 if it is gone)."""
  total = 0
  for root, _, files in os.walk(str(path)):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except OSError:
        pass
  return total


def complete_checkpoints(directory: Any) -> list[int]:
  """Steps of the complete checkpoints in `directory`: orbax writes a step into
  `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when it is whole, so
  only plain numbers count."""
  try:
    names = os.listdir(str(directory))
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def free_bytes(path: str) -> int | None:
  """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path or "/").free
  except OSError:
    return None


def _size(n: float) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} bytes"


def _shown_path(path: str | None, workdir: str) -> str:
  """The file a user recognises: a checkpoint's step directory rather than a
  tensorstore chunk deep inside its temporary directory."""
  if not path:
    return f"a file in {workdir}"
  checkpoints = os.path.join(workdir, "checkpoints") + os.sep
  if path.startswith(checkpoints):
    step = path[len(checkpoints):].split(os.sep)[0].split(".")[0]
    if step.isdigit():
      return f"the checkpoint of step {step} ({checkpoints}{step})"
  return path.rstrip(os.sep)


def write_failure(error: BaseException, workdir: str, state_bytes: int | None = None
                  ) -> WriteError | None:
  """The WriteError for a run whose write into `workdir` failed with `error`, or None
  if `error` is not a storage error. `state_bytes`: the train state's size, the
  estimate of a checkpoint's when none is on disk yet."""
  found = os_error(error)
  if found is None:
    return None
  code, path = found
  workdir = str(workdir).rstrip(os.sep)
  if path is None:  # orbax, TensorFlow and clu name the file only in their messages.
    named = re.compile(re.escape(workdir + os.sep) + r"[^\s\"';,]+")
    path = next((m[0] for e in exception_chain(error) if (m := named.search(str(e)))),
                None)
  # Only the workdir's writes: a dataset that cannot be read is another error.
  ours = (path.startswith(workdir + os.sep) or path == workdir if path else
          any(workdir in str(e) for e in exception_chain(error)))
  if not ours:
    return None
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = complete_checkpoints(checkpoints)
  gone = not os.path.isdir(workdir)
  if gone:
    resume = (f"{workdir} no longer exists (removed, or its disk unmounted, while the "
              "run was going), so a rerun starts from scratch unless it comes back")
  elif steps:
    resume = (f"rerunning the same command resumes from the last complete checkpoint, "
              f"step {steps[-1]}; nothing written before is lost")
  else:
    resume = ("no checkpoint was complete yet, so rerunning the same command starts "
              "from step 0")
  need = (directory_bytes(os.path.join(checkpoints, str(steps[-1]))) if steps
          else state_bytes)
  free = free_bytes(os.path.realpath(path) if path else workdir)  # (Links followed.)
  space = ""
  if code in (errno.ENOSPC, errno.EDQUOT):
    space = (f" ({_size(free)} free" if free is not None else " (")
    space += (f"; a checkpoint of this run needs about {_size(need)})"
              if need else ")")
  what = "the workdir is gone" if gone else STORAGE_ERRNOS[code]
  message = (f"Writing {_shown_path(path, workdir)} failed: {what}{space}. The run "
             f"stopped; {resume}.")
  if code in (errno.ENOSPC, errno.EDQUOT):
    room = f"at least {_size(need)} " if need else "space "
    fix = (f"free {room}on the disk of {workdir}, or move the workdir to a larger "
           "disk, then rerun the same command")
  elif gone:
    fix = ("put the workdir back (mount it again) and rerun the same command, or rerun "
           "in a new --workdir")
  elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
    fix = (f"make {workdir} writable again (remount it read-write, or give this user "
           "write permission), then rerun the same command")
  else:
    fix = ("check the disk of the workdir (dmesg shows I/O errors), then rerun the "
           "same command")
  return WriteError(f"{message}\nFix: {fix}.")


def dataset_failure(error: BaseException, data_dir: str | None) -> WriteError | None:
  """The WriteError for preparing a dataset into `data_dir` on a disk that is full or
  read-only (the run has written nothing yet), or None if `error` is not that."""
  found = os_error(error)
  if not data_dir or "://" in data_dir or found is None or found[0] not in (
      errno.ENOSPC, errno.EDQUOT, errno.EROFS):
    return None
  data_dir = os.path.abspath(data_dir)
  path = found[1] or next((m[0] for e in exception_chain(error) if (m := re.search(
      re.escape(data_dir + os.sep) + r"[^\s\"';,]+", str(e)))), None)
  if not (path or "").startswith(data_dir + os.sep):
    return None
  return WriteError(
      f"Preparing the dataset in config.data_dir={data_dir} failed writing {path}: "
      f"{STORAGE_ERRNOS[found[0]]}; the run has written nothing yet.\nFix: free space "
      f"on the disk of {data_dir} (or make it writable), or pass --config.data_dir=<a "
      "folder on a disk with room> (datasets are prepared there once), then rerun the "
      "same command.")


def simple_failure(error: BaseException, folder: str, state: str) -> WriteError | None:
  """The WriteError for a failed write outside a run's training (study.json, a
  report's files), or None if `error` is not a storage error. `state`: what the
  failure leaves, e.g. 'no run was started'."""
  found = os_error(error)
  if found is None:
    return None
  code, path = found
  path = path or next((e.filename for e in exception_chain(error)
                       if isinstance(e, OSError) and e.filename), None) or folder
  return WriteError(f"Writing {path} failed: {STORAGE_ERRNOS[code]}; {state}.\n"
                    f"Fix: free space on the disk of {folder} (or make it writable), "
                    "then rerun the same command.")


class _DropReported(logging.Filter):
  """Drops the error records of a storage error that orbax (in each of its threads),
  clu's TensorBoard writer and asyncio (orbax's failed futures, when collected) log:
  the run reports that write itself, once (WriteError). Other records pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not (record.name == "asyncio" or any(
        f"{os.sep}{library}{os.sep}" in record.pathname for library in ("orbax", "clu"))):
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      if os_error(record.exc_info[1]) is not None:
        return False
      text += str(record.exc_info[1])
    return _CODE.search(text) is None and not any(w in text.lower() for w in _STRERRORS)


_FILTER = _DropReported()


def quiet_reported_write_errors() -> None:
  """Installs the filter on absl's logger (orbax and clu log through it) and
  asyncio's; idempotent."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)
