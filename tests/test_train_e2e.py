"""The default config end to end through the CLI: train, kill -9, resume, rerun."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import DEFAULT_CONFIG, REPO, cli_env, run_cli

# The default config at a tiny size: same code path, seconds instead of minutes.
TINY = ["--config.num_steps=40", "--config.log_every=10", "--config.eval_every=20",
        "--config.checkpoint_every=10", "--config.keep_checkpoints=10",
        "--config.model.num_layers=2", "--config.batch_size=32",
        "--config.optimizer.warmup_steps=5"]


THEORY_METRICS = ("derivative_square", "effective_gradient_l1", "effective_gradient_l2",
                  "activation_gradient_norm", "augmented_flatness_key",
                  "augmented_flatness_value", "flatness_density", "w1_frobenius_sq",
                  "spectral_ratio", "spectral_nonzero_fraction")


def _args(workdir, data_dir, cache_dir, variant=""):
  return [f"--config={DEFAULT_CONFIG}{variant}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}", *TINY]


def _event_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])


def _restore_params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def test_train_kill_resume_and_rerun(tmp_path, data_dir, cache_dir):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "sparse_jax.main", *_args(workdir, data_dir, cache_dir)]
  proc = subprocess.Popen(args, env=cli_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  first_ckpt = os.path.join(workdir, "checkpoints", "10")
  deadline = time.time() + 500
  while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # kill -9 part-way, as a crash or OOM would.
  output = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, output[-3000:]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  resumed = run_cli(*_args(workdir, data_dir, cache_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from checkpoint at step" in resumed.stderr
  assert "step 40/40" in resumed.stderr and "ETA" in resumed.stderr

  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["step"] == 40
  for key in ["num_params", "wall_time_s", "eval/accuracy", "eval/loss",
              "train/activation_density/mean", "eval/activation_density/mean",
              "eval/activation_density/layer_0", "eval/activation_density/layer_1",
              "train/derivative_sparsity/mean", "train/zeroth_bias_abs/mean",
              "train/norm_scale_abs/mean", "train/learning_rate", "config",
              *(f"train/{name}/{part}" for part in ("layer_0", "layer_1", "mean")
                for name in THEORY_METRICS)]:
    assert key in summary, key
  assert summary["config"]["sparsity"]["activation"] == "jsrelu"
  assert 0 < summary["eval/activation_density/mean"] < 1
  assert summary["eval/accuracy"] > 0.15  # Better than chance (0.1) after 40 steps.
  assert summary["train/norm_scale_abs/mean"] >= 1.0

  steps = sorted(int(os.path.basename(p)) for p in
                 glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
  assert steps[-1] == 40 and 10 in steps
  params = _restore_params(workdir, 40)
  for i in range(2):
    gamma = np.asarray(params[f"block_{i}"]["mlp_norm"]["scale"])
    bias = np.asarray(params[f"block_{i}"]["mlp"]["zeroth_bias"])
    assert gamma.min() >= 1.0  # Restricted LayerNorm clamp held.
    assert np.all(np.abs(bias) <= 0.1 * np.abs(gamma) + 1e-6)  # Zeroth-bias box held.

  # metrics.jsonl: one line per logged (every 10) or evaluated (every 20) step, train and
  # eval of a step in one line, no step twice after the kill and resume.
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [10, 20, 30, 40]
  assert all("train/loss" in l and "train/steps_per_sec" in l for l in lines)
  assert ["eval/accuracy" in l for l in lines] == [False, True, False, True]
  assert lines[-1]["eval/accuracy"] == summary["eval/accuracy"]
  assert lines[-1]["train/activation_density/mean"] == summary["train/activation_density/mean"]

  tags = _event_tags(workdir)
  for tag in ["train/loss", "train/accuracy", "train/learning_rate",
              "train/activation_density/layer_0", "train/activation_density/mean",
              "train/zeroth_bias_abs/mean", "train/norm_scale_abs/mean",
              "eval/accuracy", "eval/activation_density/mean",
              *(f"train/{name}/mean" for name in THEORY_METRICS)]:
    assert tag in tags, tag

  # Rerunning a finished workdir does not retrain and leaves the checkpoints alone.
  before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))}
  rerun = run_cli(*_args(workdir, data_dir, cache_dir))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "already finished at step 40" in rerun.stderr
  assert {p: os.path.getmtime(p) for p in before} == before


def test_digits_build_from_a_directory_holding_a_sparse_jax_folder(tmp_path):
  """Workdirs like /tmp/sparse_jax/run put a `sparse_jax` folder in the user's cwd."""
  (tmp_path / "sparse_jax" / "run").mkdir(parents=True)
  env = cli_env()
  env["PYTHONPATH"] = ""  # Import the installed package, as a user's shell does.
  code = ("from sparse_jax import config_schema; from sparse_jax.data import images; "
          "c = config_schema.base_config(); c.data_dir = 'tfds'; "
          "print(images.prepare_dataset(c).num_train_examples)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "1500"
