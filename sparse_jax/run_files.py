"""The files of a run's workdir, and reading them without trusting them.

    <workdir>/config.json              the run's config (written once, at its start)
    <workdir>/summary.json             final eval + config (written when it finishes)
    <workdir>/before_finetuning.json   eval of a finetune run's starting point
    <workdir>/metrics.jsonl            every logged step (sparse_jax/metric_log.py)
    <workdir>/checkpoints/<step>/      orbax checkpoints (sparse_jax/checkpoint.py)
    <workdir>/export/                  plain params of a finished run

A damaged file (not valid JSON, a line that is no record) raises ConfigError naming
the file and what to do; nothing is rewritten or dropped on the way.
"""
import json
import os
from typing import Any

from etils import epath

from sparse_jax import metric_log, storage
from sparse_jax.errors import ConfigError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
BEFORE_FILE = "before_finetuning.json"  # Eval of the starting point of a finetune run.
EXPORT_DIR = "export"                   # Plain (LoRA-merged) params of a finished run.

# What a user can do about each damaged file (the fix line).
_DAMAGED_FIX = {
    CONFIG_FILE: "restore it from a backup (a finished run's summary.json holds the "
                 "config under 'config'); if it is this run's own workdir, a new "
                 "--workdir also works",
    SUMMARY_FILE: "move it aside (mv {path} {path}.damaged); rerunning then evaluates "
                  "the final checkpoint again and writes a new one",
    BEFORE_FILE: "restore it from a backup, or move it aside (mv {path} {path}.damaged);"
                 " the summary then lacks the evaluation before finetuning",
    metric_log.FILE: "repair or delete that line, or move the file aside (mv {path} "
                     "{path}.damaged) to start a new log",
}


def workdir_path(workdir: str) -> epath.Path:
  """The workdir as a path: local ones made absolute, gs:// (any epath scheme) as is."""
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def write_json_atomic(path: epath.Path, payload: Any) -> None:
  """Writes JSON through a temporary file and a rename: readers never see half a file."""
  tmp = path.parent / f"{path.name}.tmp"
  with storage.named_on_error(path):
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=list))
    tmp.replace(path)



def damaged(path: epath.Path, why: str) -> ConfigError:
  """The error for a damaged workdir file: what is wrong, and the fix for that file."""
  fix = _DAMAGED_FIX.get(path.name, "restore it from a backup, or use a new workdir")
  return ConfigError(f"{path} is damaged: {why}. Nothing was changed.\n"
                     f"Fix: {fix.format(path=path)}.")


def read_json(path: epath.Path) -> dict[str, Any] | None:
  """The JSON object in a workdir file (None if absent); ConfigError if it is damaged."""
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise damaged(path, f"it is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise damaged(path, f"it holds a JSON {type(value).__name__}, not an object")
  return value


def read_metric_log(path: epath.Path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl ([] if absent); ConfigError if a line is damaged."""
  try:
    return list(metric_log.read(path))
  except metric_log.DamagedLineError as e:
    raise damaged(path, str(e)) from None
