"""Finetuning for sparsity: start a run from a pretrained model, with LoRA.

The pretrained model is a finetune source (`sparse_jax.pretrained`): a sparse_jax
workdir of the same architecture (typically the vanilla run) or a public checkpoint
(`hf:<dir>`: a Hugging Face T5), resolved once from `finetune.checkpoint` into an
object the trainer asks for the model config, the params and the export. Params the
new model has and the source lacks (zeroth biases) keep their initial values (zeros),
so with the mixed activation at k = 0 the finetune run starts as exactly the source
model. LoRA factors (`transforms.lora`) are added beside the kernels
`finetune.lora_targets` selects, with logical axes derived from the kernel's.

Everything here is checked before anything compiles: the source exists, holds a
checkpoint, fits the model (its config, then every param's shape), and the LoRA rank
fits every adapted kernel.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from flax import traverse_util

from sparse_jax import pretrained
from sparse_jax.errors import ConfigError
from sparse_jax.pretrained.native import FIX_SOURCE
from sparse_jax.transforms import lora

Path = tuple[str, ...]


def enabled(config: ml_collections.ConfigDict) -> bool:
  return bool(config.finetune.checkpoint)


def source(config: ml_collections.ConfigDict) -> pretrained.Source | None:
  """The finetune source `finetune.checkpoint` names (None when not finetuning)."""
  if not enabled(config):
    return None
  return pretrained.resolve(config.finetune.checkpoint, config.finetune.checkpoint_step)


def configured(config: ml_collections.ConfigDict
               ) -> tuple[ml_collections.ConfigDict, pretrained.Source | None]:
  """(the config to run, its source): the source resolved once and asked for the
  model config it decides. ConfigError unless the finetune keys are consistent, the
  source exists, holds a checkpoint and fits the config. Reads config files, directory
  listings and tensor shapes; `--dry_run` uses it only for a public source it can read,
  so a finetune config can be sized without its checkpoint."""
  f = config.finetune
  if not f.checkpoint:
    if config.variant == "finetune":
      raise ConfigError(
          "The finetune variant starts from another run's checkpoint, and "
          f"config.finetune.checkpoint is empty.\n{FIX_SOURCE}")
    if f.lora_rank > 0 or f.trainable:
      raise ConfigError("finetune.lora_rank / finetune.trainable are set but "
                        "finetune.checkpoint is empty: there are no pretrained weights "
                        f"to adapt.\n{FIX_SOURCE}")
    return config, None
  resolved = source(config)
  return resolved.configure(config), resolved


def check_source(config: ml_collections.ConfigDict) -> None:
  """ConfigError as `configured` raises it (the checks without the result)."""
  configured(config)


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
