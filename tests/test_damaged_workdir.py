"""Damaged files in a workdir: a clear error naming the file and what to do, never a
traceback, never a silent restore of damaged data, and nothing in the workdir changed."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from conftest import DEFAULT_CONFIG, cli_env, run_cli, snapshot
from test_config_ranges import _assert_stopped_cleanly
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import metric_log, run_files
from sparse_jax.errors import ConfigError

TRAIN = ("--config.model.num_layers=1", "--config.batch_size=16", "--config.num_steps=2",
         "--config.optimizer.warmup_steps=0", "--config.log_every=1",
         "--config.eval_every=2", "--config.checkpoint_every=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir, cache_dir):
  """A finished two-step run (checkpoints 1 and 2, metrics, summary) and its stderr."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  env = cli_env()
  env.pop("TF_CPP_MIN_LOG_LEVEL")  # As a user's shell: the chatter test needs that.
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}",
                 f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
                 *TRAIN, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stderr


def _rerun(workdir, data_dir, cache_dir):
  return run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}",
                 f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
                 *TRAIN)


def _copy(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  return workdir


def test_cli_output_has_no_tensorflow_start_up_chatter(finished_run):
  _, stderr = finished_run
  assert "oneDNN" not in stderr and "InitializeLog" not in stderr, stderr[:1000]
  assert not any(line.startswith("I0000") for line in stderr.splitlines()), stderr[:1000]
  assert "[sparse_jax " in stderr


@pytest.mark.parametrize("name, damage, phrase", [
    ("config.json", "{\"seed\": 0,", "config.json is damaged: it is not valid JSON"),
    ("config.json", "[1, 2]", "config.json is damaged: it holds a JSON list"),
    ("summary.json", "\0\0\0", "summary.json is damaged"),
    ("before_finetuning.json", "{", "before_finetuning.json is damaged"),
])
def test_damaged_json_files_stop_the_run(finished_run, tmp_path, data_dir, cache_dir,
                                         name, damage, phrase):
  workdir = _copy(finished_run, tmp_path)
  (workdir / name).write_text(damage)
  before = snapshot(workdir)
  proc = _rerun(workdir, data_dir, cache_dir)
  _assert_stopped_cleanly(proc, phrase, "Nothing was changed.")
  assert snapshot(workdir) == before


def test_damaged_metrics_line_stops_the_run_and_is_not_dropped(
    finished_run, tmp_path, data_dir, cache_dir):
  workdir = _copy(finished_run, tmp_path)
  (workdir / "summary.json").unlink()  # Unfinished: a rerun would resume and rewrite.
  path = workdir / metric_log.FILE
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(["{\"step\": 1, \"train/lo\x00\n"] + lines[1:]))
  before = snapshot(workdir)
  proc = _rerun(workdir, data_dir, cache_dir)
  _assert_stopped_cleanly(proc, "metrics.jsonl is damaged: line 1 is not a record",
                          "repair or delete that line")
  assert snapshot(workdir) == before


def test_flipped_checkpoint_byte_is_caught_not_restored(finished_run, tmp_path, data_dir,
                                                        cache_dir):
  workdir = _copy(finished_run, tmp_path)
  (workdir / "summary.json").unlink()  # So the rerun restores checkpoint 2.
  _flip_a_byte(workdir / "checkpoints" / "2")
  before = snapshot(workdir)
  proc = _rerun(workdir, data_dir, cache_dir)
  _assert_stopped_cleanly(proc, f"Checkpoint {workdir}/checkpoints/2 is damaged",
                          "fail their checksums", "resumes from step 1")
  assert snapshot(workdir) == before
  # The Fix line works: with the damaged step moved aside the run resumes from step 1.
  (workdir / "checkpoints" / "2").rename(workdir / "damaged_checkpoint_2")
  proc = _rerun(workdir, data_dir, cache_dir)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Resuming from checkpoint at step 1" in proc.stderr
  assert (workdir / "summary.json").exists()


def test_unreadable_checkpoint_is_named(finished_run, tmp_path, data_dir, cache_dir):
  workdir = _copy(finished_run, tmp_path)
  (workdir / "summary.json").unlink()
  state = workdir / "checkpoints" / "2" / "state"
  for f in state.rglob("manifest.ocdbt"):
    f.write_bytes(b"not a manifest")
  before = snapshot(workdir)
  proc = _rerun(workdir, data_dir, cache_dir)
  _assert_stopped_cleanly(proc, f"Checkpoint {workdir}/checkpoints/2 is damaged",
                          "orbax cannot read it")
  assert snapshot(workdir) == before


def _flip_a_byte(step_dir, largest_only=True):
  """Flips one bit in the middle of the largest array data file of a checkpoint step
  (the default ViT's: raw float32 bytes), or of each one (orbax may keep more than one
  copy of small, compressed arrays; which is read is its business)."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  if largest_only:
    files = [max(files, key=lambda p: p.stat().st_size)]
  for path in files:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ the parts, in-process
def test_checkpoint_checksums_round_trip_and_catch_a_flip(tmp_path):
  state = {"w": jnp.arange(300, dtype=jnp.float32).reshape(30, 10),
           "h": jnp.ones((7,), jnp.bfloat16), "step": jnp.int32(5),
           "key": jax.random.key(0)}
  saver = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
  saver.save(1, state)
  saver.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  loader = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
  restored, _ = loader.restore(abstract, 1)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _flip_a_byte(tmp_path / "checkpoints" / "1", largest_only=False)
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="checkpoints/1 is damaged"):
    loader.restore(abstract, 1)
  loader.close()


def test_checksums_see_moved_values():
  a = {"w": jnp.array([1.0, 2.0, 3.0])}
  b = {"w": jnp.array([3.0, 2.0, 1.0])}  # Same sum of words, other positions.
  sums_a, sums_b = ckpt_lib.state_checksums(a), ckpt_lib.state_checksums(b)
  assert sums_a[0][0] == sums_b[0][0] and sums_a[0][1] != sums_b[0][1]


def test_metric_log_skips_only_a_last_line_cut_short(tmp_path):
  path = epath.Path(tmp_path) / metric_log.FILE
  path.write_text('{"step": 1, "a": 1.0}\n\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
  assert [r["step"] for r in metric_log.read(path)] == [1, 2]
  path.write_text('{"step": 1, "a": 1.0}\ngarbage\n{"step": 3, "a": 3.0}\n')
  with pytest.raises(metric_log.DamagedLineError, match="line 2"):
    list(metric_log.read(path))
  with pytest.raises(metric_log.DamagedLineError):
    metric_log.MetricLog(path.parent, start_step=3)
  assert path.read_text().count("\n") == 3  # Not rewritten.


def test_report_names_a_damaged_file(tmp_path):
  run = epath.Path(tmp_path) / "run"
  run.mkdir()
  (run / run_files.CONFIG_FILE).write_text("{oops")
  from sparse_jax import report  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="config.json is damaged"):
    report.load_runs([str(tmp_path)])
