"""What every finetune source is: a pretrained model in some on-disk format, resolved once.

A `Source` knows its format and location, the model config its weights need (layers,
widths, vocabulary, activation), the tokenizer it ships, how to read its params into a
run's shardings, and how to write a finetuned model back in its own layout. The trainer
asks it these things and nothing else, so adding a format is one module of this package.
"""
import abc
import copy
import dataclasses
from typing import Any, Callable, ClassVar

import jax
import ml_collections
from flax import traverse_util

from sparse_jax.errors import ConfigError

Path = tuple[str, ...]
Shapes = dict[Path, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Source(abc.ABC):
  """A pretrained model a finetune starts from.

  Attributes:
    location: the path (local or gs://) as the user gave it, without a format prefix.
    step: which checkpoint of a run with several (-1 = the latest); formats holding one
      model ignore it.
  """
  location: str
  step: int = -1

  format: ClassVar[str] = ""  # The prefix naming it: --config.finetune.checkpoint=<format>:<path>.

  @abc.abstractmethod
  def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with what the source decides (model shape, activation, tokenizer).

    Raises ConfigError, before anything is compiled, when the source is missing or
    unreadable or `config` cannot run it (another model family, a different
    architecture where the format cannot override it)."""

  @abc.abstractmethod
  def param_shapes(self) -> Shapes:
    """Our param path -> shape of every tensor the source holds (metadata only)."""

  @abc.abstractmethod
  def read_params(self, shapes: Any, shardings: Any) -> dict[Path, jax.Array]:
    """The source's params (flat, our path -> array) placed in the `shardings` the same
    path has in the run (`shapes`: the run's abstract params). Raises ConfigError naming
    the first tensor that does not fit the model."""

  @abc.abstractmethod
  def export(self, params: Any, config: ml_collections.ConfigDict, directory: str) -> str:
    """Writes `params` (plain, LoRA merged) of a run of `config` to `directory` in this
    source's layout and returns where the model is."""

  def describe(self) -> str:
    return f"{self.format}:{self.location}"

  def tensor_name(self, path: Path) -> str:
    """How the source names the tensor of our param `path` (for messages)."""
    return "/".join(path)


def with_mixing_source(config: ml_collections.ConfigDict,
                       activation: str) -> ml_collections.ConfigDict:
  """`config` with sparsity.mixing_source set to the source's `activation` where unset:
  the 'mixed' activation starts as the source's own function."""
  if config.sparsity.get("mixing_source", "") or activation == "relu":
    return config  # Unset means ReLU: config.json stays as it was for ReLU sources.
  return with_updates(config, {"sparsity.mixing_source": activation})


def check_mixing_completes(config: ml_collections.ConfigDict) -> None:
  """ConfigError if a run ends before its 'mixed' activation is all J-SquaredReLU: a
  public format's export names one activation, and a partial mix has none. Checked when
  the source is configured, not when the run ends."""
  s = config.sparsity
  if s.activation == "mixed" and config.num_steps < s.activation_mixing_steps:
    raise ConfigError(
        f"num_steps={config.num_steps} ends before the activation is all J-SquaredReLU "
        f"(sparsity.activation_mixing_steps={s.activation_mixing_steps}), so the export "
        f"in the source's format could not name it.\nFix: pass "
        f"--config.sparsity.activation_mixing_steps={config.num_steps} (or fewer), or "
        "more --config.num_steps.")


def with_updates(config: ml_collections.ConfigDict, updates: dict[str, Any]
                 ) -> ml_collections.ConfigDict:
  """A copy of `config` with {'model.d_model': 768, ...} set (keys must exist)."""
  config = copy.deepcopy(config)
  for key, value in updates.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def host_params(params: Any) -> Any:
  """`params` as numpy arrays on this host, gathered from every process's shards (a
  collective when there are several processes: every process must call it)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


def check_params_fit(source: Source, shapes: Shapes, target_params: Any,
                     fix: str) -> None:
  """ConfigError naming the first source tensor missing from the model or of another
  shape (`shapes`: the source's, by our paths), and why."""
  target = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(target_params).items()}
  for path, shape in shapes.items():
    name = source.tensor_name(path)
    if path not in target:
      why = f"{name} has no place in this model (no param {'/'.join(path)})"
    elif shape != target[path]:
      why = (f"{name} is {shape} there, but {'/'.join(path)} is {target[path]} in this "
             "model")
    else:
      continue
    raise ConfigError(f"The checkpoint {source.describe()} does not fit this model: "
                      f"{why}.\n{fix}")


def placed(reader: Callable[[Path], Any], paths, shapes: Any,
           shardings: Any) -> dict[Path, jax.Array]:
  """{path: reader(path) as an array of the run's dtype, placed in its sharding}."""
  flat_shapes = traverse_util.flatten_dict(shapes)
  flat_shardings = traverse_util.flatten_dict(shardings)
  return {p: jax.device_put(reader(p).astype(flat_shapes[p].dtype), flat_shardings[p])
          for p in paths}
