"""Cloud TPU generations and slice topologies, and their devices without a TPU.

`devices(parse_topology("v5e:16x16"))` returns the 256 devices of a v5e-256 slice from
libtpu's topology description: enough to build a mesh and compile programs for it with
the real TPU compiler (Mosaic included) on a host that has no TPU. Nothing can run on
them. `GENERATIONS` holds each generation's peak numbers, with their sources: the
bounds `--compile_for` prints are computed from them.
"""
import dataclasses
import math
import re
from typing import Any

from sparse_jax.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation's chip, as Cloud TPU's system-architecture pages state it.

  Attributes:
    name: the topology prefix ('v5e').
    accelerator_prefix: gcloud's accelerator type prefix ('v5litepod').
    cores_per_chip: what gcloud's accelerator type counts per chip (v4 and v5p count
      TensorCores, two per chip; v5e and v6e count chips).
    dims: 3 for the 3D-torus generations (v4, v5p), else 2.
    chip_config: libtpu's chip configuration: 'megacore' makes one JAX device of a
      chip's two TensorCores, as on a real v4 / v5p slice.
    peak_bf16_flops: peak dense bfloat16 FLOP/s per chip.
    hbm_bytes: HBM per chip.
    hbm_bytes_per_s: HBM bandwidth per chip.
    chips_per_host: chips a host of a multi-host slice drives.
    source: where the numbers come from.
  """
  name: str
  accelerator_prefix: str
  cores_per_chip: int
  dims: int
  chip_config: str | None
  peak_bf16_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  chips_per_host: int
  source: str


GENERATIONS: dict[str, Generation] = {g.name: g for g in (
    Generation("v4", "v4", 2, 3, "megacore", 275e12, 32 * GIB, 1200e9, 4,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, "
               "1200 GB/s)"),
    Generation("v5e", "v5litepod", 1, 2, None, 197e12, 16 * GIB, 819e9, 4,
               "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2, "
               "819 GB/s)"),
    Generation("v5p", "v5p", 2, 3, "megacore", 459e12, 95 * GIB, 2765e9, 4,
               "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e, "
               "2765 GB/s)"),
    Generation("v6e", "v6e", 1, 2, None, 918e12, 32 * GIB, 1638e9, 4,
               "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM, "
               "1638 GB/s)"),
)}
_EXAMPLES = "v5e:16x16, v4:4x4x4, v5p:4x4x4, v6e:8x8 or v5litepod-256"


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice (or `num_slices` identical slices joined by the data-center network)."""
  generation: Generation
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def name(self) -> str:
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def hosts(self) -> int:
    """Processes of a run (one per host); slices of up to 8 v5e/v6e chips are one host."""
    g = self.generation
    per_host = (self.chips_per_slice if g.dims == 2 and self.chips_per_slice <= 8
                else g.chips_per_host)
    return max(1, self.chips_per_slice // per_host) * self.num_slices

  @property
  def accelerator_type(self) -> str:
    """gcloud's name of one slice, e.g. 'v5litepod-256' for v5e:16x16."""
    g = self.generation
    return f"{g.accelerator_prefix}-{self.chips_per_slice * g.cores_per_chip}"

  def __str__(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return f"{self.name} ({self.accelerator_type}{slices}, {self.chips} chips)"


def parse_topology(text: str, num_slices: int = 1) -> Topology:
  """'v5e:16x16' (or gcloud's accelerator type, 'v5litepod-256', for its default
  topology) -> Topology; ConfigError naming the problem and the fix otherwise."""
  if num_slices < 1:
    raise ConfigError(f"--compile_slices={num_slices} must be at least 1.\n"
                      "Fix: pass --compile_slices=1 (one slice) or more.")
  if re.fullmatch(r"v\w+?-\d+", text or ""):
    return dataclasses.replace(topology_for_accelerator(text), num_slices=num_slices)
  match = re.fullmatch(r"\s*(v\w+):(\d+(?:x\d+)*)\s*", text or "")
  fix = f"Fix: pass a topology such as {_EXAMPLES} (generation:chips per dimension)."
  if not match:
    raise ConfigError(f"--compile_for={text!r} is not a TPU topology.\n{fix}")
  name, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
  if name not in GENERATIONS:
    raise ConfigError(f"--compile_for={text!r}: unknown TPU generation {name!r} (known: "
                      f"{', '.join(GENERATIONS)}).\n{fix}")
  generation = GENERATIONS[name]
  if len(dims) != generation.dims or min(dims) < 1:
    raise ConfigError(f"--compile_for={text!r}: {name} slices have {generation.dims} "
                      f"positive dimensions.\n{fix}")
  return Topology(generation, dims, num_slices)


def topology_for_accelerator(accelerator_type: str) -> Topology:
  """The default topology gcloud gives an accelerator type ('v4-32' -> v4:2x2x4)."""
  match = re.fullmatch(r"(v\w+?)-(\d+)", accelerator_type or "")
  by_prefix = {g.accelerator_prefix: g for g in GENERATIONS.values()}
  if not match or match.group(1) not in by_prefix:
    raise ConfigError(f"Unknown accelerator type {accelerator_type!r}.\nFix: use "
                      "v4-N, v5p-N (N TensorCores), v5litepod-N or v6e-N (N chips).")
  generation = by_prefix[match.group(1)]
  chips, rest = divmod(int(match.group(2)), generation.cores_per_chip)
  if rest or chips < 1 or chips & (chips - 1):
    raise ConfigError(f"Accelerator type {accelerator_type!r} is not a slice size of "
                      f"{generation.name}.\nFix: use a power of two "
                      f"{'TensorCores' if generation.cores_per_chip > 1 else 'chips'}.")
  if generation.dims == 2:
    short = 2 ** (int(math.log2(chips)) // 2)
    return Topology(generation, (short, chips // short))
  shape = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
  while math.prod(shape) < chips:  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return Topology(generation, tuple(shape))


def devices(topology: Topology) -> list[Any]:
  """The JAX devices of `topology`, for compiling only.

  Raises:
    ConfigError: libtpu is not installed, or libtpu rejects the topology.
  """
  from sparse_jax import host  # pylint: disable=import-outside-toplevel
  if not host.has_libtpu():
    raise ConfigError("Compiling for a TPU needs libtpu, which is not installed.\n"
                      "Fix: pip install -e \".[tpu]\" (or the test extra).")
  host.compile_only_libtpu_settings(topology.accelerator_type)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs: dict[str, Any] = {"num_slices": topology.num_slices}
  if topology.generation.chip_config:
    kwargs["chip_config_name"] = topology.generation.chip_config
  if topology.hosts == topology.num_slices:
    # A one-host slice (v5e/v6e up to 8 chips: 1x1, 2x2, 2x4) is one process; libtpu's
    # default of 2x2 chips per host cannot describe 1x1 and splits 2x4 in two.
    kwargs["chips_per_host_bounds"] = (*topology.shape, 1)[:3]
  try:
    description = topologies.get_topology_desc(topology_name=topology.name,
                                               platform="tpu", **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    # libtpu's own message (e.g. a layout a host's 2x2 chips do not divide).
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"libtpu cannot build the topology {topology.name}: {reason}\n"
                      f"Fix: pass a slice shape Cloud TPU offers, e.g. {_EXAMPLES}."
                      ) from None
  return list(description.devices)
