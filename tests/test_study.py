"""python -m sparse_jax.study end to end (killed and rerun), its printed commands, its
bad input, and the report on hand-made runs (T5 stacks, a grid, theory metrics)."""
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import DEFAULT_CONFIG, REPO, assert_clean_error, cli_env, run_cli, snapshot

# The criterion: 2 variants x 2 seeds of configs/default.py at 100 steps.
STUDY = ["--variants=sparsified,vanilla", "--seeds=0,1", "--config.num_steps=100",
         "--config.log_every=25", "--config.eval_every=50", "--config.checkpoint_every=50"]


def _study(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "sparse_jax.study", *args],
                        capture_output=True, text=True, timeout=timeout, env=cli_env(),
                        cwd=REPO)


def _summaries(study_dir):
  out = {}
  for path in glob.glob(os.path.join(study_dir, "runs", "*", "*", "seed_*", "summary.json")):
    s = json.load(open(path))
    out.setdefault(s["config"]["variant"], []).append(s)
  return out


def test_study_killed_rerun_report_and_printed_commands(tmp_path, data_dir, cache_dir):
  study_dir = str(tmp_path / "study")
  args = [f"--config={DEFAULT_CONFIG}", f"--workdir={study_dir}", *STUDY,
          f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}"]
  proc = subprocess.Popen([sys.executable, "-m", "sparse_jax.study", *args], env=cli_env(),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  # Kill -9 once the second run has its first checkpoint: mid-run, mid-study.
  second = os.path.join(study_dir, "runs", "base", "sparsified", "seed_1")
  deadline = time.time() + 500
  while (not os.path.isdir(os.path.join(second, "checkpoints", "50"))
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  output = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, output[-3000:]
  assert "run 2/4 base sparsified seed 1" in output
  assert not os.path.exists(os.path.join(study_dir, "report"))
  finished_before = sum(len(v) for v in _summaries(study_dir).values())
  assert finished_before < 4

  rerun = _study(*args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "run 1/4 base sparsified seed 0 (finished earlier)" in rerun.stderr
  assert "run 4/4 base vanilla seed 1" in rerun.stderr and "study ETA" in rerun.stderr
  report_dir = os.path.join(study_dir, "report")
  assert rerun.stdout.strip() == os.path.join(report_dir, "report.md")
  assert os.path.exists(os.path.join(report_dir, "report.md"))
  assert os.path.exists(os.path.join(report_dir, "report.html"))
  assert len(glob.glob(os.path.join(report_dir, "*.png"))) >= 3
  spec = json.load(open(os.path.join(study_dir, "study.json")))
  assert spec["variants"] == ["sparsified", "vanilla"] and spec["seeds"] == [0, 1]

  # The report's numbers are the runs' summary.json numbers.
  report = json.load(open(os.path.join(report_dir, "summary.json")))
  runs = _summaries(study_dir)
  assert sorted(runs) == ["sparsified", "vanilla"]
  for variant, summaries in runs.items():
    entry = report["points"]["base"]["variants"][variant]
    assert entry["n"] == 2 and entry["seeds"] == [0, 1]
    for key in ("eval/accuracy", "eval/loss", "eval/activation_density/mean",
                "wall_time_s"):
      values = [s[key] for s in sorted(summaries, key=lambda s: s["config"]["seed"])]
      assert entry["metrics"][key]["values"] == values
      assert entry["metrics"][key]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
      assert entry["metrics"][key]["sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    # The last logging step's theory metrics: the same numbers, and in the markdown.
    for key in ("train/flatness_density/mean", "train/spectral_ratio/mean",
                "train/augmented_flatness_key/mean"):
      values = [s[key] for s in sorted(summaries, key=lambda s: s["config"]["seed"])]
      assert entry["train_metrics"][key]["mean"] == pytest.approx(np.mean(values))
      assert f"{np.mean(values):.4g}" in open(os.path.join(report_dir, "report.md")).read()
  comparisons = report["points"]["base"]["comparisons"]
  assert [c["metric"] for c in comparisons] == ["eval/activation_density/mean",
                                                "eval/live_unit_density/mean"]
  comparison = comparisons[0]
  ratios = {c["metric"]: c for c in report["points"]["base"]["train_comparisons"]}
  assert ratios["train/spectral_ratio/mean"]["ratio"] == pytest.approx(np.exp(
      np.mean(np.log([s["train/spectral_ratio/mean"] for s in runs["sparsified"]]))
      - np.mean(np.log([s["train/spectral_ratio/mean"] for s in runs["vanilla"]]))))
  assert comparison["n"] == [2, 2] and comparison["ci_low"] < comparison["ratio"]
  markdown = open(os.path.join(report_dir, "report.md")).read()
  assert comparison["verdict"][1:] in markdown
  assert f"{report['wall_time_s']['total']:.0f} s in all" in markdown

  # Every run: one metrics.jsonl line per logged/evaluated step, none twice.
  for path in glob.glob(os.path.join(study_dir, "runs", "base", "*", "seed_*")):
    lines = [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [25, 50, 75, 100], path
    assert ["eval/accuracy" in l for l in lines] == [False, True, False, True]

  # The printed command of a run builds the config the study ran: main accepts the
  # finished workdir (it refuses one holding a different config) without retraining.
  printed = _study(*args, "--print_commands")
  assert printed.returncode == 0, printed.stderr[-2000:]
  lines = printed.stdout.strip().splitlines()
  assert len(lines) == 5 and lines[-1].startswith("# then: python -m sparse_jax.report")
  command = shlex.split(lines[2])  # vanilla seed 0
  assert command[:3] == ["python", "-m", "sparse_jax.main"]
  assert f"--workdir={study_dir}/runs/base/vanilla/seed_0" in command
  assert command[-1] == f"--compilation_cache_dir={cache_dir}"  # Given to the study.
  main = run_cli(*command[3:])
  assert main.returncode == 0, main.stderr[-2000:]
  assert "already finished at step 100" in main.stderr


@pytest.mark.parametrize("extra, phrases", [
    (["--variants=sparsified,bogus"], ["Unknown variant 'bogus' in --variants"]),
    (["--seeds="], ["--seeds is empty"]),
    (["--seeds=0,one"], ["not an integer"]),
    (["--grid=model.nope=1,2"], ["--grid key 'model.nope' is not a key of the config"]),
    (["--grid=model.mlp_dim="], ["--grid=model.mlp_dim= has no values"]),
    (["--config.nonexistent_key=1"], ["Unknown config key 'nonexistent_key'"]),
    (["--config.sparsity.activation=swish"], ["config.sparsity.activation='swish'"]),
])
def test_bad_input_fails_before_writing(tmp_path, extra, phrases):
  study_dir = tmp_path / "study"
  proc = _study(f"--config={DEFAULT_CONFIG}", f"--workdir={study_dir}", *extra)
  assert_clean_error(proc, *phrases)
  assert proc.stderr.strip().splitlines()[-2].startswith("sparse_jax: error: ")
  assert not study_dir.exists()


def test_config_naming_a_variant_and_another_study_are_refused(tmp_path):
  study_dir = tmp_path / "study"
  proc = _study(f"--config={DEFAULT_CONFIG}:vanilla", f"--workdir={study_dir}")
  assert proc.returncode == 1 and "already names the variant 'vanilla'" in proc.stderr
  assert not study_dir.exists()

  study_dir.mkdir()
  (study_dir / "study.json").write_text(json.dumps({
      "config": DEFAULT_CONFIG, "config_path": DEFAULT_CONFIG, "config_args": "",
      "variants": ["sparsified"], "seeds": [0], "grid": {}, "overrides": []}))
  before = snapshot(study_dir)
  proc = _study(f"--config={DEFAULT_CONFIG}", f"--workdir={study_dir}",
                "--variants=sparsified,vanilla")
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "describes a different study (variants: ['sparsified'] there" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("Fix: use a new --workdir")
  assert snapshot(study_dir) == before

  (study_dir / "study.json").write_text('{"config": ')  # Damaged: named, left alone.
  before = snapshot(study_dir)
  proc = _study(f"--config={DEFAULT_CONFIG}", f"--workdir={study_dir}")
  assert_clean_error(proc, "study.json is damaged: it is not valid JSON")
  assert snapshot(study_dir) == before


def test_print_commands_with_a_grid(tmp_path):
  study_dir = tmp_path / "study"
  proc = _study(f"--config={REPO}/configs/t5_c4.py:tiny", f"--workdir={study_dir}",
                "--variants=vanilla,sparsified", "--seeds=3", "--grid=model.d_ff=128,256",
                "--config.num_steps=70", "--print_commands")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()[:-1]
  assert len(lines) == 4
  first = shlex.split(lines[0])
  assert first == ["python", "-m", "sparse_jax.main",
                   f"--config={REPO}/configs/t5_c4.py:tiny,vanilla",
                   "--config.num_steps=70", "--config.seed=3", "--config.model.d_ff=128",
                   f"--workdir={study_dir}/runs/model.d_ff=128/vanilla/seed_3"]
  assert lines[3].endswith(f"{study_dir}/runs/model.d_ff=256/sparsified/seed_3")
  assert not study_dir.exists()

  from sparse_jax import study  # pylint: disable=import-outside-toplevel
  config = study.load_config(first[3:-1])
  assert (config.model.d_ff, config.seed, config.num_steps, config.variant) == (
      128, 3, 70, "vanilla")
  assert config.sparsity.activation == "relu" and config.model.d_model == 64


# ----------------------------------------------------------------------------- report
def _fake_run(root, point, variant, seed, d_ff, density, ce):
  """A finished T5 run's files, as train_and_evaluate writes them."""
  path = root / point / variant / f"seed_{seed}"
  path.mkdir(parents=True)
  config = {"seed": seed, "variant": variant, "num_steps": 20, "data_dir": f"/d{seed}",
            "model": {"name": "t5", "d_ff": d_ff},
            "sparsity": {"activation": "relu" if variant == "vanilla" else "jsrelu"}}
  (path / "config.json").write_text(json.dumps(config))
  layers = {}
  for stack, offset in (("encoder", 0.0), ("decoder", -0.05)):
    for i in range(2):
      layers[f"activation_density/{stack}/layer_{i}"] = density + offset + 0.01 * i
    layers[f"activation_density/{stack}/mean"] = density + offset + 0.005
  layers["activation_density/mean"] = density - 0.02
  lines = []
  for step in (10, 20):
    line = {"step": step, **{f"train/{k}": v + 0.1 / step for k, v in layers.items()},
            "train/gradient_sparsity_1e-06/mean": 0.5, "train/spectral_ratio/mean": 3.0,
            "train/flatness_density/mean": 0.4}
    if step == 20:
      line.update({f"eval/{k}": v for k, v in layers.items()})
      line.update({"eval/loss": ce, "eval/accuracy": 0.3})
    lines.append(json.dumps(line))
  (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  summary = {"step": 20, "wall_time_s": 10.0 + seed, "eval/loss": ce, "eval/accuracy": 0.3,
             **{f"eval/{k}": v for k, v in layers.items()}, "config": config}
  (path / "summary.json").write_text(json.dumps(summary))
  return summary


def test_report_on_t5_runs_with_a_grid(tmp_path):
  from sparse_jax import stats  # pylint: disable=import-outside-toplevel
  root = tmp_path / "runs"
  expected = {}
  for d_ff in (128, 256):
    for variant, density in (("sparsified", 0.30), ("vanilla", 0.36)):
      for seed in (0, 1, 2):
        s = _fake_run(root, f"model.d_ff={d_ff}", variant, seed, d_ff,
                      density + 0.01 * seed - d_ff / 10_000, 3.0 + 0.1 * seed)
        expected.setdefault((f"model.d_ff={d_ff}", variant), []).append(s)
  unfinished = root / "x" / "vanilla" / "seed_9"
  unfinished.mkdir(parents=True)
  (unfinished / "config.json").write_text(json.dumps(
      {"seed": 9, "variant": "vanilla", "num_steps": 20,
       "model": {"name": "t5", "d_ff": 128}}))
  out = tmp_path / "report"
  proc = subprocess.run([sys.executable, "-m", "sparse_jax.report", str(root), "--out",
                         str(out)], capture_output=True, text=True, env=cli_env(),
                        cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary["points"]) == ["model.d_ff=128", "model.d_ff=256"]
  assert summary["unfinished"] == [str(unfinished)]
  for (point, variant), runs in expected.items():
    entry = summary["points"][point]["variants"][variant]
    assert entry["seeds"] == [0, 1, 2]
    for key in ("eval/loss", "eval/activation_density/mean",
                "eval/activation_density/encoder/mean", "eval/activation_density/decoder/mean"):
      values = [r[key] for r in runs]
      assert entry["metrics"][key]["mean"] == pytest.approx(np.mean(values))
      assert entry["metrics"][key]["sd"] == pytest.approx(np.std(values, ddof=1))
  comparisons = summary["points"]["model.d_ff=128"]["comparisons"]
  assert [c["metric"] for c in comparisons] == [
      "eval/activation_density/mean", "eval/activation_density/encoder/mean",
      "eval/activation_density/decoder/mean"]
  num = [r["eval/activation_density/decoder/mean"]
         for r in expected[("model.d_ff=128", "sparsified")]]
  den = [r["eval/activation_density/decoder/mean"]
         for r in expected[("model.d_ff=128", "vanilla")]]
  ci = stats.welch_ratio_ci(num, den)
  assert (comparisons[2]["ratio"], comparisons[2]["ci_low"], comparisons[2]["ci_high"]) == (
      pytest.approx(ci.ratio), pytest.approx(ci.low), pytest.approx(ci.high))
  assert comparisons[2]["verdict"].startswith(
      "sparsified eval density (decoder) is lower by")
  markdown = (out / "report.md").read_text()
  assert "eval loss (token CE)" in markdown and "eval density (decoder)" in markdown
  assert "Welch-t" in markdown and "110.0 s in all" not in markdown
  figures = set(summary["figures"])
  for name in ("activation_density", "gradient_sparsity", "theory"):
    for point in ("model.d_ff=128", "model.d_ff=256"):
      assert f"{name}_{point}.png" in figures
  assert {"density_vs_loss.png", "layer_density.png", "scale.png"} <= figures
  assert all((out / f).exists() for f in figures)
  assert (out / "report.html").read_text().count("<img") == len(figures)
