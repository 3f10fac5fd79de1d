"""Shared by the command-line programs (main, study, report): the two-line error exit,
the prompt exit after a run, progress lines on stderr, and problem/fix messages for flag
and config errors."""
import atexit
import gc
import importlib
import logging as std_logging
import os
import sys
import tempfile
import threading

from absl import flags, logging

from sparse_jax.errors import ConfigError


DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sparse_jax", "xla")


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (which tfds and clu need) without its start-up chatter.

  TensorFlow writes INFO lines such as "oneDNN custom operations are on" straight to
  file descriptor 2 while it is imported, before its logging is set up, so no log level
  hides them. The import's stderr is caught, and every line except those INFO lines
  (and absl's note about them) is passed on: real warnings and errors still show.
  """
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as caught:
    os.dup2(caught.fileno(), 2)
    try:
      importlib.import_module("tensorflow")
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      for line in caught:
        if not (line.startswith(b"I0000") or b"before absl::InitializeLog()" in line):
          sys.stderr.buffer.write(line)
      sys.stderr.flush()


def define_compilation_cache_flag(purpose: str) -> flags.FlagHolder:
  """--compilation_cache_dir: JAX's persistent compilation cache ('' disables it)."""
  return flags.DEFINE_string("compilation_cache_dir", DEFAULT_CACHE_DIR,
                             f"JAX persistent compilation cache, {purpose} ('' disables "
                             "it).")


def use_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` ('' = leave it off)."""
  if directory:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def exit_promptly(code: int = 0) -> None:
  """Ends the process now, once its work is saved, without the interpreter's teardown.

  After a run has written everything, a normal exit of a process that imported JAX and
  TensorFlow still spends seconds (2-3 s on a 2-core VM, benchmarks/exit_time.py)
  garbage-collecting every module's objects and running C++ destructors, none of which
  writes anything. This runs what must run (the atexit
  functions: logging flushes its handlers, JAX waits for pending effects and leaves a
  multi-process job cleanly), flushes stdout and stderr, and calls os._exit.

  Returns without exiting (the caller then exits as usual) while another non-daemon
  thread is alive: it may still be writing, and a normal exit waits for it.
  """
  if any(t is not threading.main_thread() and not t.daemon and t.is_alive()
         for t in threading.enumerate()):
    return
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # Closed or broken: nothing more can be shown.
      pass
  os._exit(code)  # pylint: disable=protected-access


def fail(message: str) -> None:
  """Ends the program with the two-line error (`message`'s last line is the fix) as
  the last lines of its output, exit code 1."""
  # Library objects that failed (orbax's restore futures) log "exception was never
  # retrieved" when they are garbage-collected: collect them now, before the message,
  # not at the interpreter's teardown after it.
  gc.collect()
  print(f"sparse_jax: error: {message}", file=sys.stderr)
  exit_promptly(1)
  sys.exit(1)  # Another thread is still alive: exit as usual, after it.


def show_progress() -> None:
  """Progress lines from the 'sparse_jax' logger on stderr; library chatter (orbax,
  absl) stays at warnings."""
  progress = std_logging.getLogger("sparse_jax")
  if not progress.handlers:
    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("[sparse_jax %(asctime)s] %(message)s",
                                               "%H:%M:%S"))
    progress.addHandler(handler)
  progress.setLevel(std_logging.INFO)
  progress.propagate = False
  logging.set_verbosity(logging.WARNING)


def flag_error_message(error: Exception) -> str:
  """A two-line problem/fix message for errors raised while flags and config load."""
  text = str(error)
  marker = f"{ConfigError.__module__}.{ConfigError.__name__}: "
  if marker in text:  # Our own ConfigError from a config file's get_config().
    return text.split(marker)[-1].strip()
  if isinstance(error, flags.UnrecognizedFlagError) and "'config." in text:
    key = text.split("'config.", 1)[1].rstrip("'")
    return (f"Unknown config key {key!r}.\nFix: remove --config.{key}, or use a key the "
            "config defines (--dry_run prints the whole config).")
  if isinstance(error, (AttributeError, KeyError)):  # An override of an unknown key.
    key = text.strip("'\"").split("'")[0]
    given = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a]
    return (f"Unknown config key {key!r} in {' '.join(given) or 'a --config.* override'}."
            "\nFix: remove that override, or use a key the config defines (--dry_run "
            "prints the whole config).")
  if isinstance(error, OSError) and "Failed loading config file" in text:
    return (f"Could not load the config file: {text.splitlines()[-1].strip()}\n"
            "Fix: pass --config=configs/default.py (a path relative to the current "
            "directory, optionally with ':variant').")
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return f"{first}\nFix: see --helpshort for the flags and their values."


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser of the CLIs: a missing --config or a bad flag exits with the
  two-line error instead of absl's usage dump."""
  try:
    argv = flags.FLAGS(argv)
    if flags.FLAGS.config is None:
      raise ConfigError("No --config given.\nFix: pass --config=configs/default.py.")
    return argv
  except ConfigError as e:
    fail(str(e))
  except (flags.Error, AttributeError, KeyError, OSError) as e:
    fail(flag_error_message(e))
    raise  # Unreachable: fail exits.
