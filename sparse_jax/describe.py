"""`--dry_run`: what a config builds, computed abstractly (no data, no compile).

Besides the config and the parameter table it prints, for a device count N
(`--dry_run_devices`, default: the devices here), the memory each device holds for
parameters and optimizer state on the config's mesh and on a few other factorings of N,
so a pod slice can be sized on a laptop. The numbers come from the same logical axis
rules and PartitionSpecs the trainer uses, applied to an abstract mesh (no devices).
"""
import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from sparse_jax import finetune, sharding, train
from sparse_jax.errors import ConfigError

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class MeshMemory:
  """Bytes one device holds for the train state on a mesh (the largest shard: all
  shards are equal because every sharded dimension divides evenly)."""
  mesh_shape: tuple[int, ...]
  param_bytes: int
  opt_state_bytes: int
  # Parameter dimensions kept whole along an axis that does not divide them,
  # e.g. 'block_0/attention/query/kernel: 12 over tensor=8'.
  not_divided: tuple[str, ...] = ()

  @property
  def total_bytes(self) -> int:
    return self.param_bytes + self.opt_state_bytes


def _shard_bytes(shape_dtype, named_sharding: NamedSharding) -> int:
  shard = named_sharding.shard_shape(tuple(shape_dtype.shape))
  return int(np.prod(shard, dtype=np.int64)) * np.dtype(shape_dtype.dtype).itemsize


def memory_per_device(exp: train.Experiment, mesh_shape: Sequence[int]) -> MeshMemory:
  """Per-device parameter and optimizer-state bytes of `exp`'s train state on a
  ('data', 'fsdp', 'tensor') mesh of `mesh_shape` (resolved: no -1).

  Parameters are sharded by sharding.DEFAULT_RULES (fitted to their shapes, as the
  trainer does); optimizer-state leaves that mirror a parameter (Adam's moments) are
  sharded like it, the others (step counts) are replicated, as in
  train.build_experiment.
  """
  mesh = sharding.abstract_mesh(mesh_shape)
  rules = sharding.DEFAULT_RULES
  params = exp.state_shapes.params
  param_shardings = sharding.logical_shardings(exp.boxed_params, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = train.opt_state_shardings(exp.tx, exp.state_shapes.opt_state,
                                            param_shardings, replicated)
  param_bytes = sum(jax.tree.leaves(jax.tree.map(_shard_bytes, params, param_shardings)))
  opt_bytes = sum(jax.tree.leaves(jax.tree.map(_shard_bytes, exp.state_shapes.opt_state,
                                               opt_shardings)))
  return MeshMemory(tuple(int(s) for s in mesh_shape), int(param_bytes), int(opt_bytes),
                    _not_divided(exp.boxed_params, dict(mesh.shape)))


def _not_divided(boxed, axis_sizes: dict[str, int]) -> tuple[str, ...]:
  """'path: dim over axis=k' for each parameter dimension the rules would shard over an
  axis (of size > 1) that does not divide it."""
  rules = tuple(tuple(r) for r in sharding.DEFAULT_RULES)
  out = []
  flat = traverse_util.flatten_dict(boxed)  # Stops at non-dict leaves.
  for path, leaf in sorted(flat.items()):
    if not isinstance(leaf, nn.Partitioned):
      continue
    wanted = nn.logical_to_mesh_axes(nn.get_partition_spec(leaf), rules)
    fitted = sharding.fit_spec(wanted, leaf.value.shape, axis_sizes)
    for dim, want, got in zip(leaf.value.shape, wanted, fitted):
      want = () if want is None else (want,) if isinstance(want, str) else tuple(want)
      got = () if got is None else (got,) if isinstance(got, str) else tuple(got)
      lost = [a for a in want if a not in got and axis_sizes[a] > 1]
      if lost:
        over = ", ".join(f"{a}={axis_sizes[a]}" for a in lost)
        out.append(f"{'/'.join(path)}: {dim} over {over}")
  return tuple(out)


def candidate_meshes(mesh_shape: Sequence[int], num_devices: int) -> list[tuple[int, ...]]:
  """The config's mesh for `num_devices` (ConfigError if it does not fit, the same
  check as training), then pure data parallel (N,1,1), full FSDP (1,N,1), FSDP over
  groups of 4 (N/4,4,1), and tensor-parallel factorings (N/4,2,2), (1,N/2,2),
  (1,N/4,4) where they divide N; without duplicates."""
  n = num_devices
  shapes = [sharding.resolve_mesh_shape(mesh_shape, n), (n, 1, 1), (1, n, 1)]
  if n % 4 == 0 and n > 4:
    shapes += [(n // 4, 4, 1), (n // 4, 2, 2)]
  for t in (2, 4):
    if n % t == 0:
      shapes.append((1, n // t, t))
  out = []
  for s in shapes:
    if tuple(s) not in out:
      out.append(tuple(s))
  return out


def memory_table(exp: train.Experiment, num_devices: int) -> tuple[str, list[MeshMemory]]:
  """The '== memory per device ==' section and the rows it shows."""
  rows = [memory_per_device(exp, s)
          for s in candidate_meshes(exp.config.mesh_shape, num_devices)]
  table = [("mesh (data, fsdp, tensor)", "params MiB", "optimizer state MiB", "total MiB")]
  for i, r in enumerate(rows):
    table.append((str(r.mesh_shape) + ("  <- config" if i == 0 else ""),
                  f"{r.param_bytes / MIB:,.2f}", f"{r.opt_state_bytes / MIB:,.2f}",
                  f"{r.total_bytes / MIB:,.2f}"))
  widths = [max(len(t[i]) for t in table) for i in range(4)]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(t, widths))) for t in table]
  for r in rows:
    if r.not_divided:
      lines.append(f"{r.mesh_shape}: {len(r.not_divided)} parameter dimension(s) kept "
                   f"whole along an axis that does not divide them, e.g. "
                   f"{r.not_divided[0]}.")
  lines.append(
      "Parameters and optimizer state as stored (float32), per device; gradients (about "
      "the parameters' size again), activations and XLA temporaries come on top. "
      "'data' replicates the state, 'fsdp' shards embed dimensions, 'tensor' shards "
      "mlp/heads/vocab; a dimension an axis does not divide is replicated along it.")
  return "\n".join(lines), rows


def _with_public_source(config: ml_collections.ConfigDict
                        ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """The config a public finetune source (hf:, npz:, mtf:) sets, when it can be read
  here, and a line saying which; a sparse_jax workdir must match the config anyway, and
  an unreadable source leaves the config as given (--dry_run sizes a config without its
  checkpoint)."""
  source = finetune.source(config)
  if source is None or source.format == "native":
    return config, []
  try:
    configured, _ = finetune.configured(config)
  except ConfigError as e:
    return config, [f"== finetune source ==\n{source.describe()} not read here "
                    f"({str(e).splitlines()[0]}): sized from the config as given."]
  return configured, [f"== finetune source ==\n{source.describe()}: model keys from it."]


def describe(config: ml_collections.ConfigDict, num_devices: int | None = None) -> str:
  """The resolved config, the mesh, a parameter table with the total, and the memory
  per device on `num_devices` devices (default: the devices here) for a few meshes.

  Raises:
    ConfigError: the config's mesh_shape does not fit `num_devices` (as in training).
  """
  config, source_note = _with_public_source(config)
  local = jax.device_count()
  n = local if num_devices is None else int(num_devices)
  config_mesh = sharding.resolve_mesh_shape(config.mesh_shape, n)
  # Shapes do not depend on the mesh: build on the devices here, whatever N is.
  exp = train.build_experiment(config, sharding.make_mesh((-1, 1, 1)))
  axis_sizes = dict(zip(sharding.MESH_AXES, config_mesh))
  names = traverse_util.flatten_dict(
      jax.tree.map(lambda b: b.names if isinstance(b, nn.Partitioned) else None,
                   exp.boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  shapes = traverse_util.flatten_dict(exp.state_shapes.params)
  specs = traverse_util.flatten_dict(
      sharding.logical_specs(exp.boxed_params, axis_sizes, sharding.DEFAULT_RULES))
  rows = [("parameter", "shape", "logical axes", "mesh axes", "count")]
  for path in sorted(shapes):
    shape = shapes[path].shape
    rows.append(("/".join(path), str(tuple(shape)), str(names.get(path)),
                 str(tuple(specs[path])), f"{int(np.prod(shape)):,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  table = "\n".join("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
  param_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize
                    for s in jax.tree.leaves(exp.state_shapes.params))
  where = (f"{local} {jax.devices()[0].platform} device(s) here" if n == local else
           f"{n} devices (--dry_run_devices; {local} {jax.devices()[0].platform} "
           "device(s) here)")
  memory, _ = memory_table(exp, n)
  return "\n".join([
      *source_note,
      "== config ==", str(config),
      "== mesh ==",
      f"axes {dict(axis_sizes)} (mesh_shape {tuple(config.mesh_shape)}) over {where}, "
      f"{jax.process_count()} process(es)",
      "== parameters ==", table,
      f"total parameters: {exp.num_params:,} ({param_bytes / MIB:.1f} MiB in float32)",
      f"== memory per device, {n} devices ==", memory,
  ])
