"""LoRA adapters as pure transforms of a parameter tree (any Flax model).

Each selected kernel W gets two factors stored beside it in the same tree,
`lora_a` (W's input dims + [r]) and `lora_b` ([r] + W's output dims); the model runs
on `merge(params)`, where W_eff = W + (A B) / r. B starts at zero, so a pretrained
model starts exactly where it was. Because the factors live next to their kernels,
a LoRA tree can be checkpointed, sharded (logical axes follow W's) and masked like
any params tree, and `merge` also gives the plain weights for export.

  lora_params = lora.add_adapters(params, rng, rank=8, predicate=lora.path_predicate("mlp"))
  logits = model.apply({"params": lora.merge(lora_params)}, x)
  tx = optax.multi_transform({"train": optax.adamw(1e-3), "freeze": optax.set_to_zero()},
                             lora.trainable_labels(lora_params, r"bias$|scale$"))
"""
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

Params = Any
Path = tuple[str, ...]
LORA_A, LORA_B = "lora_a", "lora_b"


def path_predicate(pattern: str) -> Callable[[Path, tuple[int, ...]], bool]:
  """Selects `kernel` params whose '/'-joined path matches the regex `pattern`."""
  regex = re.compile(pattern)
  return lambda path, shape: path[-1] == "kernel" and bool(regex.search("/".join(path)))


def first_axis_is_input(path: Path, shape: tuple[int, ...]) -> int:
  """Default split of a kernel into (input dims, output dims): one input dim."""
  del path, shape
  return 1


def add_adapters(params: Params, rng: jax.Array, rank: int,
                 predicate: Callable[[Path, tuple[int, ...]], bool],
                 input_dims: Callable[[Path, tuple[int, ...]], int] = first_axis_is_input
                 ) -> Params:
  """Adds `lora_a` / `lora_b` beside every kernel the predicate selects.

  A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch LoRA's Kaiming init), B = 0.

  Args:
    params: a params tree (nested dicts).
    rng: key for the A factors.
    rank: r, at most min(fan_in, fan_out) of every selected kernel.
    predicate: (path, shape) -> whether that kernel gets an adapter.
    input_dims: (path, shape) -> how many leading dims of the kernel are inputs
      (e.g. 2 for an attention output kernel [heads, head_dim, d_model]).

  Raises:
    ValueError: when nothing is selected or the rank does not fit a kernel.
  """
  flat = traverse_util.flatten_dict(params)
  selected = [p for p, v in flat.items() if predicate(p, tuple(v.shape))]
  if not selected:
    raise ValueError("LoRA: no kernel matched the target rule, so there is nothing to "
                     "adapt; check the pattern against the parameter paths.")
  out = dict(flat)
  for path, key in zip(selected, jax.random.split(rng, len(selected))):
    shape = tuple(flat[path].shape)
    split = input_dims(path, shape)
    fan_in, fan_out = _size(shape[:split]), _size(shape[split:])
    check_rank(rank, path, fan_in, fan_out)
    bound = 1.0 / fan_in ** 0.5
    out[path[:-1] + (LORA_A,)] = jax.random.uniform(key, shape[:split] + (rank,),
                                                    jnp.float32, -bound, bound)
    out[path[:-1] + (LORA_B,)] = jnp.zeros((rank,) + shape[split:], jnp.float32)
  return traverse_util.unflatten_dict(out)


def _size(dims: tuple[int, ...]) -> int:
  n = 1
  for d in dims:
    n *= d
  return n


def check_rank(rank: int, path: Path, fan_in: int, fan_out: int) -> None:
  """ValueError unless 1 <= rank <= min(fan_in, fan_out)."""
  limit = min(fan_in, fan_out)
  if not 1 <= rank <= limit:
    raise ValueError(f"LoRA rank {rank} does not fit {'/'.join(path)} ({fan_in} inputs x "
                     f"{fan_out} outputs): it must be between 1 and {limit}.")


def merge(params: Params) -> Params:
  """The plain params: every kernel with adapters becomes W + (A B) / r, and the
  factors are dropped. A tree without adapters is returned as is (same object)."""
  flat = traverse_util.flatten_dict(params)
  if not any(p[-1] == LORA_A for p in flat):
    return params
  out = {p: v for p, v in flat.items() if p[-1] not in (LORA_A, LORA_B)}
  for path, a in flat.items():
    if path[-1] != LORA_A:
      continue
    b = flat[path[:-1] + (LORA_B,)]
    kernel_path = path[:-1] + ("kernel",)
    kernel = out[kernel_path]
    rank = a.shape[-1]
    delta = jnp.tensordot(a, b, axes=1) / rank
    out[kernel_path] = kernel + delta.astype(kernel.dtype)
  return traverse_util.unflatten_dict(out)


def has_adapters(params: Params) -> bool:
  """Whether the tree holds LoRA factors."""
  return any(p[-1] == LORA_A for p in traverse_util.flatten_dict(params))


def trainable_labels(params: Params, trainable: str) -> Params:
  """'train' for LoRA factors and params whose path matches the regex `trainable`
  ('' = none besides the factors), 'freeze' for the rest: labels for
  `optax.multi_transform`, so frozen params carry no optimizer state."""
  regex = re.compile(trainable) if trainable else None

  def label(path, _):
    names = tuple(str(getattr(k, "key", k)) for k in path)
    if names[-1] in (LORA_A, LORA_B):
      return "train"
    if regex is not None and regex.search("/".join(names)):
      return "train"
    return "freeze"

  return jax.tree_util.tree_map_with_path(label, params)
