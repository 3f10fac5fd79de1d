"""benchmarks/t5_decode.py --quick: its rows and their arithmetic (not the speed)."""
import json
import os
import sys

import pytest

from conftest import REPO
from test_generate import tiny_t5_run  # noqa: F401  pylint: disable=unused-import

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import t5_decode  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_mlp_weight_share_of_t5_base_from_its_shapes():
  from sparse_jax.models.t5 import T5Config  # pylint: disable=g-import-not-at-top
  cfg = T5Config()
  mlp = 12 * 2 * 768 * 3072
  attention = 12 * 6 * 768 * 768  # Self q/k/v/o and cross q/o per layer.
  assert t5_decode.mlp_weight_share(cfg) == pytest.approx(
      mlp / (32128 * 768 + attention + mlp))
  assert t5_decode.bound(0.5, 0.0) == pytest.approx(1 / 0.75)
  assert t5_decode.bound(0.5, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("with_tiny", [
    False, pytest.param(True, marks=pytest.mark.slow)], ids=["random", "with_tiny"])
def test_quick_run_writes_consistent_rows(with_tiny, request, tmp_path, capsys):
  out = tmp_path / "rows.json"
  extra = ([f"--workdir={request.getfixturevalue('tiny_t5_run')}"] if with_tiny
           else ["--skip_tiny"])
  # In-process (--threads=all leaves this process's cores and XLA flags alone).
  t5_decode.main(["--quick", "--threads=all", "--batches=2", "--densities=0.1", *extra,
                  f"--json={out}"])
  printed = capsys.readouterr().out
  rows = json.loads(out.read_text())["rows"]
  assert [(r["model"], r["batch"]) for r in rows] == [("t5_quick_random", 2)] + (
      [("t5_tiny_trained", 2)] if with_tiny else [])
  # The density the random model was set to, as measured while decoding (the batch's
  # union: every token has the same units active).
  assert rows[0]["density"] == pytest.approx(0.1, abs=1 / 512)
  assert rows[0]["token_density"] == pytest.approx(rows[0]["density"], abs=1e-6)
  for row in rows:
    assert set(t5_decode.ROW_KEYS) <= set(row)
    assert row["same_tokens"], row  # mlp_decode decodes the same tokens.
    assert row["speedup"] == pytest.approx(row["sparse_tokens_per_s"]
                                           / row["dense_tokens_per_s"])
    assert row["bound"] == pytest.approx(
        1 / (1 - row["mlp_weight_share"]
             + row["mlp_weight_share"] * (1 + row["density"]) / 2))
    assert row["fraction_of_bound"] == pytest.approx(row["speedup"] / row["bound"])
    assert len(row["dense_ms"]) == len(row["sparse_ms"]) == 2
    assert 0 < row["density"] < 1
  assert "speedup" in printed and "t5_quick_random" in printed


def test_profile_times_each_part_of_a_step(tmp_path):
  out = tmp_path / "profile.json"
  t5_decode.main(["--quick", "--profile", "--threads=all", "--densities=0.1",
                  f"--json={out}"])
  parts = json.loads(out.read_text())["profile_ms"]
  assert set(parts) == {"logits", "attention_projections", "mlps_dense",
                        "mlps_mlp_decode_p0.1"}
  assert all(ms > 0 for ms in parts.values())
