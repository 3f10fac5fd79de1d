"""Every config key has a valid range (config_schema.RANGES), and a value outside it
stops the CLI before anything is compiled or written: exit code 1, no traceback, a
last line starting 'Fix:', and the workdir byte for byte as it was."""
import importlib
import math
import os

import pytest

from conftest import DEFAULT_CONFIG, REPO, assert_clean_error, run_cli, snapshot
from sparse_jax import config_schema
from sparse_jax.config_schema import RANGES
from sparse_jax.errors import ConfigError

T5_TINY = f"{os.path.join(REPO, 'configs', 't5_c4.py')}:tiny"
RESIDUAL = os.path.join(REPO, "configs", "validation_spectral.py")
CONFIG_FILES = ("default", "t5_c4", "vit_imagenet", "validation_s_shaped",
                "validation_spectral")


def _schemas():
  return {"image": config_schema.base_config(), "text": config_schema.t5_config(),
          "residual": config_schema.residual_mlp_config()}


def _config_file_configs():
  return [importlib.import_module(f"configs.{name}").get_config()
          for name in CONFIG_FILES]


def test_every_key_of_every_schema_and_config_file_has_a_range():
  configs = list(_schemas().values()) + _config_file_configs()
  keys = set()
  for c in configs:
    flat = config_schema.flatten(c.to_dict())
    missing = sorted(set(flat) - set(RANGES))
    assert not missing, f"keys without a valid range in config_schema.RANGES: {missing}"
    keys |= set(flat)
  stale = sorted(set(RANGES) - keys)
  assert not stale, f"RANGES lists keys no config has: {stale}"


def test_defaults_and_config_files_are_in_range():
  for c in list(_schemas().values()) + _config_file_configs():
    config_schema.check_ranges(c)
    config_schema.validate(c)


def test_schema_dataset_lists_match_the_pipelines():
  from sparse_jax.data import sources, text  # pylint: disable=g-import-not-at-top
  assert set(config_schema.IMAGE_DATASETS) == set(sources.DATASETS)
  assert set(config_schema.TEXT_DATASETS) == set(text.DATASETS)


@pytest.mark.parametrize("value, ok", [
    (1, True), (0, False), (True, False), (1.0, False), (None, False)])
def test_integer_range_rejects_bools_floats_and_out_of_range(value, ok):
  assert RANGES["batch_size"].accepts(value) is ok


@pytest.mark.parametrize("value, ok", [
    (3e-3, True), (1, True), (0.0, False), (-0.1, False), (math.nan, False),
    (math.inf, False), ("0.1", False)])
def test_number_range_rejects_nan_inf_and_non_numbers(value, ok):
  assert RANGES["optimizer.learning_rate"].accepts(value) is ok


@pytest.mark.parametrize("value, ok", [
    ((-1, 1, 1), True), ([2, 2, 2], True), ((-1, -1, 1), False), ((0, 1, 1), False),
    ((1, 1), False), (("abc",), False), ((1.0, 1, 1), False), (None, False)])
def test_mesh_shape_range(value, ok):
  assert RANGES["mesh_shape"].accepts(value) is ok


def test_validate_names_key_value_range_and_default():
  c = config_schema.base_config()
  c.optimizer.learning_rate = math.nan
  with pytest.raises(ConfigError) as e:
    config_schema.validate(c)
  lines = str(e.value).splitlines()
  assert lines[0] == ("config.optimizer.learning_rate=nan is not valid: it must be a "
                      "finite number > 0.")
  assert lines[-1] == ("Fix: set it to a finite number > 0, e.g. "
                       "--config.optimizer.learning_rate=0.003 (the schema's default).")


def test_lr_update_every_beyond_the_run_is_refused():
  c = config_schema.base_config()
  c.optimizer.lr_update_every = c.num_steps + 1
  with pytest.raises(ConfigError, match=r"lr_update_every=2001 is not valid(.|\n)*Fix:"):
    config_schema.validate(c)


def test_docs_list_every_valid_range():
  """docs/configs.md shows each key's valid values as the schema states them."""
  with open(os.path.join(REPO, "docs", "configs.md")) as f:
    doc = f.read()
  expected = [f"| `{key}` | {valid.text} |" for key, valid in RANGES.items()]
  missing = [row for row in expected if row not in doc]
  assert not missing, "docs/configs.md lacks these rows:\n" + "\n".join(missing)


# ------------------------------------------------------------------- through the CLI
def _assert_stopped_cleanly(proc, *phrases):
  assert_clean_error(proc, *phrases)
  assert "Compiled" not in proc.stderr


def _existing_workdir(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("a file of the user's, to be left alone\n")
  return workdir


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(map(str, value)) + ")"
  return str(value)


def _config_with(key):
  """The config file whose config has `key` (image keys from the default config)."""
  for path, schema in ((DEFAULT_CONFIG, "image"), (T5_TINY, "text"),
                       (RESIDUAL, "residual")):
    if key in config_schema.flatten(_schemas()[schema].to_dict()):
      return path
  raise AssertionError(key)


CHECKED = sorted(k for k, v in RANGES.items() if v.counterexample is not None)


def test_only_flag_typed_keys_lack_a_counterexample():
  # A bool flag or a free string cannot be nonsense past ml_collections' type check.
  unchecked = {k: v.text for k, v in RANGES.items() if v.counterexample is None}
  assert set(unchecked.values()) <= {"True or False", "a string"}, unchecked


@pytest.mark.parametrize("key", CHECKED)
def test_each_range_check_stops_the_cli(tmp_path, key):
  workdir = _existing_workdir(tmp_path)
  before = snapshot(workdir)
  value = _flag_value(RANGES[key].counterexample)
  proc = run_cli(f"--config={_config_with(key)}", f"--workdir={workdir}",
                 f"--config.{key}={value}", timeout=120)
  _assert_stopped_cleanly(proc, f"config.{key}=", "is not valid")
  assert snapshot(workdir) == before


@pytest.mark.parametrize("extra, phrase", [
    ("--config.mesh_shape=abc", "config.mesh_shape=('abc',) is not valid"),
    ("--config.model.num_layers=0", "config.model.num_layers=0 is not valid"),
    ("--config.sparsity.zeroth_bias_clipping=-0.1",
     "config.sparsity.zeroth_bias_clipping=-0.1 is not valid"),
    ("--config.optimizer.weight_decay=-1", "config.optimizer.weight_decay=-1.0 is not"),
    ("--config.optimizer.learning_rate=-0.1", "config.optimizer.learning_rate=-0.1 is"),
    ("--config.optimizer.learning_rate=nan", "config.optimizer.learning_rate=nan is"),
    ("--config.data_dir=/proc/sparse_jax_test/tfds", "config.data_dir "
     "/proc/sparse_jax_test/tfds is not writable"),
    (f"--config.data_dir={__file__}/tfds", "cannot be created"),
])
@pytest.mark.parametrize("fresh", [True, False])
def test_bad_input_of_the_issue_stops_before_writing(tmp_path, extra, phrase, fresh):
  workdir = tmp_path / "new_run" if fresh else _existing_workdir(tmp_path)
  before = snapshot(workdir)
  proc = run_cli(f"--config={DEFAULT_CONFIG}", f"--workdir={workdir}", extra,
                 timeout=120)
  _assert_stopped_cleanly(proc, phrase)
  assert snapshot(workdir) == before
