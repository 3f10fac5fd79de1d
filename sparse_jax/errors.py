"""The one error type users see for bad input."""


class ConfigError(ValueError):
  """Bad user input (config, data location, workdir) found before any compile.

  The message states the problem and, on its last line, the fix. `main` prints it
  without a traceback and exits non-zero.
  """
