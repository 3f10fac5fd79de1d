"""What accelerators this host has, read without starting JAX (sysfs, installed packages).

Used once, when `sparse_jax` is imported: with `libtpu` installed (the `test` and `tpu`
extras bring it, for compiling TPU programs here) but no TPU chip attached, JAX would
start libtpu on its first use and libtpu prints a screenful of warnings about TPU
hostnames and accelerator types. On such a host JAX is told to use the CPU
(`JAX_PLATFORMS=cpu`, unless the user set it), which still lets `--compile_for` build
TPU programs from a topology description.
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
  """Sets JAX_PLATFORMS=cpu where libtpu is installed but no TPU (nor GPU) is attached.

  Does nothing if the user chose platforms, or JAX is already imported (its
  configuration has then been read). Returns whether it set the variable.
  """
  if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules or not has_libtpu():
    return False
  if tpu_chips_attached() or any(os.path.exists(d) for d in _NVIDIA_DEVICES):
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  return True
