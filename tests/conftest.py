"""Shared test helpers: run the CLI as a user would, with a tiny config."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")
if REPO not in sys.path:  # Lets tests import configs/*.py as the CLI loads them.
  sys.path.insert(0, REPO)

# XLA's CPU backend optimisations cost more compile time than they save on the tests'
# tiny programs, and compiling is most of the suite's time: tests compile at level 0,
# in-process (set before any test imports JAX) and in the CLIs they start. Comparisons
# are always between programs compiled alike.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def cli_env() -> dict[str, str]:
  """The environment of a user shell: repo importable, no simulated devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = FAST_COMPILE  # No simulated devices; see FAST_COMPILE.
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
