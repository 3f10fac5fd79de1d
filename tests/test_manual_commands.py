"""The manual's shell commands as a new user meets them (issue 31): paths that are one
machine's defaults come with the flag that changes them, numbers name the command and
machine that gave them, and nothing a command writes lands in the checkout unignored."""
import fnmatch
import os
import re
import shlex

from configs import default, t5_c4
from conftest import REPO
from test_readme import fences, manual_files

# Flags whose value is a file or directory a command writes (--workdir: for the
# programs that train into it; generate and the benchmarks only read theirs).
OUTPUT_FLAGS = ("--workdir", "--json")
WRITES_WORKDIR = ("sparse_jax.main", "sparse_jax.study")


def _read(path: str) -> str:
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def _shell_commands(path: str) -> list[str]:
  """The commands of a page's bash blocks, continuation lines joined, comments and
  shell loops' keywords left as they are."""
  commands = []
  for fence in fences(path):
    if fence.lang not in ("bash", "sh", "shell"):
      continue
    text = "\n".join(fence.body).replace("\\\n", " ")
    commands += [line.strip() for line in text.split("\n")
                 if line.strip() and not line.strip().startswith("#")]
  return commands


def _output_paths(command: str) -> list[str]:
  """The values of --workdir / --json in a command (either `--flag value` or
  `--flag=value`)."""
  try:
    words = shlex.split(command, comments=True)
  except ValueError:
    return []
  paths = []
  flags = OUTPUT_FLAGS if any(p in words for p in WRITES_WORKDIR) else ("--json",)
  for i, word in enumerate(words):
    name, eq, value = word.partition("=")
    if name in flags:
      if eq:
        paths.append(value)
      elif i + 1 < len(words):
        paths.append(words[i + 1])
  return paths


def _ignored(relative: str, patterns: list[str]) -> bool:
  """Whether .gitignore's `patterns` cover `relative` (or a directory above it); the
  subset of gitignore's rules this repository's file uses."""
  parts = relative.strip("/").split("/")
  for pattern in patterns:
    anchored = pattern.startswith("/")
    body = pattern.strip("/")
    for depth in range(1, len(parts) + 1):
      prefix = "/".join(parts[:depth])
      candidates = [prefix] if anchored else [prefix, parts[depth - 1]]
      if any(fnmatch.fnmatch(c, body) for c in candidates):
        return True
  return False


def test_relative_output_paths_in_the_manual_are_git_ignored():
  patterns = [line.strip() for line in _read(".gitignore").splitlines()
              if line.strip() and not line.startswith("#")]
  seen = []
  for path in manual_files():
    for command in _shell_commands(path):
      for out in _output_paths(command):
        if out.startswith(("/", "gs://", "$", "~")) or re.search(r"[A-Z]{3}", out):
          continue  # Absolute, in a bucket, or a placeholder (RUN, BUCKET).
        seen.append(out)
        assert _ignored(out, patterns), f"{path}: {command!r} writes {out} into the checkout"
  assert "runs/s_shaped/${v}_seed$seed" in seen  # docs/validation.md's rerun loop.


def test_finetuning_shows_how_to_name_the_source_next_to_the_tmp_defaults():
  page = _read("docs/finetuning.md")
  for source in (default.VANILLA_WORKDIR, t5_c4.TINY_VANILLA_WORKDIR):
    assert f"default `{source}`" in page  # The table says the source is a default.
  commands = _shell_commands("docs/finetuning.md")
  named = [c for c in commands if ":finetune" in c and "--config.finetune.checkpoint="
           in c and "/tmp/" not in c and "gs://" not in c]
  assert named, "no tiny finetune command with --config.finetune.checkpoint= elsewhere"


def test_kernels_page_names_the_benchmark_workdirs_flag():
  page = " ".join(_read("docs/kernels.md").split())
  assert "mlp_sparsity.py [--workdirs DIR ...]" in page
  for name in ("/tmp/sparse_jax/digits_sparsified", "/tmp/sparse_jax/t5_tiny"):
    assert name in page


def test_metrics_step_count_in_readme_is_the_scripts():
  script = _read("benchmarks/metrics_step.py")
  default_repeats = re.search(r'"--repeats", type=int, default=(\d+)', script).group(1)
  for path in ("docs/results.md", "docs/metrics.md"):
    text = " ".join(_read(path).split())
    counts = re.findall(r"metrics_step\.py` \([^)]*?median of (\d+) steps", text)
    assert counts == [default_repeats], (path, counts)


def test_decode_benchmark_command_is_the_tables_and_says_how_long():
  page = " ".join(_read("docs/decoding.md").split())
  (command,) = [c for c in _shell_commands("docs/decoding.md") if "t5_decode.py" in c]
  repeats = re.search(r"--repeats (\d+)", command)
  assert repeats, command
  assert f"(`--repeats {repeats.group(1)}`" in page  # What the table states it used.
  assert re.search(r"takes about \d+ minutes", page)
  assert "--quick" in page


def test_generate_outputs_name_their_machine():
  text = " ".join(_read("docs/decoding.md").split())
  assert "generated on the project's development machine" in text
  assert "other CPU types" in text


def test_readme_install_uses_a_virtual_environment():
  (install,) = [f for f in fences("README.md") if any("pip install -e ." in line
                                                       for line in f.body)]
  body = "\n".join(install.body)
  assert body.index("python -m venv") < body.index("pip install -e .")


def test_two_process_example_is_short_and_says_how_long():
  page = _read("docs/parallelism.md")
  (block,) = [f for f in fences("docs/parallelism.md")
              if any("--num_processes=2" in line for line in f.body)]
  steps = re.search(r"--config\.num_steps=(\d+)", "\n".join(block.body))
  assert steps, "the two-process example runs the default config's full 2,000 steps"
  intro = " ".join(page[:page.index("\n".join(block.body))].split()[-80:])
  assert f"cut to {steps.group(1)} steps, about" in intro and "minutes" in intro
