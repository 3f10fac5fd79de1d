"""benchmarks/metrics_step.py runs and its rows are consistent (one repeat, ViT only)."""
import importlib.util
import json
import os

from conftest import REPO


def test_rows(tmp_path, capsys):
  path = os.path.join(REPO, "benchmarks", "metrics_step.py")
  spec = importlib.util.spec_from_file_location("metrics_step_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "rows.json"
  module.main(["--repeats", "2", "--models", "vit", "--json", str(out)])
  (row,) = json.loads(out.read_text())
  assert row["config"].startswith("vit")
  assert all(row[k] > 0 for k in ("plain_ms", "metrics_ms", "metrics+theory_ms"))
  assert row["theory_extra_ms"] == row["metrics+theory_ms"] - row["metrics_ms"]
  table = capsys.readouterr().out
  assert "| vit (configs/default.py) |" in table and "theory metrics cost" in table
