"""`sparsify` for Flax NNX models: the method in the MLP blocks of an `nnx.Module`.

    model = sparsify(model, max_len=128)  # In place: the same object, returned.
    optimizer = nnx.Optimizer(model, optax_projections(optax.adamw(1e-3)), wrt=nnx.Param)

An NNX model is a graph of Python objects, so there is nothing to intercept as Linen's
`nn.intercept_methods` does. Instead `sparsify` swaps the classes of the objects it
rewrites for subclasses that differ only in `__call__` (their state, names and graph
stay as they were, plus one `zeroth_bias` `nnx.Param` per block):

* each matched MLP block (by the same rule as Linen's: `MlpRule`) runs its own
  `__call__` with its direct `nnx.Linear` / `nnx.LinearGeneral` children and
  `nnx.Dropout` watched, in the two shapes Linen's blocks support: plain (Linear -> f
  -> Linear) and gated (Linear, Linear -> f(gate) * up -> Linear, as Gemma's
  FeedForward); the output projection gets act(z) (gated: act(z_gate) * up) in place
  of what the block's own f produced; the zeroth bias is added to its input or output;
* with `observe=True`, inside `nnx.capture` (NNX's idiom for intermediates and
  per-token gradients) the block sows 'z', 'a', 'w1' (and for plain blocks 'x',
  'derivative', 'w2') as `nnx.Intermediate` and adds zero probes 'z' and 'y' as
  `nnx.Perturbation`, under the names the Linen blocks use, so `sparse_jax.metrics`
  reads them; outside a capture nothing is stored;
* cached decoding: a block's parent module (the Transformer layer) is swapped too; when
  a sibling attention (anything holding an `nnx.Cache` named `cache_index`, as
  `nnx.MultiHeadAttention` after `init_cache`) advances its index in a call, the block
  adds the zeroth-bias rows of the positions the attention just wrote; when the layer
  is called with an explicit cache, a dict holding 'end_index' (flax's Gemma example:
  `LayerCache`, end_index [batch] = the position of the call's first token), the rows
  of positions end_index + [0, length) of each example.

The subclasses are made once per original class, so graph definitions stay equal from
call to call (`nnx.jit` caches). Layers stacked by `nnx.vmap` (kernels [layers, ...])
get a stacked zeroth bias [layers, max_len, d]; `nnx.scan` over them slices it. A scan
whose `StateAxes` broadcast `nnx.Intermediate` / `nnx.Perturbation` makes NNX drop what
the blocks store inside it; the model itself is swapped too, so that after a call in
which blocks stored values but none reached the captures it raises instead of letting
`nnx.capture` come back empty.
"""
import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.metrics import STACK_MARKER
from sparse_jax.nn.sparse_mlp import ZerothBiasPosition
from sparse_jax.ops import weight_noise as noise_ops
from sparse_jax.ops.activations import (ActivationName, activation_derivative,
                                        apply_activation)
from sparse_jax.transforms.mlp_rule import DenseCall, MlpRule

ZEROTH_BIAS = "zeroth_bias"
LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral)
SHAPES = ("Linear -> f -> Linear, and the gated (GLU) Linear, Linear -> f(gate) * up -> "
          "Linear, built from nnx.Linear / nnx.LinearGeneral attributes")


class Mixing(nnx.Variable):
  """The JSReLU share k of activation='mixed' (not a Param: no optimizer touches it)."""


@dataclasses.dataclass(frozen=True)
class Config:
  """What a sparsified block does (static: part of the graph definition)."""
  activation: str
  zeroth_bias: str | None
  gate: str | None
  observe: bool
  weight_noise: tuple[float, float] = (0.0, 0.0)  # rho: input projections, output.


def _shape(value: Any) -> tuple[int, ...] | None:
  return tuple(value.shape) if hasattr(value, "shape") else None


def _capturing(module: nnx.Module) -> bool:
  return hasattr(module, "__captures__")


@dataclasses.dataclass
class _Frame:
  block: nnx.Module
  config: Config
  children: tuple  # The block's direct Linear / Dropout objects.
  projections: list = dataclasses.field(default_factory=list)
  kernels: list = dataclasses.field(default_factory=list)
  names: list = dataclasses.field(default_factory=list)
  decided: bool = False
  glu: bool = False
  hidden: Any = None
  down: bool = False
  extra: int = 0


# Trace-time state of the calls in progress (Python only, like Linen's interceptor):
# the blocks being called, and per block object the sibling attentions' cache index
# when their layer was entered.
_FRAMES: list[_Frame] = []
_DECODING: dict[int, list[tuple[Any, Any]]] = {}


def _path(module: nnx.Module) -> str:
  return getattr(module, "_sparsify_path", type(module).__name__)


# ------------------------------------------------------------------- the block call
def _block_call(self, *args, **kwargs):
  config: Config = self._sparsify_config
  original = self._sparsify_original.__call__
  children = tuple(v for v in vars(self).values()
                   if isinstance(v, LINEAR_TYPES + (nnx.Dropout,)))
  if config.zeroth_bias == "mlp_input":  # The input: first positional, or x= / inputs=.
    if args:
      args = (args[0] + _zeroth_rows(self, args[0]),) + tuple(args[1:])
    else:
      key = "inputs" if "inputs" in kwargs else "x"
      kwargs = dict(kwargs, **{key: kwargs[key] + _zeroth_rows(self, kwargs[key])})
  frame = _Frame(self, config, children)
  _FRAMES.append(frame)
  try:
    out = original(self, *args, **kwargs)
  finally:
    _FRAMES.pop()
  if not frame.down or frame.extra:
    raise ValueError(
        f"MLP block {_path(self)} ({self._sparsify_original.__name__}) called "
        f"{len(frame.names)} Linear layers ({frame.names}): this block shape is not "
        f"supported. sparsify supports {SHAPES}.\nFix: if it is not an MLP block, pass "
        "match=... to sparsify() so that only MLP blocks match; otherwise write it in "
        "one of those shapes.")
  if config.zeroth_bias == "mlp_output":
    out = out + _zeroth_rows(self, out)
  return out


def _end_index(value: Any) -> jax.Array | None:
  """A Gemma-style explicit layer cache's 'end_index', else None."""
  if isinstance(value, Mapping) and hasattr(value.get("end_index"), "shape"):
    return value["end_index"]
  return None


def _zeroth_rows(block: nnx.Module, x: jax.Array) -> jax.Array:
  """The zeroth-bias rows of `x`'s positions: [0, length), or when a sibling attention
  just decoded, the positions it wrote, or after an explicit cache's end_index."""
  table = block.zeroth_bias.get_value()
  if getattr(x, "ndim", 0) < 2 or table.ndim != 2 or x.shape[-1] != table.shape[-1]:
    raise ValueError(
        f"MLP block {_path(block)}: a zeroth bias table {_shape(table)} needs inputs "
        f"[..., length, {table.shape[-1]}], got {_shape(x)}.\nFix: sparsify(..., "
        "zeroth_bias=None) for a model without a sequence axis; in a stack of layers "
        "made by nnx.vmap, call the layers through nnx.scan / nnx.vmap.")
  length = x.shape[-2]
  for attention, before in _DECODING.get(id(block), ()):
    if attention is None:  # An explicit cache: rows end_index + [0, length).
      positions = jnp.reshape(before, (-1, 1)) + jnp.arange(length)
      rows = jnp.take(table, jnp.clip(positions, 0, table.shape[0] - 1), axis=0)
      return rows.reshape(jnp.shape(before) + (length, table.shape[-1])).astype(x.dtype)
    if attention.cache_index.get_value() is not before:  # It decoded in this call.
      return jax.lax.dynamic_slice_in_dim(table, before, length).astype(x.dtype)
  if length > table.shape[0]:
    raise ValueError(
        f"MLP block {_path(block)}: sequence length {length} exceeds its zeroth bias "
        f"table ({table.shape[0]} rows).\nFix: sparsify(..., max_len=) at least that long.")
  return table[:length].astype(x.dtype)


def _parent_call(self, *args, **kwargs):
  """A layer holding sparsified blocks: records its attentions' cache index first."""
  caches = [v for v in vars(self).values()
            if isinstance(getattr(v, "cache_index", None), nnx.Cache)]
  blocks = [v for v in vars(self).values() if hasattr(v, "_sparsify_config")]
  entries = [(a, a.cache_index.get_value()) for a in caches]
  entries += [(None, end) for end in map(_end_index, list(args) + list(kwargs.values()))
              if end is not None]
  if not entries:
    return self._sparsify_parent.__call__(self, *args, **kwargs)
  for block in blocks:
    _DECODING.setdefault(id(block), []).extend(entries)
  try:
    return self._sparsify_parent.__call__(self, *args, **kwargs)
  finally:
    for block in blocks:
      del _DECODING[id(block)][-len(entries):]
      if not _DECODING[id(block)]:
        del _DECODING[id(block)]


# Per model call in progress: how many blocks sowed or probed inside nnx.capture.
_OBSERVED: list[list[str]] = []


def _root_call(self, *args, **kwargs):
  """The sparsified model's call: afterwards, refuses to let nnx.capture come back
  empty because a lifted transform dropped what the blocks stored."""
  observed: list[str] = []
  _OBSERVED.append(observed)
  try:
    out = self._sparsify_root.__call__(self, *args, **kwargs)
  finally:
    _OBSERVED.pop()
  if observed:
    _check_captured(self, observed)
  return out


def _check_captured(model: nnx.Module, observed: list[str]) -> None:
  blocks = [m for _, m in nnx.iter_modules(model)
            if hasattr(m, "_sparsify_config") and _capturing(m)]
  for kind in (nnx.Intermediate, nnx.Perturbation):
    captures = [v for m in blocks for v in m.__captures__ if type(v) is kind]
    if captures and not any("z" in v for v in captures):
      raise ValueError(
          f"MLP blocks {sorted(set(observed))} stored their {kind.__name__} values "
          "inside a lifted transform (nnx.scan, nnx.vmap) that broadcasts that state, "
          "so NNX dropped them and nnx.capture would return nothing.\nFix: put "
          "nnx.Intermediate and nnx.Perturbation on the layer axis, e.g. in_axes="
          "(nnx.Carry, nnx.StateAxes({(nnx.Param, nnx.Intermediate, nnx.Perturbation): "
          "0, ...: None})), or sparsify(..., observe=False) to train without the hooks.")


# --------------------------------------------------------------- the children's calls
def _linear_call(self, x, *args, **kwargs):
  original = self._sparsify_original.__call__
  frame = _FRAMES[-1] if _FRAMES else None
  if frame is None or not any(c is self for c in frame.children):
    return original(self, x, *args, **kwargs)
  frame.names.append(_child_name(frame.block, self))
  if frame.down:
    frame.extra += 1
    return original(self, x, *args, **kwargs)
  if not frame.projections or (not frame.decided and _is_up(frame, x)):
    out = _noise(frame, self, original(self, x, *args, **kwargs), x, 0)
    frame.projections.append(DenseCall(_child_name(frame.block, self), x, out))
    frame.kernels.append(_matrix(self))
    if len(frame.projections) == 2:
      frame.glu = True
      _decide(frame)
    return out
  _decide(frame)
  if _shape(x) != _shape(frame.hidden):
    raise ValueError(
        f"MLP block {_path(frame.block)}: the input of its Linear "
        f"{_child_name(frame.block, self)!r} has shape {_shape(x)}, not the shape "
        f"{_shape(frame.hidden)} of the hidden activations; sparsify supports {SHAPES}."
        "\nFix: if it is not an MLP block, pass match=... to sparsify() so that only "
        "MLP blocks match.")
  y = _noise(frame, self, original(self, frame.hidden, *args, **kwargs), frame.hidden, 1)
  frame.down = True
  block = frame.block
  if not (frame.config.observe and _capturing(block)):
    return y
  if not frame.glu:
    block.sow(nnx.Intermediate, "w2", _matrix(self))
  return block.perturb("y", y)


def _noise(frame: _Frame, linear: nnx.Module, y: jax.Array, x: jax.Array,
           layer: int) -> jax.Array:
  """Per-token weight noise on a projection's output, in training mode only."""
  rho, block = frame.config.weight_noise[layer], frame.block
  if rho == 0 or getattr(block, "deterministic", False):
    return y
  return noise_ops.dense_output_noise(y, x, _matrix(linear), rho, block.weight_noise_rngs())


def _dropout_call(self, x, *args, **kwargs):
  original = self._sparsify_original.__call__
  frame = _FRAMES[-1] if _FRAMES else None
  if (frame is None or not any(c is self for c in frame.children)
      or not frame.projections or frame.down):
    return original(self, x, *args, **kwargs)
  _decide(frame)  # The block's dropout on its activations now drops the new ones.
  frame.hidden = original(self, frame.hidden, *args, **kwargs)
  return frame.hidden


def _matrix(linear: nnx.Module) -> jax.Array:
  """A Linear's kernel as [inputs, outputs] (LinearGeneral's axes flattened)."""
  kernel = linear.kernel.get_value()
  ins = linear.in_features
  return kernel.reshape(int(np.prod(ins if isinstance(ins, tuple) else (ins,))), -1)


def _child_name(block: nnx.Module, child: Any) -> str:
  return next((k for k, v in vars(block).items() if v is child), "?")


def _is_up(frame: _Frame, x: Any) -> bool:
  first = frame.projections[0]
  if x is first.inputs:
    return True
  return _shape(x) == _shape(first.inputs) != _shape(first.outputs)


def _decide(frame: _Frame) -> None:
  if frame.decided:
    return
  frame.decided = True
  block, config = frame.block, frame.config
  gate = 0
  if frame.glu and config.gate:
    named = [i for i, p in enumerate(frame.projections) if re.search(config.gate, p.name)]
    gate = named[0] if len(named) == 1 else 0
  observe = config.observe and _capturing(block)
  z = frame.projections[gate].outputs
  if observe:
    if _OBSERVED:
      _OBSERVED[-1].append(_path(block))
    z = block.perturb("z", z)
  mixing = block.mixing.get_value() if isinstance(getattr(block, "mixing", None),
                                                  Mixing) else 1.0
  a = apply_activation(config.activation, z, mixing)
  frame.hidden = a * frame.projections[1 - gate].outputs if frame.glu else a
  if not observe:
    return
  block.perturb(STACK_MARKER, jnp.zeros((), jnp.float32))
  block.sow(nnx.Intermediate, STACK_MARKER, jnp.zeros((), jnp.float32))
  block.sow(nnx.Intermediate, "z", z)
  block.sow(nnx.Intermediate, "a", a)
  block.sow(nnx.Intermediate, "w1", frame.kernels[gate])
  if not frame.glu:
    block.sow(nnx.Intermediate, "x", frame.projections[0].inputs)
    block.sow(nnx.Intermediate, "derivative",
              activation_derivative(config.activation, z, mixing))


# ------------------------------------------------------------------ class swapping
_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap(obj: Any, kind: str, call: Callable) -> None:
  """Gives `obj` a subclass of its class whose __call__ is `call` (once per kind: a
  model that is also a layer's parent gets both wrappers, a second sparsify none)."""
  cls = type(obj)
  if any(c.__dict__.get("_sparsify_kind") == kind for c in cls.__mro__):
    return
  key = (cls, kind)
  if key not in _SUBCLASSES:
    attribute = {"block": "_sparsify_original", "parent": "_sparsify_parent",
                 "child": "_sparsify_original", "root": "_sparsify_root"}[kind]
    _SUBCLASSES[key] = type(cls)(cls.__name__, (cls,), {
        "__call__": call, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "_sparsify_kind": kind, attribute: cls})
  object.__setattr__(obj, "__class__", _SUBCLASSES[key])


def _matches(rule: MlpRule, path: tuple, module: nnx.Module) -> bool:
  if rule.types and isinstance(module, rule.types):
    return True
  if type(module).__name__ in rule.class_names:
    return True
  if rule.path_pattern is not None and re.search(rule.path_pattern,
                                                 "/".join(map(str, path))):
    return True
  return rule.predicate is not None and bool(rule.predicate(module))


def _widths(linear: nnx.Module) -> tuple[int, int, tuple[int, ...]]:
  """(input width, output width, stack shape) of a Linear / LinearGeneral: the widths
  of the last input and output axes, and the kernel's leading axes beyond its own
  (layers stacked by nnx.vmap)."""
  ins = linear.in_features if isinstance(linear.in_features, tuple) else (linear.in_features,)
  outs = (linear.out_features if isinstance(linear.out_features, tuple)
          else (linear.out_features,))
  kernel = linear.kernel.get_value()
  return int(ins[-1]), int(outs[-1]), tuple(kernel.shape[:kernel.ndim - len(ins) - len(outs)])


def _d_model(block: nnx.Module, path: str) -> tuple[int, tuple[int, ...]]:
  """(d_model, stack shape) of a block, from its Linear attributes' shapes (their order
  is not used: NNX sorts the attributes of modules it rebuilds, as nnx.vmap's). Gated:
  the input width two projections share (gate and up); plain: the smaller of the two
  widths (a Transformer MLP widens d_model to its hidden width)."""
  linears = [v for v in vars(block).values() if isinstance(v, LINEAR_TYPES)]
  widths = [_widths(v) for v in linears]
  ins = [w[0] for w in widths]
  shared = sorted({d for d in ins if ins.count(d) >= 2})
  if len(linears) == 3 and len(shared) == 1:
    return shared[0], widths[0][2]
  if len(linears) == 2 and (ins[0], ins[1]) == (widths[1][1], widths[0][1]):
    return min(ins), widths[0][2]
  raise ValueError(
      f"MLP block {path} ({type(block).__name__}) has {len(linears)} nnx.Linear "
      f"attributes of (input, output) widths {[w[:2] for w in widths]}, not the "
      f"projections of one of the shapes sparsify supports: {SHAPES}.\nFix: pass "
      "match=... so that only MLP blocks match, or write the block's projections as "
      "its nnx.Linear attributes.")


def sparsify_nnx(model: nnx.Module, *, rule: MlpRule, activation: ActivationName,
                 zeroth_bias: ZerothBiasPosition | None, max_len: int | None,
                 gate: str | None, observe: bool,
                 weight_noise: tuple[float, float] = (0.0, 0.0),
                 rngs: nnx.Rngs | None = None) -> nnx.Module:
  """`model` with its matched MLP blocks sparsified, in place (also returned).

  Called by `transforms.sparsify.sparsify` (which checks the arguments); see there.
  """
  found = [(p, m) for p, m in nnx.iter_modules(model) if _matches(rule, p, m)]
  if not found:
    looks = [f"{'/'.join(map(str, p))} ({type(m).__name__})"
             for p, m in nnx.iter_modules(model)
             if sum(isinstance(v, LINEAR_TYPES) for v in vars(m).values()) >= 2
             and not hasattr(m, "cache_index") and not isinstance(m, nnx.MultiHeadAttention)]
    raise ValueError(
        f"sparsify found no MLP block in {type(model).__name__}: no module matched "
        f"{rule.describe()}. Modules with two or more nnx.Linear attributes: "
        f"{', '.join(looks) or 'none'}.\nFix: pass match=YourMlpClass, match=r'regex on "
        "the module path' or match=lambda module: ... to sparsify().")
  if zeroth_bias is not None and max_len is None:
    raise ValueError("sparsify of an NNX model builds each zeroth bias table now, and "
                     "has no input to take its length from.\nFix: pass max_len= (the "
                     "longest sequence length), or zeroth_bias=None.")
  if any(weight_noise) and not isinstance(rngs, nnx.Rngs):
    raise ValueError("Weight noise in an NNX model draws from each block's own rng "
                     "stream, seeded from rngs=.\nFix: pass rngs=nnx.Rngs(weight_noise="
                     "0) to sparsify().")
  modules = dict(nnx.iter_modules(model))
  config = Config(activation, zeroth_bias, gate, observe, weight_noise)
  for path, block in found:
    name = "/".join(map(str, path)) or "<root>"
    d_model, stack = _d_model(block, name)
    block._sparsify_config = config
    block._sparsify_path = name
    if zeroth_bias is not None and not isinstance(getattr(block, ZEROTH_BIAS, None),
                                                  nnx.Param):
      setattr(block, ZEROTH_BIAS, nnx.Param(jnp.zeros(stack + (max_len, d_model),
                                                      jnp.float32)))
    if activation == "mixed" and not isinstance(getattr(block, "mixing", None), Mixing):
      block.mixing = Mixing(jnp.ones(stack, jnp.float32))
    if any(weight_noise):
      # Its own stream (one key per layer of a stack); off after model.eval().
      stream = rngs["weight_noise"] if "weight_noise" in rngs else rngs.default
      block.weight_noise_rngs = stream.split(stack) if stack else stream.fork()
      if not hasattr(block, "deterministic"):
        block.deterministic = False
    _swap(block, "block", _block_call)
    for child in vars(block).values():
      if isinstance(child, LINEAR_TYPES):
        _swap(child, "child", _linear_call)
      elif isinstance(child, nnx.Dropout):
        _swap(child, "child", _dropout_call)
    parent = modules.get(path[:-1]) if path else None
    if isinstance(parent, nnx.Module) and not isinstance(parent, nnx.List):
      _swap(parent, "parent", _parent_call)
  if observe and found[0][0]:  # (A model that is itself the block needs no check.)
    _swap(model, "root", _root_call)
  return model


def set_mixing(model: nnx.Module, k: jax.Array | float) -> None:
  """Sets the JSReLU share k of every block sparsified with activation='mixed' (e.g.
  `ops.activations.mixing_coefficient(step, T_mix)`, inside the jitted train step)."""
  for _, block in nnx.iter_modules(model):
    mixing = getattr(block, "mixing", None)
    if isinstance(mixing, Mixing):
      mixing.set_value(jnp.broadcast_to(jnp.asarray(k, jnp.float32),
                                        jnp.shape(mixing.get_value())))
