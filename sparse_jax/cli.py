"""Shared by the command-line programs (main, study, report): the two-line error exit,
the prompt exit after a run, progress lines on stderr, and problem/fix messages for flag
and config errors."""
import atexit
import gc
import importlib
import logging as std_logging
import os
import re
import sys
import sysconfig
import tempfile
import threading
import traceback

from absl import flags, logging

from sparse_jax import storage
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
  """Turns on JAX's persistent compilation cache in `directory` ('' = leave it off).

  A directory that cannot be made or written leaves it off with one warning line: the
  cache only saves compile time, so a run goes on without it (JAX itself would warn
  with a traceback-like message at each compile)."""
  if directory and "://" not in directory:
    try:
      os.makedirs(directory, exist_ok=True)
      with tempfile.TemporaryFile(dir=directory):
        pass
    except OSError as e:
      print(f"sparse_jax: warning: --compilation_cache_dir={directory} cannot be used "
            f"({e.strerror}); compiling without the cache. Pass a writable directory, "
            "or '' to turn it off.", file=sys.stderr, flush=True)
      return
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


# --------------------------------------------------------------------------- config files
def config_argument(argv: list[str]) -> str | None:
  """The --config value of a command line as typed ('file.py:args'), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _frames(error: BaseException) -> list[traceback.FrameSummary]:
  return list(traceback.extract_tb(error.__traceback__)) if error.__traceback__ else []


_LIBRARY_DIRS = tuple(os.path.realpath(p) + os.sep for p in {
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
    sysconfig.get_paths()["platlib"], os.path.dirname(os.path.abspath(__file__))})


def _is_users(frame: traceback.FrameSummary) -> bool:
  """A frame of the user's code: not Python's, not an installed library's, not ours."""
  name = frame.filename
  return not name.startswith("<") and not os.path.realpath(name).startswith(_LIBRARY_DIRS)


def _while_loading_config(chain: list[BaseException]) -> bool:
  """Whether an exception of `chain` passed through ml_collections' config file loader
  (which imports the file and calls its get_config)."""
  return any(f.name == "parse" and f.filename.endswith(os.path.join("config_flags",
                                                                    "config_flags.py"))
             and ("_LoadConfigModule" in (f.line or "") or "get_config" in (f.line or ""))
             for e in chain for f in _frames(e))


def config_file_message(error: BaseException, config_arg: str | None) -> str | None:
  """The two-line message for a config file that does not load (a syntax error, or
  anything its import or get_config raises): the file, the line and the reason, from
  the user's own frames; None if `error` is not that.

  Our ConfigError from a config's get_config (an unknown ':argument') keeps its own
  message."""
  # Loading a config passes the user's exception through ml_collections (which re-raises
  # TypeError/ValueError as text, or defers an IOError) and absl (which wraps it in an
  # IllegalFlagValueError); the original, with its traceback, is the last link.
  chain = storage.exception_chain(error)
  original = chain[-1]
  if isinstance(original, ConfigError):
    return str(original)
  if not (_while_loading_config(chain) or isinstance(original, SyntaxError)):
    return None
  path, _, args = (config_arg or "the config file").partition(":")
  reason = (str(original).strip().splitlines() or [""])[-1]
  reason = f"{type(original).__name__}: {reason}" if reason else type(original).__name__
  if isinstance(original, SyntaxError) and original.filename:
    # Compiling fails before any frame of the file runs: the error holds the place.
    where = [(original.filename, original.lineno, "", (original.text or "").strip())]
    reason = f"{type(original).__name__}: {original.msg}"
  else:
    where = [(f.filename, f.lineno, f.name, (f.line or "").strip())
             for f in _frames(original) if _is_users(f)][-3:]
  if not where:  # Raised by the loader itself: no get_config, or wrong arguments.
    call = f"get_config({args!r})" if args else "get_config()"
    return (f"Config file {path} does not load: {reason} (while calling {call}).\n"
            f"Fix: define {call} in {path} returning the config, or pass another "
            "--config.")
  shown = " <- ".join(f"{file}:{line}" + (f" in {func}" if func else "")
                      + (f" `{text}`" if text else "")
                      for file, line, func, text in reversed(where))
  file, line = where[-1][:2]
  return (f"Config file {path} does not load: {reason}, at {shown}.\n"
          f"Fix: correct {file} at line {line}, or pass another --config.")


# ----------------------------------------------------------------------------- overrides
_TYPE_WORDS = (  # (parser class name, what the user must type, a generic example)
    ("IntegerParser", "an integer", "1"), ("FloatParser", "a number", "0.5"),
    ("BooleanParser", "true or false", "true"),
    ("TupleParser", "a tuple in quotes", "'(1, 2)'"),
    ("EnumClassParser", "one of its names", None))


def override_value_message(error: BaseException, flag_values: flags.FlagValues,
                           typed: str | None = None, example_flag=None) -> str | None:
  """The two-line message for a flag value that does not parse as the flag's type
  (absl says only "invalid literal for int()"), a --config.KEY=VALUE override or any
  other flag: names the flag (or `typed`, what the user actually wrote, e.g. a --grid
  entry), the type it needs and an example value (the config's or flag's own, or VALUE
  made whole); None if `error` is not that (a value out of a flag's bounds is not).

  `example_flag(key, value_text)` spells the example as the user's flag (default:
  --config.KEY=VALUE, or --NAME=VALUE)."""
  match = re.match(r"flag --([\w.]+)=(.*?): ", str(error), re.S)
  if not isinstance(error, flags.IllegalFlagValueError) or not match:
    return None
  name, value = match[1], match[2]
  key = name.removeprefix("config.")
  flag = flag_values[name] if name in flag_values else None
  parser = type(getattr(flag, "parser", None)).__name__
  if parser not in [p for p, _, _ in _TYPE_WORDS]:  # --config itself: its file failed.
    return None
  if parser in ("IntegerParser", "FloatParser"):
    try:  # Of the type, so refused for its bounds: absl's own words say which.
      flag.parser.convert(value)
      return None
    except (TypeError, ValueError):
      pass
  need, example = next((w, e) for p, w, e in _TYPE_WORDS if p == parser)
  default = getattr(flag, "default", None)
  if parser == "EnumClassParser":
    need = "one of " + ", ".join(flag.parser.enum_values)
    example = flag.parser.enum_values[0]
  if default is not None:
    example = (f"'{tuple(default)}'" if isinstance(default, (list, tuple)) else
               str(default).lower() if isinstance(default, bool) else str(default))
  if parser == "IntegerParser":
    try:  # 1e3 or 5.0: the integer the user meant.
      whole = float(value)
      if whole.is_integer():
        example = str(int(whole))
    except ValueError:
      pass
  spell = example_flag or (lambda k, v: f"--{name}={v}")
  got = f"{value!r} is not {need}" if value else "the value is empty"
  shown = spell(key, example if example else "...")
  what = f"config.{key}" if name.startswith("config.") else f"--{name}"
  return (f"{typed or f'--{name}={value}'}: {what} needs {need}; {got}.\n"
          f"Fix: pass {need}, e.g. {shown}.")


def flag_error_message(error: Exception, flag_values: flags.FlagValues | None = None,
                       config_arg: str | None = None) -> str:
  """A two-line problem/fix message for errors raised while flags and config load
  (`flag_values`: where the config's flags live, default absl's global FLAGS;
  `config_arg`: the --config value, default the command line's)."""
  text = str(error)
  flag_values = flags.FLAGS if flag_values is None else flag_values
  marker = f"{ConfigError.__module__}.{ConfigError.__name__}: "
  if marker in text:  # Our own ConfigError from a config file's get_config().
    return text.split(marker)[-1].strip()
  if isinstance(error, OSError) and "Failed loading config file" in text:
    return (f"Could not load the config file: {text.splitlines()[-1].strip()}\n"
            "Fix: pass --config=configs/default.py (a path relative to the current "
            "directory, optionally with ':variant').")
  config_arg = config_arg or config_argument(sys.argv[1:])
  for message in (override_value_message(error, flag_values),
                  config_file_message(error, config_arg)):
    if message:
      return message
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
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  return f"{first}\nFix: see --helpshort for the flags and their values."


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser of the CLIs: a missing --config or a bad flag exits with the
  two-line error instead of absl's usage dump."""
  try:
    argv = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS.config is None:  # (report has none.)
      raise ConfigError("No --config given.\nFix: pass --config=configs/default.py.")
    return argv
  except ConfigError as e:
    fail(str(e))
  except (flags.Error, AttributeError, KeyError, OSError) as e:
    fail(flag_error_message(e))
    raise  # Unreachable: fail exits.
  except Exception as e:  # pylint: disable=broad-except
    # Whatever a config file's import or get_config raises (SyntaxError, RuntimeError,
    # ImportError, ...) is the user's to fix: say where; anything else is our bug.
    message = config_file_message(e, config_argument(argv[1:]))
    if message is None:
      raise
    fail(message)
    raise  # Unreachable: fail exits.
