"""How much of a trained model's MLP work a block-sparse kernel could skip.

The block-sparse MLP kernel skips every (token tile x unit tile) block of the hidden
activation a = f(z) in which no entry is active (`sparse_jax.kernels.block_mask`). Of
the 6 matmuls of a training step, the forward z = x W1 is always dense and the other
five are skippable per block, so with q = share of nonzero blocks the kernel does
(1 + q) / 2 of the forward MLP FLOPs and (1 + 5q) / 6 of forward + backward. Token-level
density p (tile 1 x 1) bounds them: q >= p, so the skipped shares are at most
1 - (1 + p) / 2 and 1 - (1 + 5p) / 6 and the speedups at most 2 / (1 + p) and
6 / (1 + 5p).

For each trained workdir this script restores the latest params, runs the model in
eval mode on a few batches of its own eval split, keeps z of every MLP for the real
(non-padding) tokens only, in the order the model lays them out (batch-major, then
sequence), and reports:

1. token-level density p and the share of all-zero blocks at several tile shapes;
2. at the kernels' default tiles (TPU 128 x 128, GPU 64 x 64 tokens x units), the FLOP
   shares skipped forward and forward + backward next to their density ceilings, and
   the speedup bounds;
3. what reordering buys: a permutation of the hidden units (W1 columns, b1, W2 rows;
   the MLP computes the same function, checked numerically per layer) computed on a
   calibration batch and measured on held-out batches, by frequency sort and by greedy
   co-activation grouping; a per-batch sort of the tokens by their unit-tile activity
   (a run-time gather / scatter, computed on the batch itself), alone and after the
   co-activation grouping.

  python benchmarks/mlp_sparsity.py [--workdirs A B ...] [--batches N] [--json out.json]

The analysis is in pure functions (`zero_block_share`, `skipped_flop_shares`,
`coactivation_permutation`, ...) that tests/test_mlp_sparsity_bench.py checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # Run as a script from anywhere: the package is the repo's.
  sys.path.insert(0, REPO)

from sparse_jax.kernels.block_mask import (  # pylint: disable=g-import-not-at-top
    block_mask, is_active, nonzero_block_fraction)

Tile = tuple[int, int]  # (token tile, unit tile)

# The (token, unit) tiles the Pallas kernels use by default (config.mlp_tiles = None):
# TPU (128, 128, 256) and GPU (64, 64, 128) as (tokens, units, features). Pass
# --kernel_tiles when they change.
KERNEL_TILES: tuple[Tile, ...] = ((128, 128), (64, 64))
# (1, 32): per-token skipping of 32-unit slices, a reference finer than any kernel tile.
TILES: tuple[Tile, ...] = ((1, 32), (8, 32), (8, 64), (8, 128), (16, 128), (32, 128),
                           (64, 64), (128, 128), (8, 256))
REORDER_TILES: tuple[Tile, ...] = KERNEL_TILES + ((8, 32),)

# README's workdirs: the digits ViTs of its two commands, the tiny T5 of its decoding
# section (sparsified) and the tiny vanilla T5 of docs/finetuning.md.
DEFAULT_WORKDIRS = ("/tmp/sparse_jax/digits_sparsified", "/tmp/sparse_jax/digits_vanilla",
                    "/tmp/sparse_jax/t5_tiny", "/tmp/sparse_jax/t5_tiny_vanilla")
# The commands that produce the default workdirs, as README.md and docs/ give them.
KNOWN_COMMANDS = {
    "/tmp/sparse_jax/digits_sparsified":
        "python -m sparse_jax.main --config configs/default.py "
        "--workdir /tmp/sparse_jax/digits_sparsified",
    "/tmp/sparse_jax/digits_vanilla":
        "python -m sparse_jax.main --config configs/default.py:vanilla "
        "--workdir /tmp/sparse_jax/digits_vanilla",
    "/tmp/sparse_jax/t5_tiny":
        "python -m sparse_jax.main --config configs/t5_c4.py:tiny "
        "--workdir /tmp/sparse_jax/t5_tiny",
    "/tmp/sparse_jax/t5_tiny_vanilla":
        "python -m sparse_jax.main --config configs/t5_c4.py:tiny,vanilla "
        "--workdir /tmp/sparse_jax/t5_tiny_vanilla",
}
# For a workdir that holds nothing yet, the config its name suggests (first match).
CONFIG_BY_NAME = (("t5", "configs/t5_c4.py:tiny[,vanilla]"),
                  ("imagenet", "configs/vit_imagenet.py[:vanilla]"),
                  ("", "configs/default.py[:vanilla]"))
# Configs a workdir's config.json is matched against to name the command that made it.
CANDIDATE_CONFIGS = (
    "configs/default.py:sparsified", "configs/default.py:vanilla",
    "configs/default.py:finetune", "configs/t5_c4.py:tiny,sparsified",
    "configs/t5_c4.py:tiny,vanilla", "configs/t5_c4.py:tiny,finetune",
    "configs/t5_c4.py:base,sparsified", "configs/t5_c4.py:base,vanilla",
    "configs/t5_c4.py:base,finetune", "configs/vit_imagenet.py:sparsified",
    "configs/vit_imagenet.py:vanilla", "configs/vit_imagenet.py:finetune")


# ----------------------------------------------------------------------------- block math
def clamp_tile(tile: Sequence[int], shape: Sequence[int]) -> Tile:
  """The tile cut down to a [tokens, units] matrix smaller than it (tiny models)."""
  return (max(1, min(int(tile[0]), int(shape[0]))), max(1, min(int(tile[1]), int(shape[1]))))


def block_counts(active: Any, tile: Sequence[int]) -> tuple[int, int]:
  """(nonzero blocks, all blocks) of a [tokens, units] bool matrix at `tile` (clamped).

  Counts add up over batches, so a share over several batches is a ratio of sums.
  """
  active = jnp.asarray(active, bool)
  mask = block_mask(active, *clamp_tile(tile, active.shape))
  return int(jnp.sum(mask)), int(mask.size)


def zero_block_share(z: Any, activation: str, tile: Sequence[int]) -> float:
  """Share of all-zero (skippable) blocks of pre-activations z [tokens, units] at `tile`.

  A block is all zero when no z in it is active (`block_mask.is_active`: z > 0 for
  ReLU, z >= 0 for J-SquaredReLU and the mixture). Tiles larger than z are clamped.
  """
  z = jnp.asarray(z)
  mask = block_mask(is_active(z, activation), *clamp_tile(tile, z.shape))
  return 1.0 - float(nonzero_block_fraction(mask))


def density(z: Any, activation: str) -> float:
  """Token-level density p: the share of active entries (the 1 x 1 tile's q)."""
  return float(jnp.mean(is_active(jnp.asarray(z), activation).astype(jnp.float32)))


def skipped_flop_shares(q: float) -> dict[str, float]:
  """Share of the MLP FLOPs a block-skipping kernel avoids, given the nonzero-block share q.

  Forward: z = xW1 is dense, y = aW2 is done on a share q, so (1 + q) / 2 is done.
  Forward + backward: 1 dense matmul of 6, the other 5 on a share q: (1 + 5q) / 6 done.
  With q = p (token-level density) these are the ceilings of any tiling.
  """
  return {"forward": 1.0 - (1.0 + q) / 2.0, "forward_backward": 1.0 - (1.0 + 5.0 * q) / 6.0}


def speedup_bounds(q: float) -> dict[str, float]:
  """FLOP-count speedups 2 / (1 + q) (forward) and 6 / (1 + 5q) (forward + backward)."""
  return {"forward": 2.0 / (1.0 + q), "forward_backward": 6.0 / (1.0 + 5.0 * q)}


# ----------------------------------------------------------------------------- reordering
def frequency_permutation(active: Any) -> np.ndarray:
  """Units sorted by activation frequency, most frequent first.

  Rare units end up together, in the last unit tiles (the partial one included, where
  d_ff is not a multiple of the tile), where whole blocks have a chance to be all zero.
  """
  freq = np.asarray(active, bool).sum(axis=0)
  return np.argsort(-freq, kind="stable")


def coactivation_permutation(active: Any, tile: Sequence[int]) -> np.ndarray:
  """A unit order grouping units that are active in the same token tiles (greedy).

  A unit tile's blocks are nonzero in the union of its units' active token tiles, so
  each group of `tile[1]` units is grown to keep that union small: seeded with the
  unassigned unit active in the fewest token tiles, then repeatedly given the unit that
  adds the fewest new token tiles (ties: the rarer unit). Rare-first keeps dead and
  rare units together instead of letting them fill the slots of the always-on groups.
  The partial unit tile (d_ff not a multiple of the tile) is filled first, with the
  rarest group, and placed last, where the tiling puts it.

  Args:
    active: [tokens, units] bool, tokens in the order the kernel will tile them (one
      calibration batch).
    tile: (token tile, unit tile), clamped to `active`.

  Returns:
    int permutation of the units: new unit j is old unit perm[j].
  """
  active = np.asarray(active, bool)
  units = active.shape[1]
  rows, cols = clamp_tile(tile, active.shape)
  # [units, token tiles]: in which token tiles each unit is active.
  hits = np.asarray(block_mask(jnp.asarray(active), rows, 1)).T
  tiles_hit, freq = hits.sum(axis=1), active.sum(axis=0)
  rem = units % cols
  sizes = ([rem] if rem else []) + [cols] * (units // cols)
  free = np.ones(units, bool)
  groups = []
  for size in sizes:
    cand = np.flatnonzero(free)
    seed = cand[np.lexsort((freq[cand], tiles_hit[cand]))[0]]
    group, union = [seed], hits[seed].copy()
    free[seed] = False
    for _ in range(size - 1):
      cand = np.flatnonzero(free)
      added = (hits[cand] & ~union).sum(axis=1)
      best = cand[np.lexsort((freq[cand], tiles_hit[cand], added))[0]]
      group.append(best)
      union |= hits[best]
      free[best] = False
    groups.append(np.asarray(group))
  if rem:
    groups = groups[1:] + groups[:1]
  return np.concatenate(groups).astype(np.int64)


def token_permutation(active: Any, unit_tile: int) -> np.ndarray:
  """A token order that puts tokens with the same unit-tile activity next to each other.

  Tokens are sorted lexicographically by which unit tiles they touch, the rarest tile
  as the primary key: its active tokens become one run (few nonzero blocks in its
  column), the next rarest at most two runs, and so on. At run time this is a gather of
  x / z rows before the skippable matmuls and a scatter of y / dX after them; it is
  computed per batch from z, which the dense first matmul yields anyway.
  """
  active = jnp.asarray(active, bool)
  signature = np.asarray(block_mask(active, 1, clamp_tile((1, unit_tile), active.shape)[1]))
  rarest_first = np.argsort(signature.sum(axis=0), kind="stable")
  # np.lexsort sorts by its last key first.
  return np.lexsort([signature[:, j] for j in rarest_first[::-1]]).astype(np.int64)


def permute_units(mlp_params: Mapping[str, Any], perm: Any) -> dict[str, Any]:
  """The MLP's params with its hidden units reordered by `perm` (same function).

  W1 columns and b1 (every leaf under 'wi', last axis) and W2 rows ('wo' kernel, first
  axis) move together; W2's bias, the zeroth bias and anything else stay.
  """
  perm = np.asarray(perm)
  out = dict(mlp_params)
  out["wi"] = {k: jnp.take(v, perm, axis=-1) for k, v in mlp_params["wi"].items()}
  out["wo"] = dict(mlp_params["wo"])
  out["wo"]["kernel"] = jnp.take(mlp_params["wo"]["kernel"], perm, axis=0)
  return out


def mlp_reference(mlp_params: Mapping[str, Any], x: Any, activation: str) -> jax.Array:
  """y = f(x W1 + b1) W2 + b2 from a {'wi', 'wo'} params tree (biases optional)."""
  from sparse_jax.ops.activations import apply_activation  # pylint: disable=g-import-not-at-top
  wi, wo = mlp_params["wi"], mlp_params["wo"]
  z = x @ wi["kernel"] + wi.get("bias", 0.0)
  return apply_activation(activation, z, 1.0) @ wo["kernel"] + wo.get("bias", 0.0)


def _share(counts: Iterable[tuple[int, int]]) -> float:
  """Nonzero-block share q from summed (nonzero, total) counts."""
  nonzero = total = 0
  for n, t in counts:
    nonzero, total = nonzero + n, total + t
  return nonzero / max(total, 1)


def reorder_gain(calibration: Any, held_out: Sequence[Any], tile: Sequence[int]
                 ) -> dict[str, Any]:
  """All-zero block shares on `held_out` before and after reordering, at `tile`.

  The unit permutations are computed on `calibration` ([tokens, units] bool) and
  applied unchanged to every held-out batch; the token sort is computed per held-out
  batch (it is a run-time operation). Returns zero-block shares 'natural',
  'frequency', 'coactivation', 'tokens' (token sort alone), 'coactivation+tokens'
  (held out), 'coactivation_calib' (in sample), q per variant, and the two unit
  permutations.
  """
  calibration = np.asarray(calibration, bool)
  perms = {"frequency": frequency_permutation(calibration),
           "coactivation": coactivation_permutation(calibration, tile)}
  held_out = [np.asarray(a, bool) for a in held_out]
  cols = clamp_tile(tile, calibration.shape)[1]
  q = {"natural": _share(block_counts(a, tile) for a in held_out)}
  for name, perm in perms.items():
    q[name] = _share(block_counts(a[:, perm], tile) for a in held_out)
  q["tokens"] = _share(block_counts(a[token_permutation(a, cols)], tile) for a in held_out)
  reordered = [a[:, perms["coactivation"]] for a in held_out]
  q["coactivation+tokens"] = _share(
      block_counts(a[token_permutation(a, cols)], tile) for a in reordered)
  q["coactivation_calib"] = _share(
      [block_counts(calibration[:, perms["coactivation"]], tile)])
  return {"zero_block_share": {k: 1.0 - v for k, v in q.items()}, "q": q,
          "permutations": perms}


# ----------------------------------------------------------------------------- tables
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 digits: int = 3) -> str:
  """Plain-text table: first column left-aligned, the rest right-aligned."""
  def cell(v):
    if isinstance(v, float):
      return f"{v:.{digits}f}"
    return str(v)
  body = [[cell(v) for v in row] for row in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
  def line(values):
    return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                     for i, (v, w) in enumerate(zip(values, widths))).rstrip()
  out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
  return "\n".join(out + [line(r) for r in body])


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
  w = np.asarray(weights, np.float64)
  return float(np.sum(np.asarray(values, np.float64) * w) / max(np.sum(w), 1e-12))


def tile_name(tile: Sequence[int]) -> str:
  return f"{tile[0]}x{tile[1]}"


def parse_tile(text: str) -> Tile:
  try:
    rows, cols = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"bad tile {text!r}: expected TOKENSxUNITS, e.g. 8x128") from None
  if rows < 1 or cols < 1:
    raise argparse.ArgumentTypeError(f"bad tile {text!r}: sizes must be >= 1")
  return rows, cols


# ----------------------------------------------------------------------------- workdirs
class MissingRunError(RuntimeError):
  """A workdir without a finished checkpoint: the message says how to make one."""


def _load_config_file(spec: str):
  """get_config(arg) of 'configs/x.py:arg' (relative to the repository root)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "_config_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def training_command(workdir: str) -> str:
  """The trainer command that produces `workdir` (from the README / config files).

  With a config.json there, the candidate config that differs from it in the fewest
  keys is named, with `--config.<key>=<value>` for each remaining difference.
  """
  workdir = os.path.abspath(workdir)
  saved_path = os.path.join(workdir, "config.json")
  if not os.path.exists(saved_path):
    if workdir in KNOWN_COMMANDS:
      return KNOWN_COMMANDS[workdir]
    name = os.path.basename(workdir).lower()
    spec = next(spec for part, spec in CONFIG_BY_NAME if part in name)
    return (f"python -m sparse_jax.main --config {spec} --workdir {workdir}  (or "
            "another config, see README.md)")
  from sparse_jax import config_schema  # pylint: disable=g-import-not-at-top
  with open(saved_path, encoding="utf-8") as f:
    saved_json = json.load(f)
  saved = config_schema.flatten(saved_json)
  best = None
  for spec in CANDIDATE_CONFIGS:
    try:
      config = _load_config_file(spec)
    except Exception:  # pylint: disable=broad-except
      continue  # A candidate that does not load here cannot be the one.
    diff = config_schema.changed_keys(saved_json, config)
    if best is None or len(diff) < len(best[1]):
      best = (spec, diff)
  if best is None or len(best[1]) > 10:
    return KNOWN_COMMANDS.get(workdir, f"python -m sparse_jax.main --config <the run's "
                              f"config> --workdir {workdir}  (see its config.json)")
  spec, diff = best
  spec = spec.replace(":sparsified", "") if spec == "configs/default.py:sparsified" else spec
  overrides = "".join(f" --config.{k}={_override(saved.get(k))}" for k in diff
                      if k in saved)
  return f"python -m sparse_jax.main --config {spec}{overrides} --workdir {workdir}"


def _override(value: Any) -> str:
  if isinstance(value, list):
    return "'(" + ",".join(str(v) for v in value) + ",)'"
  return "None" if value is None else str(value)


def checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(p) for p in os.listdir(root) if p.isdigit())


def check_workdir(workdir: str) -> None:
  """MissingRunError unless `workdir` has a config.json and a checkpoint."""
  if os.path.exists(os.path.join(workdir, "config.json")) and checkpoint_steps(workdir):
    return
  what = ("has no checkpoint" if os.path.isdir(workdir) else "does not exist")
  raise MissingRunError(
      f"{workdir} {what}. Train it first, from the repository root ({REPO}):\n"
      f"  {training_command(workdir)}")


def load_config(workdir: str):
  """The run's config: the schema's defaults for its model, overwritten by config.json
  (keys the schema gained since keep their defaults; keys it dropped are ignored)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sparse_jax import config_schema  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    saved = json.load(f)
  config = config_schema.defaults_for(
      ml_collections.ConfigDict({"model": {"name": saved["model"]["name"]}}))

  def update(target, values):
    for key, value in values.items():
      if key not in target:
        continue
      if isinstance(value, dict):
        update(target[key], value)
        continue
      if isinstance(value, list):  # JSON has no tuples; the configs' sequences are.
        try:
          target[key] = tuple(value)
        except TypeError:
          target[key] = value
      else:
        target[key] = value
  with config.unlocked():
    update(config, saved)
  if "mlp_impl" in config:
    # z is the same whichever way the MLP runs; the Pallas kernels would only be
    # interpreted (slowly) on a CPU, and the plain path sows z for sure.
    config.mlp_impl = "xla"
  return config


@dataclasses.dataclass
class RunData:
  """What the analysis needs from one workdir."""
  name: str
  config: Any
  step: int
  activation: str
  mixing: float
  layers: list[str]                       # 'block_0', 'encoder/layer_1', ...
  active: dict[str, list[np.ndarray]]     # layer -> per batch [real tokens, d_ff] bool
  examples: list[int]                     # real examples per batch
  # (layer, unit permutation) -> (max |y_permuted - y|, max |y|) on calibration inputs.
  verify: Callable[[str, np.ndarray], tuple[float, float]]


def collect(workdir: str, *, batches: int, eval_batch_size: int | None,
            verify_examples: int) -> RunData:
  """Restores `workdir`'s latest params and collects per-layer activity on eval data."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from sparse_jax import metrics, pretrained, tasks, train  # pylint: disable=g-import-not-at-top
  from sparse_jax.ops.activations import mixing_coefficient  # pylint: disable=g-import-not-at-top
  from sparse_jax.transforms import lora  # pylint: disable=g-import-not-at-top

  config = load_config(workdir)
  if eval_batch_size:
    config.eval_batch_size = eval_batch_size
  exp = train.build_experiment(config)
  # A finetune source reads just the params of a workdir: point one at this run.
  source = pretrained.native.NativeSource(workdir)
  step = source.checkpoint_step()
  flat = source.read_params(exp.state_shapes.params, exp.state_shardings.params)
  params = jax.device_get(lora.merge(traverse_util.unflatten_dict(flat)))
  activation = config.sparsity.activation
  mixing = float(mixing_coefficient(step, config.sparsity.activation_mixing_steps))
  task, model = exp.task, exp.model

  # The MLP blocks are the modules that sow z; their inputs/outputs are captured so the
  # permutation check runs each block on its real input.
  probe = task.dummy_inputs(config)
  shapes = jax.eval_shape(lambda p: model.apply({"params": p}, *probe, train=False,
                                                mixing=mixing, mutable=["intermediates"]),
                          params)[1]["intermediates"]
  paths = [p for p, _ in metrics.mlp_blocks(shapes, ("z", "a"))]
  modules: dict[tuple[str, ...], tuple[nn.Module, dict[str, Any]]] = {}

  def forward(params, inputs):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = tuple(context.module.path)
      if context.method_name == "__call__" and path in paths:
        captured["/".join(path)] = (args[0], out)
        modules[path] = (context.module.clone(parent=None),
                         {k: v for k, v in kwargs.items() if not isinstance(v, jax.Array)})
      return out

    with nn.intercept_methods(interceptor):
      _, mutated = model.apply({"params": params}, *inputs, train=False, mixing=mixing,
                               mutable=["intermediates"])
    zs = {"/".join(p): m["z"] for p, m in metrics.mlp_blocks(mutated["intermediates"],
                                                             ("z",))}
    return zs, captured

  forward = jax.jit(forward)
  names = {"/".join(p): _layer_name(p) for p in paths}
  active: dict[str, list[np.ndarray]] = {names[k]: [] for k in names}
  examples: list[int] = []
  calib_io = None
  pipeline = tasks.data_pipeline(task)
  pipeline.prepare_dataset(config)
  iterator = pipeline.eval_iterator(config)
  for index, batch in enumerate(iterator):
    if index >= batches:
      break
    zs, captured = jax.device_get(forward(params, task.inputs(batch)))
    masks = task.sparsity_masks(batch, batch["mask"])
    for key, z in zs.items():
      z = np.asarray(z)
      mask = masks[key.split("/")[0]] if isinstance(masks, Mapping) else masks
      mask = np.asarray(mask) > 0
      if mask.ndim == 1:  # Per example (ViT): every token of a real image.
        mask = np.broadcast_to(mask[:, None], z.shape[:2])
      # Boolean indexing keeps batch-major, then sequence order.
      active[names[key]].append(np.asarray(is_active(z[mask], activation)))
    examples.append(int(np.sum(np.asarray(batch["mask"]) > 0)))
    if index == 0:
      calib_io = {k: (np.asarray(x[:verify_examples]), np.asarray(y[:verify_examples]))
                  for k, (x, y) in captured.items()}
  if hasattr(iterator, "close"):
    iterator.close()
  if not examples:
    raise MissingRunError(f"{workdir}: its eval split gave no batch.")

  flat_params = traverse_util.flatten_dict(params)
  by_name = {names["/".join(p)]: p for p in paths}

  def verify(layer: str, perm: np.ndarray) -> tuple[float, float]:
    path = by_name[layer]
    module, kwargs = modules[path]
    sub = traverse_util.unflatten_dict({k[len(path):]: v for k, v in flat_params.items()
                                        if k[:len(path)] == path})
    x, y = calib_io["/".join(path)]
    y_perm = module.apply({"params": permute_units(sub, perm)}, jnp.asarray(x), **kwargs)
    return float(np.max(np.abs(np.asarray(y_perm) - y))), float(np.max(np.abs(y)))

  return RunData(workdir, config, step, activation, mixing, list(active), active,
                 examples, verify)


def _layer_name(path: Sequence[str]) -> str:
  path = list(path[:-1]) if path[-1] == "mlp" and len(path) > 1 else list(path)
  return "/".join(path)


# ----------------------------------------------------------------------------- report
def _kernel_numbers(q: float, p: float) -> dict[str, Any]:
  return {"q": q, "skipped": skipped_flop_shares(q), "ceiling": skipped_flop_shares(p),
          "speedup": speedup_bounds(q), "speedup_ceiling": speedup_bounds(p)}


def analyse(run: RunData, *, tiles: Sequence[Tile], kernel_tiles: Sequence[Tile],
            reorder_tiles: Sequence[Tile]) -> dict[str, Any]:
  """Every number of the report for one run (JSON-able, permutations as lists)."""
  layers = []
  for layer in run.layers:
    batches = run.active[layer]
    tokens = sum(a.shape[0] for a in batches)
    units = batches[0].shape[1]
    p = float(sum(a.sum() for a in batches) / max(tokens * units, 1))
    row: dict[str, Any] = {"layer": layer, "tokens": tokens, "d_ff": units, "density": p}
    row["dead_units"] = int(np.sum(~np.any(np.concatenate(batches), axis=0)))
    row["zero_block_share"] = {}
    row["tile_used"] = {}
    for tile in tiles:
      q = _share(block_counts(a, tile) for a in batches)
      row["zero_block_share"][tile_name(tile)] = 1.0 - q
      row["tile_used"][tile_name(tile)] = tile_name(clamp_tile(tile, (tokens, units)))
    row["kernel"] = {tile_name(t): _kernel_numbers(
        _share(block_counts(a, t) for a in batches), p) for t in kernel_tiles}
    row["reorder"] = {}
    if len(batches) > 1:
      calibration, held_out = batches[0], batches[1:]
    else:  # One batch only: in sample, and said so in the table's title.
      calibration, held_out = batches[0], batches[:1]
    for tile in reorder_tiles:
      gain = reorder_gain(calibration, held_out, tile)
      checks = [run.verify(layer, perm) for perm in gain["permutations"].values()]
      max_dy = max(c[0] for c in checks)
      p_held = float(sum(a.sum() for a in held_out) /
                     max(sum(a.size for a in held_out), 1))
      row["reorder"][tile_name(tile)] = {
          "zero_block_share": gain["zero_block_share"], "q": gain["q"],
          "held_out_tokens": sum(a.shape[0] for a in held_out),
          "density_held_out": p_held,
          "skipped_forward_backward": {k: skipped_flop_shares(v)["forward_backward"]
                                       for k, v in gain["q"].items()},
          "speedup_forward_backward": {k: speedup_bounds(v)["forward_backward"]
                                       for k, v in gain["q"].items()},
          "max_abs_dy": max_dy, "max_abs_y": max(c[1] for c in checks),
          "permutations": {k: v.tolist() for k, v in gain["permutations"].items()}}
    layers.append(row)
  return {"workdir": run.name, "model": run.config.model.name,
          "variant": run.config.variant, "activation": run.activation,
          "mixing": run.mixing, "step": run.step, "eval_batch_size":
          int(run.config.eval_batch_size), "batches": len(run.examples),
          "examples_per_batch": run.examples,
          "layers": layers, "mean": _mean_row(layers, tiles, kernel_tiles, reorder_tiles)}


def _mean_row(layers: list[dict[str, Any]], tiles: Sequence[Tile],
              kernel_tiles: Sequence[Tile], reorder_tiles: Sequence[Tile]
              ) -> dict[str, Any]:
  """Shares averaged over layers weighted by their MLP FLOPs (tokens x d_ff): the
  whole model's share; speedups follow from the mean shares."""
  w = [l["tokens"] * l["d_ff"] for l in layers]
  mean = lambda f: weighted_mean([f(l) for l in layers], w)
  p = mean(lambda l: l["density"])
  out = {"layer": "mean", "tokens": sum(l["tokens"] for l in layers),
         "d_ff": "", "density": p, "dead_units": sum(l["dead_units"] for l in layers),
         "zero_block_share": {tile_name(t): mean(lambda l, t=t: l["zero_block_share"][
             tile_name(t)]) for t in tiles},
         "kernel": {tile_name(t): _kernel_numbers(
             mean(lambda l, t=t: l["kernel"][tile_name(t)]["q"]), p)
                    for t in kernel_tiles},
         "reorder": {}}
  for tile in reorder_tiles:
    name = tile_name(tile)
    held_w = [l["reorder"][name]["held_out_tokens"] * l["d_ff"] for l in layers]
    qs = {k: weighted_mean([l["reorder"][name]["q"][k] for l in layers], held_w)
          for k in layers[0]["reorder"][name]["q"]}
    out["reorder"][name] = {
        "zero_block_share": {k: 1.0 - v for k, v in qs.items()}, "q": qs,
        "density_held_out": weighted_mean(
            [l["reorder"][name]["density_held_out"] for l in layers], held_w),
        "skipped_forward_backward": {k: skipped_flop_shares(v)["forward_backward"]
                                     for k, v in qs.items()},
        "speedup_forward_backward": {k: speedup_bounds(v)["forward_backward"]
                                     for k, v in qs.items()},
        "max_abs_dy": max(l["reorder"][name]["max_abs_dy"] for l in layers),
        "max_abs_y": max(l["reorder"][name]["max_abs_y"] for l in layers)}
  return out


def render(result: dict[str, Any], tiles: Sequence[Tile], kernel_tiles: Sequence[Tile],
           reorder_tiles: Sequence[Tile]) -> str:
  """The three tables of one run as text."""
  rows = result["layers"] + [result["mean"]]
  n = result["batches"]
  held = "batch 0 (in sample: only one batch)" if n == 1 else (
      f"batch{'es' if n > 2 else ''} 1{f'-{n - 1}' if n > 2 else ''}")
  lines = [
      f"== {result['workdir']}: {result['model']} {result['variant']}, activation "
      f"{result['activation']}" + (f" (mixing k={result['mixing']:.2f})"
                                   if result["activation"] == "mixed" else "") +
      f", step {result['step']}",
      f"   eval data: {n} batch{'es' if n > 1 else ''} of its eval split at "
      f"eval_batch_size {result['eval_batch_size']} (real examples "
      f"{result['examples_per_batch']}); real tokens only, batch-major then sequence; "
      "mean = FLOP-weighted (tokens x d_ff) over layers", ""]
  clamped = sorted({f"{t} -> {l['tile_used'][t]} (d_ff {l['d_ff']})" for l in
                    result["layers"] for t in l["tile_used"] if l["tile_used"][t] != t})
  scope = f"all {n} batches" if n > 1 else "the one batch"
  lines.append(f"Density p, units never active ('dead') and share of all-zero blocks per "
               f"tile (tokens x units), {scope}" +
               (f"; clamped: {', '.join(clamped)}" if clamped else ""))
  headers = ["layer", "tokens", "d_ff", "dead", "p"] + [tile_name(t) for t in tiles]
  lines.append(format_table(headers, [
      [r["layer"], r["tokens"], r["d_ff"], r["dead_units"], r["density"]] +
      [r["zero_block_share"][tile_name(t)] for t in tiles] for r in rows]))
  for tile in kernel_tiles:
    name = tile_name(tile)
    lines += ["", f"Kernel tile {name}: q = nonzero-block share; FLOP share skipped "
              "forward (fwd) and forward+backward (f+b), and FLOP-count speedups, each "
              "next to its ceiling from density p alone (tile 1x1)"]
    headers = ["layer", "q", "p", "fwd skip", "(ceil)", "f+b skip", "(ceil)",
               "fwd speedup", "(ceil)", "f+b speedup", "(ceil)"]
    table = []
    for r in rows:
      k = r["kernel"][name]
      table.append([r["layer"], k["q"], r["density"], k["skipped"]["forward"],
                    k["ceiling"]["forward"], k["skipped"]["forward_backward"],
                    k["ceiling"]["forward_backward"], k["speedup"]["forward"],
                    k["speedup_ceiling"]["forward"], k["speedup"]["forward_backward"],
                    k["speedup_ceiling"]["forward_backward"]])
    lines.append(format_table(headers, table))
  for tile in reorder_tiles:
    name = tile_name(tile)
    lines += ["", f"Reordering at tile {name}: unit permutations computed on batch 0 "
              f"(calibration), measured on held-out {held}; 'freq' = units sorted by "
              "activation frequency, 'coact' = greedy co-activation grouping (rare "
              "first), 'tok' = per-batch token sort by unit-tile activity (run-time "
              "gather/scatter), 'c+tok' = coact then tok; 'coact@cal' = coact in "
              "sample on batch 0; "
              "max|dy| = largest change of the MLP output y over both unit "
              "permutations (function unchanged), vs max|y|",
              "Columns: p of the held-out batches | all-zero block share (natural .. "
              "coact@cal) | fwd+bwd FLOP share skipped | fwd+bwd speedup | check"]
    headers = ["layer", "p held", "natural", "freq", "coact", "tok", "c+tok",
               "coact@cal", "skip nat", "skip coact", "skip c+tok", "x nat", "x c+tok",
               "max|dy|", "max|y|"]
    table = []
    for r in rows:
      g = r["reorder"][name]
      zb, sk, sp = (g["zero_block_share"], g["skipped_forward_backward"],
                    g["speedup_forward_backward"])
      table.append([r["layer"], g["density_held_out"], zb["natural"], zb["frequency"],
                    zb["coactivation"], zb["tokens"], zb["coactivation+tokens"],
                    zb["coactivation_calib"], sk["natural"], sk["coactivation"],
                    sk["coactivation+tokens"], sp["natural"], sp["coactivation+tokens"],
                    f"{g['max_abs_dy']:.1e}", f"{g['max_abs_y']:.2f}"])
    lines.append(format_table(headers, table))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs", nargs="+", default=list(DEFAULT_WORKDIRS),
                      help="trained sparse_jax workdirs (default: the four tiny runs)")
  parser.add_argument("--batches", type=int, default=4,
                      help="eval batches per workdir; the first calibrates the "
                      "reordering, the rest measure it (default 4)")
  parser.add_argument("--eval_batch_size", type=int, default=32,
                      help="examples per eval batch (default 32; 0 = the run's own)")
  parser.add_argument("--kernel_tiles", type=parse_tile, nargs="+",
                      default=list(KERNEL_TILES),
                      help="the kernels' (tokens x units) tiles (default: TPU 128x128, "
                      "GPU 64x64)")
  parser.add_argument("--tiles", type=parse_tile, nargs="+", default=list(TILES),
                      help="tiles of the all-zero block table")
  parser.add_argument("--reorder_tiles", type=parse_tile, nargs="+",
                      default=list(REORDER_TILES), help="tiles the reordering targets")
  parser.add_argument("--verify_examples", type=int, default=8,
                      help="calibration examples the permutation check runs on")
  parser.add_argument("--json", help="write every row to this JSON file")
  args = parser.parse_args(argv)
  if args.batches < 1:
    parser.error("--batches must be >= 1")

  try:
    missing = []
    for workdir in args.workdirs:
      try:
        check_workdir(workdir)
      except MissingRunError as e:
        missing.append(str(e))
    if missing:
      raise MissingRunError("\n".join(missing))
    results = []
    for workdir in args.workdirs:
      start = time.time()
      run = collect(workdir, batches=args.batches,
                    eval_batch_size=args.eval_batch_size or None,
                    verify_examples=args.verify_examples)
      result = analyse(run, tiles=args.tiles, kernel_tiles=args.kernel_tiles,
                       reorder_tiles=args.reorder_tiles)
      result["seconds"] = time.time() - start
      results.append(result)
      print(render(result, args.tiles, args.kernel_tiles, args.reorder_tiles),
            end="\n\n", flush=True)
  except MissingRunError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"kernel_tiles": [tile_name(t) for t in args.kernel_tiles],
                 "tiles": [tile_name(t) for t in args.tiles],
                 "reorder_tiles": [tile_name(t) for t in args.reorder_tiles],
                 "runs": results}, f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
