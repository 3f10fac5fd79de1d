"""Finetuning for sparsity: start a run from another run's checkpoint, with LoRA.

The source is the workdir of a run of the same architecture (typically the vanilla
variant). Its params are read, without its optimizer state, straight into the new
run's shardings; params the new model has and the source lacks (zeroth biases) keep
their initial values (zeros), so with the mixed activation at k = 0 the finetune run
starts as exactly the source model. LoRA factors (`transforms.lora`) are added beside
the kernels `finetune.lora_targets` selects, with logical axes derived from the kernel's.

Everything here is checked before anything compiles: the source exists, holds a
checkpoint, was the same architecture (its config.json, then every param's shape), and
the LoRA rank fits every adapted kernel.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import run_files
from sparse_jax.errors import ConfigError
from sparse_jax.transforms import lora

# Model keys a finetune may change without changing the source's parameters
# (tie_embeddings=False adds one, started from the source's embedding).
MODEL_KEYS_FREE_TO_DIFFER = ("dropout_rate", "attention_dropout_rate", "dtype",
                             "tie_embeddings")
# T5's untied output kernel and the tied embedding it starts from (its transpose).
LM_HEAD, EMBEDDING = ("lm_head", "kernel"), ("token_embedder", "embedding")
Path = tuple[str, ...]


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.finetune.checkpoint)


def _source_dir(config) -> epath.Path:
  return epath.Path(config.finetune.checkpoint)


def _fix_source() -> str:
  return ("Fix: pass --config.finetune.checkpoint=<workdir of a finished run of the same "
          "model>, e.g. the vanilla run's --workdir.")


def source_step(config: ml_collections.ConfigDict) -> int:
  """The source checkpoint's step (the latest unless finetune.checkpoint_step is set)."""
  root = _source_dir(config) / "checkpoints"
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if (
      root.exists()) else []
  if not steps:
    raise ConfigError(f"finetune.checkpoint={config.finetune.checkpoint}: no checkpoint in "
                      f"{root} (has that run saved one yet?).\n{_fix_source()}")
  wanted = config.finetune.checkpoint_step
  if wanted < 0:
    return steps[-1]
  if wanted not in steps:
    raise ConfigError(f"finetune.checkpoint_step={wanted}: {root} holds steps {steps}.\n"
                      f"Fix: pass --config.finetune.checkpoint_step={steps[-1]} (or -1 for "
                      "the latest).")
  return wanted


def check_source(config: ml_collections.ConfigDict) -> None:
  """ConfigError unless the source run exists, has a checkpoint and was the same model
  (and a finetune config names one). Reads only config.json and directory listings;
  `--dry_run` skips it, so a finetune config can be sized without its checkpoint."""
  f = config.finetune
  if not f.checkpoint:
    if config.variant == "finetune":
      raise ConfigError(
          "The finetune variant starts from another run's checkpoint, and "
          f"config.finetune.checkpoint is empty.\n{_fix_source()}")
    if f.lora_rank > 0 or f.trainable:
      raise ConfigError("finetune.lora_rank / finetune.trainable are set but "
                        "finetune.checkpoint is empty: there are no pretrained weights "
                        f"to adapt.\n{_fix_source()}")
    return
  src = _source_dir(config)
  saved = src / "config.json"
  if not saved.exists():
    raise ConfigError(f"finetune.checkpoint={config.finetune.checkpoint} is not a "
                      f"sparse_jax workdir (no {saved}).\n{_fix_source()}")
  source_model = run_files.read_json(saved).get("model", {})
  model = config.model.to_dict()
  diff = sorted(k for k in source_model.keys() | model.keys()
                if k not in MODEL_KEYS_FREE_TO_DIFFER and
                _plain(source_model.get(k)) != _plain(model.get(k)))
  if diff:
    shown = "; ".join(f"model.{k}: {source_model.get(k)!r} there, {model.get(k)!r} here"
                      for k in diff[:5])
    raise ConfigError(f"finetune.checkpoint={config.finetune.checkpoint} is a different "
                      f"architecture ({shown}).\nFix: finetune from a run of this model, "
                      "or set the model keys to the source's (see its config.json).")
  source_step(config)


def _plain(value):
  return list(value) if isinstance(value, tuple) else value


def _manager(config) -> ocp.CheckpointManager:
  # The input positions item ('data') is registered only so orbax does not warn about it.
  return ocp.CheckpointManager(_source_dir(config) / "checkpoints",
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "data": ocp.StandardCheckpointHandler(),
                                              "checksums": ocp.JsonCheckpointHandler()})


def source_param_shapes(config: ml_collections.ConfigDict) -> dict[Path, tuple[int, ...]]:
  """Path -> shape of every param in the source checkpoint (metadata only)."""
  step = source_step(config)
  manager = _manager(config)
  try:
    metadata = manager.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise ckpt_lib.damaged_checkpoint(
        _source_dir(config) / "checkpoints" / str(step),
        f"orbax cannot read its metadata ({ckpt_lib.read_failure(e)})",
        _FIX_DAMAGED_SOURCE) from None
  finally:
    manager.close()
  flat = traverse_util.flatten_dict(dict(metadata["params"]))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_params_fit(source: dict[Path, tuple[int, ...]], target_params: Any,
                     checkpoint: str) -> None:
  """ConfigError if a source param is missing from the model or has another shape."""
  target = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(target_params).items()}
  missing = [p for p in source if p not in target]
  reshaped = [p for p in source if p in target and source[p] != target[p]]
  if missing or reshaped:
    shown = [f"{'/'.join(p)} is not in this model" for p in missing[:3]]
    shown += [f"{'/'.join(p)} is {source[p]} there, {target[p]} here" for p in reshaped[:3]]
    raise ConfigError(f"The checkpoint in {checkpoint} does not fit this model: "
                      f"{'; '.join(shown)}.\nFix: finetune from a run of the same "
                      "architecture (model.* as in its config.json).")


def load_source_params(config: ml_collections.ConfigDict, param_shapes: Any,
                       param_shardings: Any) -> dict[Path, jax.Array]:
  """The source's params (flat, path -> array), each read into the shardings the same
  path has in this run. An untied output kernel the source lacks (T5,
  `model.tie_embeddings=False` from a tied run) is the source's embedding, transposed:
  the finetune starts from the source's function."""
  source = source_param_shapes(config)
  check_params_fit(source, param_shapes, config.finetune.checkpoint)
  shapes = traverse_util.flatten_dict(param_shapes)
  shardings = traverse_util.flatten_dict(param_shardings)
  target = traverse_util.unflatten_dict({
      p: jax.ShapeDtypeStruct(shapes[p].shape, shapes[p].dtype, sharding=shardings[p])
      for p in source})
  item = {"params": target}
  step = source_step(config)
  manager = _manager(config)
  items = {"state": ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)}
  step_dir = _source_dir(config) / "checkpoints" / str(step)
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
    ckpt_lib.check_checksums(step_dir, params, saved[1:1 + len(jax.tree.leaves(params))],
                             _FIX_DAMAGED_SOURCE)
  params = traverse_util.flatten_dict(params)
  if LM_HEAD in shapes and LM_HEAD not in source and EMBEDDING in params:
    params[LM_HEAD] = jax.jit(jnp.transpose, out_shardings=shardings[LM_HEAD])(
        params[EMBEDDING])
  return params


_FIX_DAMAGED_SOURCE = ("restore that directory from a backup, or pass "
                       "--config.finetune.checkpoint_step=<an earlier step of the source>")


# ----------------------------------------------------------------------------- LoRA
def input_dims(names: tuple[str | None, ...]) -> int:
  """How many leading kernel dims are inputs, from the logical axis names: one when the
  kernel reads the residual stream ('embed' first: W1, queries, head), otherwise all
  but the last (W2 [mlp, embed], attention output [heads, kv, embed])."""
  return 1 if names[0] == "embed" or len(names) == 2 else len(names) - 1


def _names(boxed: Any) -> dict[Path, tuple]:
  flat = traverse_util.flatten_dict(
      jax.tree.map(lambda b: b.names if isinstance(b, nn.Partitioned) else None, boxed,
                   is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  return flat


def lora_splits(config: ml_collections.ConfigDict, boxed: Any) -> dict[Path, int]:
  """Kernel path -> number of input dims, for every kernel that gets an adapter."""
  regex = re.compile(config.finetune.lora_targets)
  names = _names(boxed)
  return {p: input_dims(n) for p, n in names.items()
          if p[-1] == "kernel" and n is not None and regex.search("/".join(p))}


def add_adapters(config: ml_collections.ConfigDict, params: Any, splits: dict[Path, int],
                 rng: jax.Array) -> Any:
  """params with LoRA factors beside the kernels in `splits` (ConfigError on a bad rank)."""
  try:
    return lora.add_adapters(params, rng, config.finetune.lora_rank,
                             lambda path, _: path in splits,
                             lambda path, _: splits[path])
  except ValueError as e:
    if "rank" in str(e):
      raise ConfigError(f"{e}\nFix: pass a smaller --config.finetune.lora_rank, or "
                        "narrow --config.finetune.lora_targets.") from None
    raise ConfigError(f"finetune.lora_targets={config.finetune.lora_targets!r} matches "
                      "no kernel.\nFix: use a regex on the kernel paths that --dry_run "
                      "lists, e.g. 'mlp/w[io]/kernel'.") from None


def boxed_with_adapters(config: ml_collections.ConfigDict, boxed: Any) -> Any:
  """Abstract boxed params with LoRA factors whose logical axes follow their kernel's:
  A gets the input axes and an unsharded rank axis, B the rank axis and output axes."""
  splits = lora_splits(config, boxed)
  params = nn.unbox(boxed)
  shapes = jax.eval_shape(lambda: add_adapters(config, params, splits, jax.random.key(0)))
  names = _names(boxed)
  flat_boxed = traverse_util.flatten_dict(
      boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    if path[-1] not in (lora.LORA_A, lora.LORA_B):
      continue
    kernel = path[:-1] + ("kernel",)
    split = splits[kernel]
    axes = (names[kernel][:split] + (None,) if path[-1] == lora.LORA_A
            else (None,) + names[kernel][split:])
    flat_boxed[path] = nn.Partitioned(leaf, names=axes)
  return traverse_util.unflatten_dict(flat_boxed)
