"""Which modules of a Flax Linen model are MLP blocks, for `sparsify` and friends.

A rule (`MlpRule`) matches a bound module by any of:

* type: `isinstance(module, types)`, or its class name is in `class_names`;
* name pattern: a regex searched in the module's '/'-joined path (`Block_0/MlpBlock_0`);
* predicate: any `callable(module) -> bool`.

The default matches classes named `MlpBlock`, `MLPBlock`, `Mlp`, `MLP` or `FeedForward`,
the names of the Transformer MLP in the Flax examples (wmt, lm1b), big_vision's ViT and
most Linen code: a module holding two `nn.Dense` with an activation between them (or
three, gated: `sparsify_block` says which shapes the rewrite supports).

Types cannot be read off a parameter tree, so the paths of the matched blocks are found
by tracing the model's init shape-only (`find_mlp_blocks`, nothing is computed); from
them `mlp_kernel_predicate` selects the kernels of those blocks for `noisy_apply`.

This module knows nothing of the wrapper that uses it (`transforms.sparsify`): a module
that wraps another and carries its own rule says so through `mlp_rule_target()`.
"""
import dataclasses
import re
from typing import Callable

import flax.linen as nn
import jax

Path = tuple[str, ...]
DEFAULT_CLASS_NAMES = ("MlpBlock", "MLPBlock", "Mlp", "MLP", "FeedForward")


@dataclasses.dataclass(frozen=True)
class MlpRule:
  """Matches MLP blocks by type, class name, path regex or predicate (any of them).

  Attributes:
    types: module classes (subclasses match too).
    class_names: exact class names (for classes you cannot import).
    path_pattern: regex searched in the module's '/'-joined path.
    predicate: callable(bound module) -> bool.
  """
  types: tuple[type, ...] = ()
  class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
  path_pattern: str | None = None
  predicate: Callable[[nn.Module], bool] | None = None

  def matches(self, module: nn.Module) -> bool:
    """Whether the bound `module` is an MLP block under this rule."""
    if self.types and isinstance(module, self.types):
      return True
    if type(module).__name__ in self.class_names:
      return True
    if self.path_pattern is not None and re.search(self.path_pattern,
                                                   "/".join(module.path)):
      return True
    return self.predicate is not None and bool(self.predicate(module))

  def describe(self) -> str:
    """The rule in words, for error messages."""
    parts = []
    if self.types:
      parts.append("type " + " or ".join(t.__name__ for t in self.types))
    if self.class_names:
      parts.append("class name in " + repr(list(self.class_names)))
    if self.path_pattern is not None:
      parts.append(f"path matching {self.path_pattern!r}")
    if self.predicate is not None:
      parts.append(f"predicate {getattr(self.predicate, '__name__', self.predicate)}")
    return " or ".join(parts) or "nothing"


Match = MlpRule | type | tuple[type, ...] | str | Callable[[nn.Module], bool] | None


def mlp_rule(match: Match = None) -> MlpRule:
  """Normalises a `match` argument: None (default rule), a Module class (Linen or NNX)
  or tuple of classes, a regex on the module path, a predicate on the module, or an
  `MlpRule`."""
  if match is None:
    return MlpRule()
  if isinstance(match, MlpRule):
    return match
  if isinstance(match, type):  # A Linen or an NNX Module class.
    return MlpRule(types=(match,), class_names=())
  if isinstance(match, tuple) and match and all(isinstance(t, type) for t in match):
    return MlpRule(types=match, class_names=())
  if isinstance(match, str):
    re.compile(match)  # A bad regex fails here, not deep inside a trace.
    return MlpRule(class_names=(), path_pattern=match)
  if callable(match):
    return MlpRule(class_names=(), predicate=match)
  raise TypeError(f"match={match!r} is not a rule.\nFix: pass None, a Module class (or "
                  "tuple of them), a regex on the module path, a callable(module) -> bool "
                  "or an MlpRule.")


def find_mlp_blocks(module: nn.Module, *args, match: Match = None,
                    method: str | None = None, **kwargs) -> tuple[Path, ...]:
  """Paths of the modules that `match` selects when `module` runs on `args`.

  Traces `module.init` shape-only (`jax.eval_shape`: nothing is allocated or
  computed). A wrapper with a `mlp_rule_target()` method (a `Sparsified` module) is
  looked into, with its own rule unless `match` is given.
  """
  target = getattr(module, "mlp_rule_target", None)
  if callable(target):
    module, own_rule = target()
    match = own_rule if match is None else match
  rule = mlp_rule(match)
  found: list[Path] = []

  def record(next_fun, call_args, call_kwargs, context):
    if (context.method_name == "__call__" and context.module.path not in found
        and rule.matches(context.module)):
      found.append(context.module.path)
    return next_fun(*call_args, **call_kwargs)

  def init():
    with nn.intercept_methods(record):
      rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
      return module.init(rngs, *args, method=method, **kwargs)

  jax.eval_shape(init)
  return tuple(found)


def mlp_kernel_predicate(block_paths: tuple[Path, ...]) -> Callable[[Path], bool]:
  """A params-path predicate true for the `kernel`s inside the given blocks (for
  `noisy_apply` / `perturb_params`)."""
  blocks = tuple(tuple(p) for p in block_paths)

  def predicate(path: Path) -> bool:
    return path[-1] == "kernel" and any(path[:len(b)] == b for b in blocks)

  return predicate


@dataclasses.dataclass(frozen=True)
class DenseCall:
  """One call of a Dense/DenseGeneral by its parent module (trace-time values)."""
  name: str
  inputs: object
  outputs: object


def _shape(value) -> tuple[int, ...] | None:
  return tuple(value.shape) if hasattr(value, "shape") else None


def looks_like_mlp(calls: list[DenseCall]) -> bool:
  """Whether a module's direct Dense calls have an MLP block's shape, whatever its name.

  True when two consecutive calls have the second's input of the first's output shape
  but another value, that is, something elementwise ran between them: Dense -> f ->
  Dense, and in a gated block (Dense, Dense -> f(gate) * up -> Dense) the up and output
  projections. Attention modules, whose output projection also reads a value of the
  value projection's shape, are excluded by the caller.
  """
  return any(second.inputs is not first.outputs and second.inputs is not first.inputs
             and _shape(second.inputs) == _shape(first.outputs)
             for first, second in zip(calls, calls[1:]))


def contraction_axes(kernel_shape: tuple[int, ...], input_shape: tuple[int, ...] | None,
                     output_shape: tuple[int, ...] | None = None) -> int | None:
  """How many of the input's last axes a dense-like kernel contracts, or None.

  A module is dense-like when its params are a `kernel` (and optionally a `bias`) and
  it computes a contraction of its input's last k axes with the kernel's first k:
  kernel [*in, *out] with in == input_shape[-k:], output [..., *out]. This is what
  nn.Dense, nn.DenseGeneral (axis=-1 or trailing axes) and the dense classes other
  codebases write for themselves (t5x's `DenseGeneral`) do. `output_shape` None checks
  the input side only (before the call). The smallest such k is returned.
  """
  if input_shape is None or len(kernel_shape) < 2:
    return None
  for k in range(1, min(len(input_shape), len(kernel_shape) - 1) + 1):
    if tuple(kernel_shape[:k]) != tuple(input_shape[-k:]):
      continue
    if output_shape is None or tuple(output_shape) == (
        tuple(input_shape[:-k]) + tuple(kernel_shape[k:])):
      return k
  return None
