"""The error types users see: bad input, and a run's write that failed."""


class ConfigError(ValueError):
  """Bad user input (config, data location, workdir) found before any compile.

  The message states the problem and, on its last line, the fix. `main` prints it
  without a traceback and exits non-zero.
  """


class WriteError(RuntimeError):
  """A write into a run's workdir failed mid-run (the disk is full, the workdir was
  made read-only or removed): which file, why, and which step a rerun resumes from.

  Like ConfigError, two lines, the last the fix; `main` and `study` print it without
  a traceback and exit non-zero. Nothing already written is lost: checkpoints are
  written whole or not at all (sparse_jax/storage.py).
  """
