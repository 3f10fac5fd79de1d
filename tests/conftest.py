"""Shared test helpers: run the CLI as a user would, with a tiny config."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")
if REPO not in sys.path:  # Lets tests import configs/*.py as the CLI loads them.
  sys.path.insert(0, REPO)


def cli_env() -> dict[str, str]:
  """The environment of a user shell: repo importable, no simulated devices."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def run_cli(*args: str, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
  """python -m sparse_jax.main ARGS, captured."""
  return subprocess.run([sys.executable, "-m", "sparse_jax.main", *args],
                        capture_output=True, text=True, timeout=timeout,
                        env=env or cli_env(), cwd=REPO)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """One tfds data_dir per test session (the digits set is built there once)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  """One persistent compilation cache per test session."""
  return str(tmp_path_factory.mktemp("xla_cache"))
