"""Device mesh and logical-axis sharding rules.

One mesh with axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis names
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `classes`, `position`, ...) and the rules
below map them onto mesh axes; batches are split over ('data', 'fsdp'). So 'data' is
pure data parallelism (parameters replicated), 'fsdp' also shards every `embed`
dimension of the parameters and optimizer state (ZeRO-3 style), and 'tensor' shards
the `mlp`, `heads` and `vocab` dimensions (Megatron-style tensor parallelism).

A parameter dimension that its mesh axes do not divide (12 heads over tensor=8) is
kept whole along those axes (replicated there) instead of failing: XLA cannot shard
an array unevenly through `jit`'s out_shardings.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("classes", None),
    ("position", None),
    ("patch_height", None),
    ("patch_width", None),
    ("channels", None),
    ("pixels", None),  # Flattened image input (the residual MLP's first layer).
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry so the product is `num_devices`; ConfigError if impossible."""
  shape = [int(s) for s in mesh_shape]
  if len(shape) != len(MESH_AXES):
    raise ConfigError(f"mesh_shape={tuple(shape)} must have {len(MESH_AXES)} entries for "
                      f"the axes {MESH_AXES}.\nFix: e.g. --config.mesh_shape='(-1, 1, 1)'.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh_shape={tuple(shape)}: use positive sizes and at most one -1."
                      "\nFix: e.g. --config.mesh_shape='(-1, 1, 1)'.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(
          f"mesh_shape={tuple(shape)}: {num_devices} devices cannot be split into "
          f"groups of {known}.\nFix: choose mesh_shape entries whose product divides "
          f"{num_devices}, e.g. --config.mesh_shape='(-1, 1, 1)'.")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ConfigError(
        f"mesh_shape={tuple(shape)} has {int(np.prod(shape))} devices but "
        f"{num_devices} are present.\nFix: make the product of mesh_shape equal "
        f"{num_devices}, or use -1 for one axis: --config.mesh_shape='(-1, 1, 1)'.")
  return tuple(shape)


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[Any] | None = None,
              num_slices: int = 1) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all).

  With `num_slices` > 1 (a multislice TPU run, devices carrying `slice_index`) the
  'data' axis is split over the slices first, so that only the data-parallel gradient
  reduction crosses the data-center network; 'fsdp' and 'tensor' stay in a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if num_slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  if shape[0] % num_slices:
    raise ConfigError(
        f"mesh_shape={shape}: the data axis ({shape[0]}) must split over the "
        f"{num_slices} slices (only data parallelism crosses slices).\nFix: pass "
        f"--config.mesh_shape='(-1, {shape[1]}, {shape[2]})' or a data size divisible by "
        f"{num_slices}.")
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  per_slice = (shape[0] // num_slices, shape[1], shape[2])
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of shards a batch is split into."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def abstract_mesh(mesh_shape: Sequence[int]) -> jax.sharding.AbstractMesh:
  """A ('data', 'fsdp', 'tensor') mesh of the given (resolved) sizes without devices,
  for computing shardings and per-device shapes of meshes that are not here."""
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.sharding.AbstractMesh(tuple(int(s) for s in mesh_shape), MESH_AXES,
                                   axis_types=auto)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], axis_sizes: dict[str, int]
             ) -> PartitionSpec:
  """`spec` with each dimension's mesh axes cut to the longest leading run whose size
  product divides that dimension (the rest of it is replicated)."""
  entries = []
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for axis in axes:
      if dim % (size * axis_sizes[axis]):
        break
      kept.append(axis)
      size *= axis_sizes[axis]
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*entries)


def logical_specs(boxed_tree: Any, axis_sizes: dict[str, int],
                  rules: Sequence[tuple[str, Any]]) -> Any:
  """Mesh PartitionSpecs for a tree of (abstract) nn.Partitioned leaves, fitted to the
  leaf shapes (see fit_spec); other leaves replicated."""
  rules = tuple(tuple(r) for r in rules)

  def spec(leaf):
    if not isinstance(leaf, nn.Partitioned):
      return PartitionSpec()
    names = nn.get_partition_spec(leaf)  # Logical names.
    return fit_spec(nn.logical_to_mesh_axes(names, rules), leaf.value.shape, axis_sizes)

  return jax.tree.map(spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(boxed_tree: Any, mesh: Mesh | jax.sharding.AbstractMesh,
                      rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (abstract) nn.Partitioned leaves; others replicated.

  `mesh` may be abstract (see abstract_mesh): `--dry_run` sizes meshes that way.
  """
  specs = logical_specs(boxed_tree, dict(mesh.shape), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
