"""Bad input: a short error whose last line names the fix, no traceback, exit code 1,
nothing compiled, and the workdir left exactly as it was."""
import os

import numpy as np
import pytest

from conftest import DEFAULT_CONFIG, REPO, assert_clean_error, cli_env, run_cli, snapshot


@pytest.mark.parametrize("extra, phrases", [
    (["--config.nonexistent_key=1"], ["Unknown config key 'nonexistent_key'"]),
    (["--config.model.nope=1"], ["Unknown config key 'nope'"]),
    (["--config.mesh_shape=(2,1,1)"], ["has 2 devices but 1 are present"]),
    (["--config.image_size=15"], ["not a multiple of model.patch_size"]),
    (["--config.sparsity.activation=swish"], ["config.sparsity.activation='swish'"]),
])
def test_bad_config_overrides(tmp_path, extra, phrases):
  workdir = tmp_path / "run"
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", *extra)
  assert_clean_error(proc, *phrases)
  assert not workdir.exists()


def test_unknown_variant(tmp_path):
  proc = run_cli(f"--config={DEFAULT_CONFIG}:bogus", f"--workdir={tmp_path / 'run'}")
  assert_clean_error(proc, "Unknown config argument 'bogus'")


def test_batch_not_divisible_by_eight_devices(tmp_path):
  env = cli_env()
  env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'run'}",
                 "--config.batch_size=12", env=env)
  assert_clean_error(proc, "batch_size=12 is not divisible by the 8 data-parallel")
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={blocker / 'run'}")
  assert_clean_error(proc, "cannot be created")
  proc = run_cli(f"--config={DEFAULT_CONFIG}", "--workdir=/proc/sparse_jax_test/run")
  assert_clean_error(proc, "is not writable")


def test_workdir_of_a_different_config_is_left_alone(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  from configs import default  # pylint: disable=g-import-not-at-top
  from sparse_jax import train  # pylint: disable=g-import-not-at-top
  other = default.get_config("vanilla")
  (workdir / "config.json").write_text(train.config_json(other))
  (workdir / "notes.txt").write_text("keep me")
  before = snapshot(str(workdir))
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}")
  assert_clean_error(proc, "holds a run of a different config",
                      "sparsity.activation: 'relu' there, 'jsrelu' now")
  assert snapshot(str(workdir)) == before


def test_missing_imagenet_manual_dir(tmp_path):
  workdir = tmp_path / "run"
  proc = run_cli(f"--config={os.path.join(REPO, 'configs', 'vit_imagenet.py')}",
                 f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'tfds'}",
                 f"--config.manual_dir={tmp_path / 'no_such_dir'}", "--config.batch_size=8",
                 "--config.eval_batch_size=8")
  assert_clean_error(proc, "ILSVRC2012_img_train.tar")
  assert not workdir.exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, cache_dir):
  workdir = tmp_path / "run"
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}",
                 f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
                 "--config.model.num_layers=1", "--config.batch_size=16",
                 "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
                 "--config.optimizer.schedule=constant", "--config.checkpoint_every=1",
                 "--config.num_steps=20")
  assert_clean_error(proc, "Training diverged at step", "last good checkpoint (step 1)")
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))
  assert checkpoints == ["1"], checkpoints
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / "1" / "state"))
  import jax  # pylint: disable=g-import-not-at-top
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  assert not (workdir / "summary.json").exists()


def test_dry_run_counts_vit_b16(tmp_path):
  proc = run_cli(f"--config={os.path.join(REPO, 'configs', 'vit_imagenet.py')}:vanilla",
                 "--dry_run")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "total parameters: 86,567,656" in proc.stdout
  assert "== mesh ==" in proc.stdout and "block_11/mlp/wi/kernel" in proc.stdout
  assert "learning_rate: 0.003" in proc.stdout


T5_CONFIG = os.path.join(REPO, "configs", "t5_c4.py")


@pytest.mark.parametrize("extra, phrases", [
    # The tiny config's vocabulary has 1,000 pieces + 100 sentinels -> 1,152 rows.
    (["--config.model.vocab_size=1000"], ["--config.model.vocab_size=1152"]),
    (["--config.text.vocabulary_path=/nonexistent/spm.model"], ["/nonexistent/spm.model"]),
    (["--config.text.inputs_length=256"], ["longer than the zeroth bias table",
                                           "--config.model.max_len=256"]),
])
def test_bad_t5_input_fails_before_compiling(tmp_path, data_dir, extra, phrases):
  workdir = tmp_path / "run"
  proc = run_cli(f"--config={T5_CONFIG}:tiny", f"--workdir={workdir}",
                 f"--config.data_dir={data_dir}", *extra)
  assert_clean_error(proc, *phrases)
  assert "Compiled" not in proc.stderr
  assert not (workdir / "checkpoints").exists()


def test_c4_that_is_not_prepared_fails_fast(tmp_path):
  proc = run_cli(f"--config={T5_CONFIG}:base", f"--workdir={tmp_path / 'run'}",
                 f"--config.data_dir={tmp_path / 'empty_tfds'}", timeout=120)
  assert_clean_error(proc, "c4/en")
  assert not (tmp_path / "run" / "checkpoints").exists()
