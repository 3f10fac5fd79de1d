"""sparse_jax's own run workdirs as finetune sources (`native:<workdir>`, the default).

The source is the workdir of a run of the same architecture (typically the vanilla
variant): its config.json must describe the same model, and its latest (or
`finetune.checkpoint_step`'s) orbax checkpoint is read without its optimizer state.
An untied output kernel the source lacks (T5, `model.tie_embeddings=False` from a tied
run) starts as the source's embedding, transposed, so the finetune starts from the
source's function. The export is an orbax checkpoint of the plain params tree.
"""
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import config_schema, run_files
from sparse_jax.errors import ConfigError
from sparse_jax.ops.activations import SOURCE_ACTIVATIONS
from sparse_jax.pretrained import base

# Model keys a finetune may change without changing the source's parameters
# (tie_embeddings=False adds one, started from the source's embedding).
MODEL_KEYS_FREE_TO_DIFFER = ("dropout_rate", "attention_dropout_rate", "dtype",
                             "tie_embeddings")
# T5's untied output kernel and the tied embedding it starts from (its transpose).
LM_HEAD, EMBEDDING = ("lm_head", "kernel"), ("token_embedder", "embedding")
FIX_SOURCE = ("Fix: pass --config.finetune.checkpoint=<workdir of a finished run of the "
              "same model>, e.g. the vanilla run's --workdir.")
_FIX_DAMAGED_SOURCE = ("restore that directory from a backup, or pass "
                       "--config.finetune.checkpoint_step=<an earlier step of the source>")


def is_workdir(location: str) -> bool:
  """Whether `location` looks like a sparse_jax run (its config.json has a 'model')."""
  saved = epath.Path(location) / run_files.CONFIG_FILE
  try:
    return saved.exists() and "model" in (run_files.read_json(saved) or {})
  except ConfigError:  # A damaged config.json: still a workdir, named by configure().
    return True


class NativeSource(base.Source):
  """A sparse_jax workdir: same architecture, params read from an orbax checkpoint."""
  format: ClassVar[str] = "native"

  @property
  def _dir(self) -> epath.Path:
    return epath.Path(self.location)

  def describe(self) -> str:
    return self.location

  def checkpoint_step(self) -> int:
    """The source checkpoint's step (the latest unless `step` is set)."""
    root = self._dir / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if (
        root.exists()) else []
    if not steps:
      raise ConfigError(f"finetune.checkpoint={self.location}: no checkpoint in "
                        f"{root} (has that run saved one yet?).\n{FIX_SOURCE}")
    if self.step < 0:
      return steps[-1]
    if self.step not in steps:
      raise ConfigError(f"finetune.checkpoint_step={self.step}: {root} holds steps "
                        f"{steps}.\nFix: pass --config.finetune.checkpoint_step="
                        f"{steps[-1]} (or -1 for the latest).")
    return self.step

  def saved_config(self) -> dict[str, Any]:
    saved = self._dir / run_files.CONFIG_FILE
    if not saved.exists():
      raise ConfigError(f"finetune.checkpoint={self.location} is not a sparse_jax "
                        f"workdir (no {saved}).\n{FIX_SOURCE}")
    return run_files.read_json(saved)

  def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks that the run is the same model (its config.json) and holds a checkpoint;
    the mixed activation starts from the source's."""
    saved = self.saved_config()
    # Model keys the schema gained after the source run was saved are its defaults.
    defaults = config_schema.defaults_for(config).model.to_dict()
    source_model = {k: v for k, v in defaults.items() if k in config.model} | saved.get(
        "model", {})
    model = config.model.to_dict()
    diff = sorted(k for k in source_model.keys() | model.keys()
                  if k not in MODEL_KEYS_FREE_TO_DIFFER and
                  _plain(source_model.get(k)) != _plain(model.get(k)))
    if diff:
      shown = "; ".join(f"model.{k}: {source_model.get(k)!r} there, {model.get(k)!r} here"
                        for k in diff[:5])
      raise ConfigError(f"finetune.checkpoint={self.location} is a different "
                        f"architecture ({shown}).\nFix: finetune from a run of this "
                        "model, or set the model keys to the source's (see its "
                        "config.json).")
    self.checkpoint_step()
    activation = saved.get("sparsity", {}).get("activation", "relu")
    if activation == "mixed":
      activation = saved["sparsity"].get("mixing_source") or "relu"
    return base.with_mixing_source(
        config, activation if activation in SOURCE_ACTIVATIONS else "relu")

  def _manager(self) -> ocp.CheckpointManager:
    # The input positions item ('data') is registered only so orbax does not warn.
    return ocp.CheckpointManager(self._dir / "checkpoints",
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                "data": ocp.StandardCheckpointHandler(),
                                                "checksums": ocp.JsonCheckpointHandler()})

  def param_shapes(self) -> base.Shapes:
    step = self.checkpoint_step()
    manager = self._manager()
    try:
      metadata = manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt_lib.damaged_checkpoint(
          self._dir / "checkpoints" / str(step),
          f"orbax cannot read its metadata ({ckpt_lib.read_failure(e)})",
          _FIX_DAMAGED_SOURCE) from None
    finally:
      manager.close()
    flat = traverse_util.flatten_dict(dict(metadata["params"]))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}

  def read_params(self, shapes: Any, shardings: Any) -> dict[base.Path, jax.Array]:
    source = self.param_shapes()
    base.check_params_fit(self, source, shapes,
                          "Fix: finetune from a run of the same architecture (model.* "
                          "as in its config.json).")
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_shardings = traverse_util.flatten_dict(shardings)
    target = traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(flat_shapes[p].shape, flat_shapes[p].dtype,
                                sharding=flat_shardings[p])
        for p in source})
    item = {"params": target}
    step = self.checkpoint_step()
    manager = self._manager()
    items = {"state": ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)}
    step_dir = self._dir / "checkpoints" / str(step)
    if (step_dir / "checksums").exists():
      items["checksums"] = ocp.args.JsonRestore()
    try:
      restored = ckpt_lib.restore_or_fail(manager, step, items, step_dir,
                                          _FIX_DAMAGED_SOURCE)
    finally:
      manager.close()
    params = restored["state"]["params"]
    if "checksums" in items:
      # The saved state is TrainState(step, params, opt_state): its params' rows follow
      # the step's, in the same (sorted dict) order as the params restored here.
      saved = restored["checksums"]["leaves"]
      ckpt_lib.check_checksums(step_dir, params,
                               saved[1:1 + len(jax.tree.leaves(params))],
                               _FIX_DAMAGED_SOURCE)
    params = traverse_util.flatten_dict(params)
    if LM_HEAD in flat_shapes and LM_HEAD not in source and EMBEDDING in params:
      params[LM_HEAD] = jax.jit(jnp.transpose, out_shardings=flat_shardings[LM_HEAD])(
          params[EMBEDDING])
    return params

  def export(self, params: Any, config: ml_collections.ConfigDict, directory: str) -> str:
    ckpt_lib.export_params(epath.Path(directory), params)
    return str(directory)


def _plain(value):
  return list(value) if isinstance(value, tuple) else value
