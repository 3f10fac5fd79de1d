"""What accelerators this host has, read without starting JAX (sysfs, installed packages).

Used once, when `sparse_jax` is imported: with `libtpu` installed (the `test` and `tpu`
extras bring it, for compiling TPU programs here) but no TPU chip attached, JAX would
start libtpu on its first use and libtpu prints a screenful of warnings about TPU
hostnames and accelerator types. On such a host JAX is told to use the CPU
(`JAX_PLATFORMS=cpu`, unless the user set it), which still lets `--compile_for` build
TPU programs from a topology description, and libtpu gets the settings that keep it
quiet when that happens (`compile_only_libtpu_settings`).
"""
import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips appear as PCI devices of this vendor.
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def tpu_chips_attached() -> int:
  """Number of Google PCI devices (TPU chips) on this host."""
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        count += f.read().strip() == _GOOGLE_PCI_VENDOR
    except OSError:
      continue
  return count


def has_libtpu() -> bool:
  """Whether the `libtpu` package (the TPU compiler and runtime) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def use_cpu_without_accelerator() -> bool:
  """Keeps JAX on the CPU where libtpu is installed but no TPU (nor GPU) is attached.

  Sets JAX_PLATFORMS=cpu, or, if JAX was imported first, its `jax_platforms` option
  while no backend has started. Does nothing if the user chose platforms (or a backend
  already started). Returns whether it chose the CPU.
  """
  if "JAX_PLATFORMS" in os.environ or not has_libtpu():
    return False
  if tpu_chips_attached() or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
    return False
  compile_only_libtpu_settings("v5litepod-4")
  if "jax" not in sys.modules:
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True
  import jax  # pylint: disable=import-outside-toplevel
  try:  # Private: whether a backend started (the option is read then, and only then).
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return False  # A JAX without it: leave the choice to the user.
  if jax.config.jax_platforms or started:
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


def compile_only_libtpu_settings(accelerator_type: str) -> None:
  """What libtpu reads when it is loaded, set for a host with no TPU (unless the user
  set them). Without a TPU libtpu warns that it cannot find the accelerator type and
  worker hostnames (it is loaded when a program is lowered for 'tpu', or a TPU topology
  is described), so they are given: they do not change what is compiled for a topology.
  And it takes a lock file that lets one process at a time use the TPU, which would
  make two compiles (or parallel tests) fail, so the lock is waived: nothing runs on a
  TPU here."""
  if tpu_chips_attached():
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
