"""Studies: every (grid point, variant, seed) of a config as an ordinary run, then a report.

  python -m sparse_jax.study --config configs/default.py --variants sparsified,vanilla \\
      --seeds 0,1,2,3,4 --workdir /tmp/sparse_jax/study_default \\
      [--grid model.mlp_dim=96,192,384] [--print_commands] [--config.<key>=<value> ...]

Layout of --workdir DIR (fixed, so runs can also be launched by hand into it):

  DIR/study.json                              the study: config, variants, seeds, grid, overrides
  DIR/runs/<point>/<variant>/seed_<s>/        one run workdir each (config.json, summary.json,
                                              metrics.jsonl, checkpoints, TensorBoard events)
  DIR/report/                                 report.md, report.html, summary.json, figures

`<point>` is `base` without a grid, else e.g. `model.mlp_dim=192`. Each run is exactly the
run of `python -m sparse_jax.main --config <file>:<args,variant> [overrides]
--config.seed=<s> [--config.<grid key>=<value>] --workdir <run dir>`: the study builds
that command line and loads its config through the same flag machinery, so the two are
interchangeable (--print_commands prints them). Rerunning a study skips finished runs and
resumes interrupted ones; a rerun may change --seeds (the study grows or shrinks), but
not the config, variants, grid or overrides.
"""
import dataclasses
import os
import re
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from sparse_jax import cli, run_files, storage
from sparse_jax.config_schema import RANGES, VARIANTS
from sparse_jax.errors import ConfigError, WriteError

STUDY_FILE = "study.json"
RUNS_DIR = "runs"
REPORT_DIR = "report"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arguments' (without a "
    "variant: the study appends each of --variants).", lock_config=True)
_VARIANTS = flags.DEFINE_string("variants", "sparsified,vanilla",
                                f"Comma-separated variants, of {', '.join(VARIANTS)}.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated integer seeds.")
_GRID = flags.DEFINE_multi_string(
    "grid", [], "KEY=V1,V2,...: a scale axis over a config key, e.g. "
    "model.mlp_dim=96,192,384 (repeat the flag for a product of axes).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The study directory (study.json, runs/, "
                               "report/). Rerunning on it resumes the study.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one `python -m sparse_jax.main` "
                           "command per run (shell-quoted) and exit without running.")
_CACHE_DIR = cli.define_compilation_cache_flag("passed on to the printed commands when "
                                               "given")


@dataclasses.dataclass(frozen=True)
class Run:
  point: str                  # 'base' or 'model.mlp_dim=192' (',' between several axes).
  variant: str
  seed: int
  args: tuple[str, ...]       # sparse_jax.main's arguments, --workdir excluded.
  workdir: str

  def command(self, extra: tuple[str, ...] = ()) -> str:
    return shlex.join(["python", "-m", "sparse_jax.main", *self.args,
                       f"--workdir={self.workdir}", *extra])


# ----------------------------------------------------------------------------- parsing
def split_list(text: str) -> list[str]:
  """'a,b,(1,2)' -> ['a', 'b', '(1,2)']: commas inside brackets do not split."""
  items, depth, current = [], 0, ""
  for ch in text:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      items.append(current.strip())
      current = ""
    else:
      current += ch
  items.append(current.strip())
  return [i for i in items if i]


def parse_variants(text: str) -> list[str]:
  variants = list(dict.fromkeys(split_list(text)))
  if not variants:
    raise ConfigError("--variants is empty.\nFix: pass e.g. --variants=sparsified,vanilla.")
  for v in variants:
    if v not in VARIANTS:
      raise ConfigError(f"Unknown variant {v!r} in --variants={text}.\n"
                        f"Fix: use variants of {', '.join(VARIANTS)}, e.g. "
                        "--variants=sparsified,vanilla.")
  return variants


def parse_seeds(text: str) -> list[int]:
  words = split_list(text)
  if not words:
    raise ConfigError("--seeds is empty: a study needs at least one seed.\n"
                      "Fix: pass e.g. --seeds=0,1,2.")
  try:
    seeds = list(dict.fromkeys(int(w) for w in words))
  except ValueError:
    raise ConfigError(f"--seeds={text} holds a seed that is not an integer.\n"
                      "Fix: pass comma-separated integers, e.g. --seeds=0,1,2.") from None
  valid = RANGES["seed"]  # The range config.seed has, checked here, before any run.
  bad = [s for s in seeds if not valid.accepts(s)]
  if bad:
    raise ConfigError(f"--seeds={text} holds {bad[0]}, which is not a valid seed: a seed "
                      f"must be {valid.text}.\nFix: pass seeds in that range, e.g. "
                      "--seeds=0,1,2.")
  return seeds


def _has_key(config, key: str) -> bool:
  node = config
  for part in key.split("."):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      return False
    node = node[part]
  return not isinstance(node, config_dict.ConfigDict)


def parse_grid(specs: list[str], config) -> dict[str, list[str]]:
  """['model.mlp_dim=96,192'] -> {'model.mlp_dim': ['96', '192']}, keys checked."""
  grid = {}
  for spec in specs:
    key, sep, values = spec.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key:
      raise ConfigError(f"--grid={spec} is not KEY=V1,V2,...\n"
                        "Fix: pass e.g. --grid=model.mlp_dim=96,192,384.")
    if not _has_key(config, key):
      raise ConfigError(f"--grid key {key!r} is not a key of the config.\n"
                        "Fix: use a key the config defines (python -m sparse_jax.main "
                        "--dry_run prints the whole config), e.g. --grid=model.mlp_dim=96,192.")
    if key in ("seed", "variant"):
      raise ConfigError(f"--grid over {key!r}: the study sets it itself.\n"
                        f"Fix: use --{key}s instead of --grid={spec}.")
    if key in grid:
      raise ConfigError(f"--grid names {key!r} twice.\nFix: pass each key once.")
    grid[key] = list(dict.fromkeys(split_list(values)))
    if not grid[key]:
      raise ConfigError(f"--grid={spec} has no values.\n"
                        f"Fix: pass values, e.g. --grid={key}=V1,V2.")
  return grid


def user_overrides(argv: list[str]) -> list[str]:
  """The --config.<key> overrides of a command line, each as one `--config.k=v` word
  (absl also accepts `--config.k v`; bools may be `--config.k` / `--noconfig.k`)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if re.match(r"^--?(no)?config\.", arg):
      arg = "--" + arg.lstrip("-")
      if ("=" not in arg and not arg.startswith("--noconfig.") and i + 1 < len(argv)
          and not argv[i + 1].startswith("-")):
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      out.append(arg)
    i += 1
  return out


def point_name(values: dict[str, str]) -> str:
  if not values:
    return "base"
  return ",".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
  points = [{}]
  for key, values in grid.items():
    points = [p | {key: v} for p in points for v in values]
  return points


def config_with_variant(config_arg: str, variant: str) -> str:
  path, _, args = config_arg.partition(":")
  return f"{path}:{args},{variant}" if args else f"{path}:{variant}"


def check_config_arg(config_arg: str) -> None:
  args = config_arg.partition(":")[2]
  named = [w.strip() for w in args.split(",") if w.strip() in VARIANTS]
  if named:
    raise ConfigError(f"--config={config_arg} already names the variant {named[0]!r}; "
                      "the study appends each of --variants.\n"
                      f"Fix: drop ':{named[0]}' from --config and pass "
                      f"--variants={named[0]} (or several).")


# ----------------------------------------------------------------------------- configs
def load_config(args: list[str] | tuple[str, ...], grid: dict[str, list[str]] | None = None):
  """The config `python -m sparse_jax.main ARGS` would build (ARGS without --workdir).

  A value of `grid` (the study's --grid) that is not of its key's type is reported as
  the --grid entry the user typed, not as the --config.KEY=VALUE made of it."""
  argv = ["sparse_jax.main", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, flag_values=values,
                                           lock_config=True, sys_argv=argv)
  try:
    values(argv)
    config = holder.value
    config.to_dict()  # Overrides apply lazily: errors surface here.
    return config
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    config_arg = cli.config_argument(argv[1:])
    key = _failed_override(e)
    if grid and key in grid:
      message = cli.override_value_message(
          e, values, typed=f"--grid={key}={','.join(grid[key])}",
          example_flag=lambda k, v: f"--grid={k}={v}")
      raise ConfigError(message.replace("Fix: pass ", "Fix: pass for each value ", 1)
                        ) from None
    message = cli.config_file_message(e, config_arg)
    if message is None and not isinstance(e, (flags.Error, AttributeError, KeyError,
                                              OSError, ValueError, TypeError)):
      raise
    raise ConfigError(message or cli.flag_error_message(e, values, config_arg)) from None


def _failed_override(error: Exception) -> str | None:
  """KEY of the --config.KEY=VALUE flag absl refused, or None."""
  match = re.match(r"flag --config\.([\w.]+)=", str(error))
  return match[1] if isinstance(error, flags.IllegalFlagValueError) and match else None


def check_run_config(config, grid: dict[str, list[str]]) -> None:
  """config_schema.validate for one run; a grid value out of its key's range is named
  as the --grid entry the user typed."""
  from sparse_jax import config_schema  # pylint: disable=import-outside-toplevel
  try:
    config_schema.validate(config)
  except ConfigError as e:
    text = str(e)
    for key, values in grid.items():
      if text.startswith(f"config.{key}="):
        problem, fix = text.rsplit("\n", 1)
        fix = fix.replace(f"--config.{key}=", f"--grid={key}=")
        raise ConfigError(f"--grid={key}={','.join(values)}: {problem}\n{fix}") from None
    raise


def plan(config_arg: str, variants: list[str], seeds: list[int], grid: dict[str, list[str]],
         overrides: list[str], workdir: str) -> list[Run]:
  """Every run of the study, in order: grid point, then variant, then seed."""
  runs = []
  for values in grid_points(grid):
    point = point_name(values)
    for variant in variants:
      for seed in seeds:
        args = (f"--config={config_with_variant(config_arg, variant)}", *overrides,
                f"--config.seed={seed}", *(f"--config.{k}={v}" for k, v in values.items()))
        rundir = os.path.join(workdir, RUNS_DIR, point, variant, f"seed_{seed}")
        runs.append(Run(point, variant, seed, args, rundir))
  return runs


def study_spec(config_arg: str, variants, seeds, grid, overrides) -> dict:
  path, _, args = config_arg.partition(":")
  return {"config": path, "config_path": os.path.abspath(path), "config_args": args,
          "variants": variants, "seeds": seeds, "grid": grid, "overrides": overrides}


def check_study_file(workdir: str, spec: dict) -> dict:
  """The spec to save: refuses a DIR holding another study; seeds may change (the
  saved spec lists every seed run so far)."""
  path = run_files.workdir_path(workdir) / STUDY_FILE
  old = run_files.read_json(path)
  if old is None:
    return spec
  keys = ("config_path", "config_args", "variants", "grid", "overrides")
  diff = [k for k in keys if old.get(k) != spec[k]]
  if diff:
    shown = "; ".join(f"{k}: {old.get(k)!r} there, {spec[k]!r} now" for k in diff)
    raise ConfigError(f"{path} describes a different study ({shown}).\n"
                      "Fix: use a new --workdir, or rerun with that study's options "
                      f"(see {path}).")
  return spec | {"seeds": sorted(set(old.get("seeds", [])) | set(spec["seeds"]))}


# ----------------------------------------------------------------------------- running
def _say(message: str) -> None:
  print(f"[sparse_jax study {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
        flush=True)


def run_study(runs: list[Run], configs: list, workdir: str) -> list[str]:
  """Trains every run not finished yet, in order; returns the failed (diverged) ones."""
  import jax  # pylint: disable=import-outside-toplevel
  from sparse_jax import train  # pylint: disable=import-outside-toplevel
  finished = [(run_files.workdir_path(r.workdir) / run_files.SUMMARY_FILE).exists()
              for r in runs]
  todo = len(runs) - sum(finished)
  walls, failed = [], []
  for i, (run, config) in enumerate(zip(runs, configs)):
    line = f"run {i + 1}/{len(runs)} {run.point} {run.variant} seed {run.seed}"
    if walls:
      left = todo - len(walls) - len(failed)
      line += (f" | study ETA {train.format_eta(left * sum(walls) / len(walls))} "
               f"(mean {sum(walls) / len(walls):.0f} s per run)")
    _say(line + (" (finished earlier)" if finished[i] else ""))
    start = time.time()
    try:
      train.train_and_evaluate(config, run.workdir)
    except train.NonFiniteLossError as e:
      _say(f"run {i + 1}/{len(runs)} failed: {e}")
      failed.append(run.workdir)
      continue
    finally:
      jax.clear_caches()
    if not finished[i]:
      walls.append(time.time() - start)
  return failed


def main(argv) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}.\nFix: pass options as --name=value.")
  logging.set_verbosity(logging.WARNING)
  try:
    if not _WORKDIR.value:
      raise ConfigError("No --workdir given.\nFix: pass --workdir=/path/to/study_dir.")
    config_arg = flags.FLAGS["config"].config_filename
    check_config_arg(config_arg)
    variants = parse_variants(_VARIANTS.value)
    seeds = parse_seeds(_SEEDS.value)
    base = _CONFIG.value  # The config without a variant, with the user's overrides.
    base.to_dict()
    grid = parse_grid(_GRID.value, base)
    overrides = user_overrides(sys.argv[1:])
    workdir = _WORKDIR.value
    runs = plan(config_arg, variants, seeds, grid, overrides, workdir)
    configs = [load_config(r.args, grid) for r in runs]
    for config in configs:
      check_run_config(config, grid)
    spec = check_study_file(workdir, study_spec(config_arg, variants, seeds, grid,
                                                overrides))
  except ConfigError as e:
    cli.fail(str(e))
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    cli.fail(cli.flag_error_message(e))

  if _PRINT.value:
    extra = ()
    if flags.FLAGS["compilation_cache_dir"].present:
      extra = (f"--compilation_cache_dir={_CACHE_DIR.value}",)
    for run in runs:
      print(run.command(extra))
    print("# then: " + shlex.join(["python", "-m", "sparse_jax.report",
                                   os.path.join(workdir, RUNS_DIR), "--out",
                                   os.path.join(workdir, REPORT_DIR)]))
    return

  cli.show_progress()
  cli.use_compilation_cache(_CACHE_DIR.value)
  cli.import_tensorflow_quietly()
  from etils import epath  # pylint: disable=import-outside-toplevel
  from sparse_jax import report, train  # pylint: disable=import-outside-toplevel
  try:
    for run, config in zip(runs, configs):  # Before anything is written.
      train.check_workdir(run.workdir, config)
    root = run_files.workdir_path(workdir)
    try:
      root.mkdir(parents=True, exist_ok=True)
      run_files.write_json_atomic(root / STUDY_FILE, spec)
    except OSError as e:  # A full disk (writability was checked above).
      raise storage.simple_failure(e, str(root), "no run was started") or e
    _say(f"{len(runs)} runs: {len(grid_points(grid))} grid point(s) x {len(variants)} "
         f"variant(s) x {len(seeds)} seed(s) in {root / RUNS_DIR}")
    failed = run_study(runs, configs, workdir)
  except (ConfigError, WriteError) as e:  # WriteError: rerunning resumes the study.
    cli.fail(str(e))
  try:
    out = report.write_report([str(root / RUNS_DIR)], str(root / REPORT_DIR))
  except OSError as e:
    failure = storage.simple_failure(e, str(root / REPORT_DIR), "every run is finished "
                                     "and kept; the rerun only writes the report")
    if failure is None:
      raise
    cli.fail(str(failure))
  _say(f"report: {epath.Path(out) / 'report.md'}")
  print(epath.Path(out) / "report.md")
  if failed:
    cli.fail(f"{len(failed)} run(s) diverged: {', '.join(failed)}.\n"
             "Fix: lower --config.optimizer.learning_rate (or raise warmup_steps) and "
             "rerun the study in a new --workdir.")


def run() -> None:
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
