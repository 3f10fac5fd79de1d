"""metrics.jsonl: appended per step, cut back to the resumed step, cut-off lines dropped."""
import json

from etils import epath

from sparse_jax import metric_log


def _steps(path):
  return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def test_append_then_resume_drops_later_and_broken_lines(tmp_path):
  root = epath.Path(tmp_path)
  log = metric_log.MetricLog(root, start_step=0)
  for step in (10, 20, 30):
    log.write(step, {"train/loss": 1.0 / step, "eval/accuracy": 0.5})
  log.write(35, {})  # Nothing logged at this step: no line.
  assert _steps(root / "metrics.jsonl") == [10, 20, 30]
  with (root / "metrics.jsonl").open("a") as f:
    f.write('{"step": 40, "train/lo')  # A kill -9 in the middle of a line.

  resumed = metric_log.MetricLog(root, start_step=20)  # Checkpoint at step 20.
  assert _steps(root / "metrics.jsonl") == [10, 20]
  resumed.write(30, {"train/loss": 0.25})
  records = list(metric_log.read(root / "metrics.jsonl"))
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[-1] == {"step": 30, "train/loss": 0.25}
  assert not (root / "metrics.jsonl.tmp").exists()

  metric_log.MetricLog(root, start_step=0)  # A fresh start keeps nothing.
  assert (root / "metrics.jsonl").read_text() == ""


def test_inactive_log_off_process_zero_writes_nothing(tmp_path):
  log = metric_log.MetricLog(epath.Path(tmp_path), start_step=0, active=False)
  log.write(10, {"train/loss": 1.0})
  assert not (tmp_path / "metrics.jsonl").exists()
