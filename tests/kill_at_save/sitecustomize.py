"""Test helper: with SPARSE_JAX_KILL_AT_SAVE=STEP in the environment, a sparse_jax
worker that has this directory on PYTHONPATH dies in the middle of saving checkpoint
STEP, as a host that fails then would: its supervisor (its parent) and then itself are
sent SIGKILL once its own part of the step is written and it waits at orbax's
"async_write_complete" barrier for the other processes, so the step is never
finalized; first it writes a line to the file SPARSE_JAX_KILL_AT_SAVE_MARK names.
Without the variable it does nothing.

tests/test_multihost_stop.py uses it: a kill timed from outside could land before the
save began or after it was complete. The patch is applied when orbax's multihost
module is imported (not here: importing orbax would import JAX before sparse_jax sets
it up), on the function through which orbax reaches JAX's coordination client.
"""
import importlib.abc
import importlib.util
import os
import re
import signal
import sys

_STEP = os.environ.get("SPARSE_JAX_KILL_AT_SAVE")
_MODULE = "orbax.checkpoint._src.multihost.multihost"


class _KillingClient:
  """JAX's client, but its barrier for the chosen step's save ends the process."""

  def __init__(self, client):
    self._client = client

  def __getattr__(self, name):
    return getattr(self._client, name)

  def wait_at_barrier(self, key, *args, **kwargs):
    found = re.search(r"async_write_complete\D*(\d+)", key)
    if found and int(found.group(1)) == int(_STEP):
      # To a file: the supervisor, which relays stderr, dies first.
      with open(os.environ["SPARSE_JAX_KILL_AT_SAVE_MARK"], "w") as mark:
        mark.write(f"killed while saving step {_STEP}\n")
      os.kill(os.getppid(), signal.SIGKILL)  # The supervisor: the whole "host".
      os.kill(os.getpid(), signal.SIGKILL)
    return self._client.wait_at_barrier(key, *args, **kwargs)


class _PatchOnImport(importlib.abc.MetaPathFinder):
  """Finds orbax's multihost module as usual and patches it once it has run."""

  def find_spec(self, name, path=None, target=None):
    if name != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      real = module.get_jax_distributed_client
      module.get_jax_distributed_client = lambda: _KillingClient(real())
    spec.loader.exec_module = exec_module
    return spec


if _STEP:
  sys.meta_path.insert(0, _PatchOnImport())
