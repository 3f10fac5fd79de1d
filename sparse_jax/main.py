"""Entry point: python -m sparse_jax.main --config configs/default.py --workdir DIR.

Bad input (ConfigError) and divergence (NonFiniteLossError) end the program with a
short message whose last line names the fix, no traceback, and exit code 1.

Multi-host: run the same command on every host. On a Cloud TPU pod slice or in a
SLURM / Open MPI job the processes find each other by themselves; elsewhere (a GPU
cluster, several processes on one machine) pass --coordinator_address,
--num_processes and --process_id (see sparse_jax/distributed.py). Each such process
runs its training in a worker copy of itself and supervises it, so that when another
process of the job stops, it ends with one message and exit code 75 (see
sparse_jax/supervisor.py).
"""
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sparse_jax import cli, config_schema, distributed, supervisor
from sparse_jax.cli import fail as _fail
from sparse_jax.cli import flag_error_message as _flag_error_message
from sparse_jax.cli import show_progress as _show_progress
from sparse_jax.errors import ConfigError, WriteError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arguments'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and "
                               "summary.json. Rerunning on it resumes the run.")
_CACHE_DIR = cli.define_compilation_cache_flag("so reruns and resumes skip recompiling")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model abstractly, print the "
                             "config, mesh, parameter table and the memory per device "
                             "of a few meshes, and exit (never connects processes).")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", None, "With --dry_run: size the meshes for this many devices "
    "(e.g. 16 for a v4-32 or v5e-16 slice) instead of the devices here.", lower_bound=1)
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "Compile the config's programs (train steps, eval step, T5's "
    "decode) for a TPU slice that is not here, e.g. v5e:16x16, v4:4x4x4, v5p:4x4x4, "
    "v6e:8x8, with the real TPU compiler (libtpu; no TPU, data or workdir needed), "
    "print the memory, FLOPs, collectives and time bound per chip, and exit; exit 1 if "
    "it does not fit. See docs/pods.md.")
_COMPILE_SLICES = flags.DEFINE_integer(
    "compile_slices", 1, "With --compile_for: that many slices joined by the data-center "
    "network (multislice; the data axis spans them).", lower_bound=1)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0, where it "
    "starts the coordinator (a free port; the same value on every process). Not needed "
    "on Cloud TPU pods and in SLURM/Open MPI jobs, which are detected.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: the number of processes (1 = a single "
    "process; turns off auto-detection).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's index, 0..num_processes-1 "
    "(0 runs the coordinator).", lower_bound=0)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", distributed.DEFAULT_TIMEOUT_S, "Multi-process runs: "
    "seconds to wait for the coordinator and all processes to connect.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S, "Multi-process runs: "
    "seconds without a heartbeat after which JAX's coordination service declares a "
    "process dead; the others then stop (exit code 75) with a message naming it.")


def _distributed_options() -> distributed.Options:
  """The multi-process flags, checked (no JAX needed, so bad ones fail at once)."""
  options = distributed.Options(coordinator_address=_COORDINATOR.value,
                                num_processes=_NUM_PROCESSES.value,
                                process_id=_PROCESS_ID.value,
                                initialization_timeout=_INIT_TIMEOUT.value,
                                heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
  try:
    distributed.check_options(options)
  except ConfigError as e:
    _fail(str(e))
  if _COMPILE_FOR.value is not None and _DRY_RUN.value:
    _fail("--compile_for and --dry_run given together.\nFix: pass one of them: "
          "--dry_run sizes the state by arithmetic, --compile_for compiles for a TPU.")
  if _COMPILE_SLICES.value != 1 and _COMPILE_FOR.value is None:
    _fail(f"--compile_slices={_COMPILE_SLICES.value} given without --compile_for.\n"
          "Fix: add --compile_for=TOPOLOGY, or drop --compile_slices.")
  if _DRY_RUN_DEVICES.value is not None and not _DRY_RUN.value:
    _fail(f"--dry_run_devices={_DRY_RUN_DEVICES.value} given without --dry_run.\n"
          "Fix: add --dry_run, or drop --dry_run_devices.")
  return options


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}.\nFix: pass options as --name=value.")
  logging.set_verbosity(logging.WARNING)
  channel = supervisor.Channel.from_environment()
  options = _distributed_options()
  config = _load_config()
  training = _COMPILE_FOR.value is None and not _DRY_RUN.value
  if training and not _WORKDIR.value:
    _fail("No --workdir given.\nFix: pass --workdir=/path/to/run_dir.")
  if training and not channel.supervised and _several_processes(options):
    # This process supervises; a copy of it (the worker) trains. Why: supervisor.py.
    cli.exit_promptly(supervisor.supervise(_WORKDIR.value))
  cli.use_compilation_cache(_CACHE_DIR.value)
  if _COMPILE_FOR.value is not None:
    _compile_for(config)
    return
  worker = None
  if training:
    _show_progress()
    # Before the processes meet: it hides file descriptor 2 for seconds, and an abort
    # by JAX's coordination service (another process died) would be hidden with it.
    cli.import_tensorflow_quietly()
    # Before anything starts a JAX backend: the processes must meet first.
    try:
      joined = distributed.initialize(options)
    except ConfigError as e:
      _fail(str(e))
    if joined:
      import jax  # pylint: disable=import-outside-toplevel
      std_logging.getLogger("sparse_jax").info("Joined as %s (pid %d).", joined,
                                               os.getpid())
      if jax.process_index() > 0:  # One copy of the progress lines: process 0's.
        std_logging.getLogger("sparse_jax").setLevel(std_logging.WARNING)
      worker = supervisor.Worker(channel, options.heartbeat_timeout)
  # Imported here so that flag errors and --help do not pay for importing JAX.
  cli.import_tensorflow_quietly()
  from sparse_jax import describe, train  # pylint: disable=import-outside-toplevel
  try:
    if _DRY_RUN.value:
      print(describe.describe(config, _DRY_RUN_DEVICES.value))
      return
    train.train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, WriteError, train.NonFiniteLossError) as e:
    if worker is not None:  # Tell the other processes first; exit 1.
      worker.stop_with_error(str(e))
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if worker is not None:  # Another process gone (exit 75), or a bug here (exit 1).
      worker.stop_after_exception(e)
    raise
  # Finished or preempted, everything written: skip the seconds of teardown (issue 31).
  cli.exit_promptly(0)


def _several_processes(options: distributed.Options) -> bool:
  """Whether this run is one of several processes (flags, or a detected cluster)."""
  if options.num_processes is not None:
    return options.num_processes > 1
  try:
    return distributed.detect_cluster() is not None
  except ConfigError as e:
    _fail(str(e))
    raise  # Unreachable: _fail exits.


def _compile_for(config) -> None:
  """--compile_for: compile for the TPU slice, print the table; exit 1 if it does not
  fit (or does not compile), with the fix."""
  from sparse_jax import tpu  # pylint: disable=import-outside-toplevel
  try:
    topology = tpu.parse_topology(_COMPILE_FOR.value, _COMPILE_SLICES.value)
  except ConfigError as e:
    _fail(str(e))
  _show_progress()
  from sparse_jax import target_compile  # pylint: disable=import-outside-toplevel
  try:
    report = target_compile.compile_for(config, topology, config_name=_config_name(),
                                        progress=_progress_line)
    print(target_compile.format_report(report), flush=True)
    target_compile.check_fits(report)
  except ConfigError as e:
    _fail(str(e))


def _config_name() -> str:
  """The --config argument as the user typed it (file and ':arguments')."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return "config"


def _progress_line(message: str) -> None:
  std_logging.getLogger("sparse_jax").info(message)


def _load_config():
  """The config with its command-line overrides applied (ml_collections applies them
  lazily, so unknown keys and unloadable files surface here), validated."""
  try:
    config = _CONFIG.value
    config.to_dict()
    # Here, before JAX is imported: bad values stop in a second, with nothing written.
    config_schema.validate(config)
    return config
  except ConfigError as e:
    _fail(str(e))
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    _fail(_flag_error_message(e))


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
