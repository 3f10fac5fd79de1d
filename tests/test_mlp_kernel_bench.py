"""benchmarks/mlp_kernel.py: refuses to time interpreted kernels, and its table/JSON
rows are consistent when told to run them anyway (tiny size)."""
import importlib.util
import json
import os

import pytest

from conftest import REPO


def load_benchmark():
  path = os.path.join(REPO, "benchmarks", "mlp_kernel.py")
  spec = importlib.util.spec_from_file_location("mlp_kernel_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_refuses_cpu_timing_without_interpret(capsys):
  assert load_benchmark().main(["--sizes", "tiny"]) == 2
  assert "Fix: run on a TPU or GPU" in capsys.readouterr().err


def test_rows_on_interpreted_kernels(tmp_path, capsys):
  out = tmp_path / "rows.json"
  assert load_benchmark().main(["--interpret", "--sizes", "tiny", "--block_shares",
                                "0.5", "--repeats", "1", "--dtype", "float32",
                                "--json", str(out)]) == 0
  (row,) = json.loads(out.read_text())
  assert row["size"] == "tiny" and row["block_share"] == 0.5
  assert row["fwd_speedup"] == pytest.approx(row["xla_fwd_ms"] / row["pallas_fwd_ms"])
  assert row["fwd_bwd_bound"] == pytest.approx(6 / 3.5)
  assert "tiny" in capsys.readouterr().out
