"""`--dry_run`: what a config builds, computed abstractly (no data, no compile)."""
import jax
import ml_collections
import numpy as np
import flax.linen as nn
from flax import traverse_util

from sparse_jax import train


def describe(config: ml_collections.ConfigDict) -> str:
  """The resolved config, the mesh, and a parameter table with the total."""
  exp = train.build_experiment(config)
  names = traverse_util.flatten_dict(
      jax.tree.map(lambda b: b.names if isinstance(b, nn.Partitioned) else None,
                   exp.boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  shapes = traverse_util.flatten_dict(exp.state_shapes.params)
  shardings = traverse_util.flatten_dict(exp.state_shardings.params)
  rows = [("parameter", "shape", "logical axes", "mesh axes", "count")]
  for path in sorted(shapes):
    shape = shapes[path].shape
    rows.append(("/".join(path), str(tuple(shape)), str(names.get(path)),
                 str(tuple(shardings[path].spec)), f"{int(np.prod(shape)):,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  table = "\n".join("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
  mesh = exp.mesh
  param_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize
                    for s in jax.tree.leaves(exp.state_shapes.params))
  return "\n".join([
      "== config ==", str(config),
      "== mesh ==",
      f"axes {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es)",
      "== parameters ==", table,
      f"total parameters: {exp.num_params:,} ({param_bytes / 2**20:.1f} MiB in float32)",
  ])
