"""Test helper: with SPARSE_JAX_WRITE_LOG=FILE in the environment, a Python process
that has this directory on PYTHONPATH records every path it opens for writing or
renames onto (Python-level file I/O only), and writes them to FILE at exit.

tests/test_multihost.py uses it to check which process wrote config.json and
summary.json. Without the variable it does nothing.
"""
import atexit
import os
import sys

_LOG = os.environ.get("SPARSE_JAX_WRITE_LOG")

if _LOG:
  _written: list[str] = []
  _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def _hook(event, args):
    if event == "open":
      path, mode, flags = args
      writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                else isinstance(flags, int) and flags & _WRITE_FLAGS)
    elif event == "os.rename":  # os.rename and os.replace.
      path, writes = args[1], True
    else:
      return
    if writes and isinstance(path, (str, bytes, os.PathLike)):
      _written.append(os.fsdecode(path))

  def _dump():
    data = "\n".join(_written) + "\n"  # Taken before the log's own open is recorded.
    # Appended: a multi-process run's supervisor and its worker share the variable.
    with open(_LOG, "a") as f:
      f.write(data)

  sys.addaudithook(_hook)
  atexit.register(_dump)
