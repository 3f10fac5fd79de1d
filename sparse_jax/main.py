"""Entry point: python -m sparse_jax.main --config configs/default.py --workdir DIR.

Bad input (ConfigError) and divergence (NonFiniteLossError) end the program with a
short message whose last line names the fix, no traceback, and exit code 1.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sparse_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arguments'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "summary.json. Rerunning on it resumes the run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model abstractly, print the "
                             "config, mesh and parameter table, and exit.")


def _fail(message: str) -> None:
  print(f"sparse_jax: error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}.\nFix: pass options as --name=value.")
  config = _CONFIG.value
  # Imported here so that flag errors and --help do not pay for importing JAX.
  from sparse_jax import describe, train  # pylint: disable=import-outside-toplevel
  try:
    if _DRY_RUN.value:
      print(describe.describe(config))
      return
    if not _WORKDIR.value:
      raise ConfigError("No --workdir given.\nFix: pass --workdir=/path/to/run_dir.")
    logging.set_verbosity(logging.INFO)
    train.train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, train.NonFiniteLossError) as e:
    _fail(str(e))


def run() -> None:
  """Runs main, turning errors raised while the config file loads into clean exits."""
  try:
    app.run(main)
  except ConfigError as e:
    _fail(str(e))


if __name__ == "__main__":
  run()
