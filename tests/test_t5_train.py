"""The tiny T5 config end to end through the CLI: train, resume exactly from a checkpoint."""
import json
import os
import shutil

import jax
import numpy as np

from conftest import REPO, run_cli
from test_train_e2e import THEORY_METRICS

T5_CONFIG = os.path.join(REPO, "configs", "t5_c4.py")
# configs/t5_c4.py:tiny at a smaller size: the same code path in seconds.
SMALL = ["--config.num_steps=24", "--config.log_every=8", "--config.eval_every=24",
         "--config.checkpoint_every=8", "--config.keep_checkpoints=5",
         "--config.optimizer.warmup_steps=4", "--config.batch_size=16",
         "--config.eval_batch_size=32", "--config.text.eval_max_examples=64",
         "--config.metrics_batch_size=8"]


def _args(workdir, data_dir, cache_dir, variant="tiny,sparsified"):
  return [f"--config={T5_CONFIG}:{variant}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}", *SMALL]


def _params(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def test_tiny_t5_trains_resumes_exactly_and_reports_per_stack_sparsity(
    tmp_path, data_dir, cache_dir):
  straight = str(tmp_path / "straight")
  done = run_cli(*_args(straight, data_dir, cache_dir))
  assert done.returncode == 0, done.stderr[-3000:]

  # The same run as if it had died after its first checkpoint: a copy of the work
  # directory with only that checkpoint, resumed. (tests/test_train_e2e.py kills a
  # run with SIGKILL; what T5 adds is its text input position, saved in "data".)
  workdir = str(tmp_path / "killed")
  shutil.copytree(straight, workdir)
  for name in os.listdir(os.path.join(workdir, "checkpoints")):
    if name.isdigit() and name != "8":
      shutil.rmtree(os.path.join(workdir, "checkpoints", name))
  os.remove(os.path.join(workdir, "summary.json"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8", "data"))
  resumed = run_cli(*_args(workdir, data_dir, cache_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from checkpoint at step 8" in resumed.stderr
  assert "re-reading the input" not in resumed.stderr

  # Same examples in the same order after the resume: the same parameters.
  a, b = _params(straight, 24), _params(workdir, 24)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

  summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
  assert summary["step"] == 24
  for key in ["eval/loss", "eval/accuracy", "eval/activation_density/mean",
              "eval/activation_density/encoder/mean", "eval/activation_density/decoder/mean",
              "eval/activation_density/encoder/layer_1",
              "eval/activation_density/decoder/layer_1",
              "eval/derivative_sparsity/decoder/mean", "train/activation_density/mean",
              "train/activation_density/encoder/layer_0",
              "train/gradient_sparsity_1e-06/decoder/mean",
              "train/zeroth_bias_abs/encoder/mean", "train/norm_scale_abs/decoder/mean",
              *(f"train/{name}/{part}" for name in THEORY_METRICS
                for part in ("encoder/layer_0", "encoder/mean", "decoder/mean", "mean"))]:
    assert key in summary, key
  assert 0 < summary["eval/activation_density/mean"] < 1
  # Better than uniform over the 1,152-id vocabulary (ln 1152 = 7.05) after 24 steps.
  assert summary["eval/loss"] < 6.5
  assert summary["train/norm_scale_abs/encoder/mean"] >= 1.0  # The clamp held.
  params = _params(workdir, 24)
  for stack in ("encoder", "decoder"):
    gamma = np.asarray(params[stack]["layer_0"]["mlp_norm"]["scale"])
    bias = np.asarray(params[stack]["layer_0"]["mlp"]["zeroth_bias"])
    assert gamma.min() >= 1.0
    assert np.all(np.abs(bias) <= 0.1 * np.abs(gamma) + 1e-6)

