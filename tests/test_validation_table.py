"""benchmarks/validation_table.py groups runs by their configs and prints mean +- sd."""
import json
import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import validation_table  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _run(path, config, **scalars):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  (path / "summary.json").write_text(json.dumps({"config": config, **scalars}))


def test_tables_group_by_config_and_report_mean_sd(tmp_path, capsys):
  shaped = {"sparsity": {"activation": "s_shaped", "s_shaped_shift_x": 1.6,
                         "s_shaped_shift_y": -1.6}, "model": {"name": "vit"}}
  # Directory names say nothing: the configs decide the groups.
  _run(tmp_path / "a" / "x", shaped, step=2000,
       **{"eval/activation_concentration/mean": 0.4, "eval/accuracy": 0.9})
  _run(tmp_path / "a" / "y", shaped, step=2000,
       **{"eval/activation_concentration/mean": 0.6, "eval/accuracy": 0.9})
  _run(tmp_path / "a" / "z", shaped, step=1, **{"train/activation_concentration/mean": 0.3})
  from configs import validation_spectral  # pylint: disable=g-import-not-at-top
  for seed, ratio in enumerate((10.0, 14.0)):
    residual = validation_spectral.get_config("16")
    residual.seed = seed
    _run(tmp_path / "b" / f"r{seed}", residual.to_dict(), step=5,
         **{"train/spectral_ratio/layer_0": ratio, "train/spectral_ratio/mean": ratio,
            "train/gradient_noise_anisotropy/layer_0": 3.0})
  assert validation_table.main(["--s_shaped", str(tmp_path / "a"),
                                "--spectral", str(tmp_path / "b")]) == 0
  out = capsys.readouterr().out
  pm_row = next(line for line in out.splitlines() if line.startswith("| pm |"))
  # Init 0.3 (1 run); trained eval concentration 0.5 +- 0.141 over 2 runs.
  assert "0.300 (1)" in pm_row and "0.500 +- 0.141 (2)" in pm_row
  row = next(line for line in out.splitlines() if line.startswith("| 16 |"))
  # At init (recomputed from each run's config: 2 seeds), then the trained block 0.
  assert row.split(" | ")[1].endswith("(2)") and " | 12.0 +- 2.8 (2) | " in row
  assert "t = 0.1" in out
