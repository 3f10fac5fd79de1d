"""Shared test helpers: run the CLI as a user would, with a tiny config."""
import hashlib
import os
import subprocess
import sys

import pytest

# Before any test imports JAX: with libtpu installed (the test extra) and no TPU here,
# sparse_jax keeps JAX on the CPU and libtpu quiet (sparse_jax/host.py).
import sparse_jax  # pylint: disable=unused-import

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


def snapshot(path) -> dict[str, str] | None:
  """{relative path: sha256} of every file under `path` (None if it does not exist):
  equal snapshots mean the directory is byte for byte as it was."""
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_same_params(expected, actual) -> None:
  """Two param trees hold the same paths with bitwise-equal arrays."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  a = traverse_util.flatten_dict(jax.device_get(expected))
  b = traverse_util.flatten_dict(jax.device_get(actual))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(map(str, path)))


def assert_clean_error(proc: subprocess.CompletedProcess, *phrases: str) -> None:
  """The CLI stopped on bad input as promised: exit code 1, no traceback, a last line
  starting 'Fix:', and each phrase in its stderr."""
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("Fix:"), lines[-3:]
  for phrase in phrases:
    assert phrase in proc.stderr, (phrase, proc.stderr[-1000:])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """One tfds data_dir per test session (the digits set is built there once)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  """One persistent compilation cache per test session."""
  return str(tmp_path_factory.mktemp("xla_cache"))
