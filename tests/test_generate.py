"""python -m sparse_jax.generate on a tiny T5 run trained here for a few steps."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, run_cli

T5_CONFIG = os.path.join(REPO, "configs", "t5_c4.py")
TEXT = "The break statement <extra_id_0> the innermost <extra_id_1> loop."
PLAIN = ("The break statement, like in C, breaks out of the innermost enclosing for or "
         "while loop. Loop statements may have an else clause.")


@pytest.fixture(scope="session")
def tiny_t5_run(tmp_path_factory, data_dir, cache_dir) -> str:
  """configs/t5_c4.py:tiny trained for 8 steps, one checkpoint."""
  workdir = str(tmp_path_factory.mktemp("generate") / "t5_tiny")
  done = run_cli(f"--config={T5_CONFIG}:tiny", f"--workdir={workdir}",
                 f"--config.data_dir={data_dir}", f"--compilation_cache_dir={cache_dir}",
                 "--config.num_steps=8", "--config.optimizer.warmup_steps=2",
                 "--config.checkpoint_every=8",
                 "--config.eval_every=8", "--config.log_every=8",
                 "--config.batch_size=8", "--config.eval_batch_size=16",
                 "--config.text.eval_max_examples=16", "--config.metrics_batch_size=8")
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def run_generate(*args: str) -> subprocess.CompletedProcess:
  env = cli_env()
  env.pop("TF_CPP_MIN_LOG_LEVEL")  # As a user's shell: TensorFlow's chatter is filtered.
  return subprocess.run([sys.executable, "-m", "sparse_jax.generate", *args],
                        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def _density(output: str) -> float:
  match = re.search(r"decoder activation density over (\d+) generated tokens: "
                    r"([0-9.]+)", output)
  assert match, output
  assert 1 <= int(match.group(1)) <= 14  # At most the run's targets_length.
  return float(match.group(2))


def test_generate_fills_sentinels_and_mlp_decode_gives_the_same_text(tiny_t5_run,
                                                                     cache_dir):
  from sparse_jax import generate  # pylint: disable=g-import-not-at-top
  done = run_generate(f"--workdir={tiny_t5_run}", f"--text={TEXT}",
                      f"--compilation_cache_dir={cache_dir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "I0000" not in done.stderr and "oneDNN" not in done.stderr, done.stderr[-2000:]
  lines = dict(line.split(":", 1) for line in done.stdout.strip().splitlines())
  assert "(step 8," in lines["run"]
  assert "<extra_id_0>" in lines["input"] and "<extra_id_1>" in lines["input"]
  assert lines["output"].strip().startswith("<extra_id_")  # T5's target format.
  assert "[" in lines["filled"] and "innermost" in lines["filled"]
  assert 0 < _density(done.stdout) <= 1
  # In-process, mlp_decode MLPs: the same text, tokens and density.
  sparse = generate.generate_text(tiny_t5_run, TEXT, mlp="sparse")
  assert sparse.replace("decoder MLPs: mlp_decode", "decoder MLPs: dense") == \
      done.stdout.strip()


def test_generate_corrupt_shows_the_truth(tiny_t5_run):
  from sparse_jax import generate  # pylint: disable=g-import-not-at-top
  out = generate.generate_text(tiny_t5_run, PLAIN, corrupt=True, seed=3)
  lines = dict(line.split(":", 1) for line in out.splitlines())
  assert "<extra_id_0>" in lines["input"] and lines["truth"].strip().startswith(
      "<extra_id_0>")
  # The truth filled back in is the text (SentencePiece normalises spaces only).
  assert re.sub(r"[\s\[\]]", "", lines["truth filled"]) == re.sub(r"\s", "", PLAIN)
  assert 0 < _density(out) <= 1


def _two_lines(message: str, *phrases: str) -> None:
  lines = message.strip().splitlines()
  assert len(lines) == 2 and lines[1].startswith("Fix:"), lines
  for phrase in phrases:
    assert phrase in message, (phrase, message)


def test_generate_errors(tiny_t5_run, tmp_path):
  from sparse_jax import generate, train  # pylint: disable=g-import-not-at-top
  from sparse_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from configs import default, t5_c4  # pylint: disable=g-import-not-at-top
  # As a user meets it: two lines on stderr, exit 1, no traceback.
  done = run_generate(f"--workdir={tmp_path / 'nowhere'}", f"--text={TEXT}")
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
  _two_lines(done.stderr.replace("sparse_jax: error: ", ""), "does not exist")

  vit = tmp_path / "vit"
  vit.mkdir()
  (vit / "config.json").write_text(train.config_json(default.get_config()))
  with pytest.raises(ConfigError) as e:
    generate.generate_text(str(vit), TEXT)
  _two_lines(str(e.value), "is a 'vit' run")

  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text(train.config_json(t5_c4.get_config("tiny")))
  with pytest.raises(ConfigError) as e:
    generate.generate_text(str(untrained), TEXT)
  _two_lines(str(e.value), "has no checkpoints yet")

  with pytest.raises(ConfigError) as e:  # 64 encoder tokens at most.
    generate.generate_text(tiny_t5_run, " ".join([PLAIN] * 4) + " <extra_id_0>.")
  _two_lines(str(e.value), "this run's encoder takes at most 64")
  with pytest.raises(ConfigError) as e:
    generate.generate_text(tiny_t5_run, PLAIN)
  _two_lines(str(e.value), "no <extra_id_N> sentinels")
  assert not (untrained / "checkpoints").exists()  # The check created nothing.
