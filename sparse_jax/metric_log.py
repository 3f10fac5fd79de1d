"""metrics.jsonl: every logged and evaluated scalar of a run, one JSON object per step.

    {"step": 250, "train/loss": 1.93, "train/steps_per_sec": 41.2, "eval/accuracy": 0.71}

Written by process 0 next to TensorBoard's event files, so reports and users need no
TensorBoard parsing. Safe under resume: a run that restarts from checkpoint step S
first drops every line with step > S (and any line cut short by a kill), rewriting the
file atomically, so a kill -9 and rerun never duplicates or leaves stale steps.
"""
import json
from typing import Any, Iterator

from etils import epath

from sparse_jax import storage

FILE = "metrics.jsonl"


class DamagedLineError(ValueError):
  """A line of the file, other than a last line cut short, that is not a record."""


def read(path: epath.Path) -> Iterator[dict[str, Any]]:
  """The file's records in order.

  A last line without its newline that does not parse was cut short by a killed writer
  and is skipped; any other line that is not a record {"step": int, ...} raises
  DamagedLineError (never dropped silently: a resume would rewrite the file without it).
  """
  if not path.exists():
    return
  lines = path.read_text().split("\n")  # A complete file ends in "\n": last piece ''.
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      yield record
    elif number < len(lines):  # A complete line (it has its newline) that is no record.
      raise DamagedLineError(f"line {number} is not a record of a step ({line[:80]!r})")


class MetricLog:
  """Appends one line per step to `workdir/metrics.jsonl` (inactive off process 0)."""

  def __init__(self, workdir: epath.Path, start_step: int, active: bool = True):
    self.path = workdir / FILE
    self.active = active
    self._records = []  # Kept for filesystems without append (gs://): rewritten whole.
    if not active or not self.path.exists():
      return
    text = self.path.read_text()
    self._records = [r for r in read(self.path) if r["step"] <= start_step]
    kept = "".join(_line(r) for r in self._records)
    if kept != text:
      self._replace(kept)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active or not scalars:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._records.append(record)
    if "://" in str(self.path):  # Object stores cannot append: rewrite atomically.
      self._replace("".join(_line(r) for r in self._records))
    else:
      with storage.named_on_error(self.path), self.path.open("a") as f:
        f.write(_line(record))
        f.flush()

  def _replace(self, text: str) -> None:
    tmp = self.path.parent / f"{self.path.name}.tmp"
    with storage.named_on_error(self.path):
      tmp.write_text(text)
      tmp.replace(self.path)


def _line(record: dict[str, Any]) -> str:
  return json.dumps(record, sort_keys=False) + "\n"
