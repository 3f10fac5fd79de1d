"""What `sparsify` does inside one call of a matched MLP block: the method interceptor.

`Sparsified` (in `transforms.sparsify`) runs its model under `nn.intercept_methods`
with one `BlockInterceptor` per call. The interceptor watches the calls of the modules
its rule matches; inside a matched block it sees the block's direct dense children and
`nn.Dropout` children and rewrites their inputs and outputs. Dense children are
`nn.Dense`, `nn.DenseGeneral` and, unless `dense_types=` names the classes, any child
whose params are a `kernel` (and optionally a `bias`) contracting the input's last axes
(`mlp_rule.contraction_axes`): the dense classes codebases write for themselves, as
t5x's `DenseGeneral`. At init such a child's params exist only after its call, and
Linen creates them once, so a child called where the output projection would be gets
the new hidden activations before it is known to be dense. A block with no dense
child raises, listing the submodules it called with their classes and param shapes.

* plain block, Dense -> f -> Dense: the first Dense's output is z; the second Dense
  gets a = act(z) in place of whatever the block's own f produced;
* gated block (GLU: SwiGLU, GeGLU, t5x's `MlpBlock` with ('gelu', 'linear')),
  Dense, Dense -> f(gate) * up -> Dense: two Dense calls on one input, the gate (the one
  whose name matches `gate`, else the first called) and the up projection u; the third
  Dense gets act(z_gate) * u.

In both, z is the gate's output plus per-token weight noise (rng 'weight_noise', rho of
the input projections) and a zero probe `perturb('z')`; the last Dense's output gets
its own weight noise and the probe `perturb('y')`; a Dropout child called on the
hidden activations drops the new ones (same rng); the zeroth bias is added to the
block's input or output; 'z', 'a' = act(z) and 'w1' (the gate's kernel) are sown into
'intermediates', and for plain blocks also 'x', f'(z) as 'derivative' and 'w2', which
the theory metrics read. Gated blocks do not sow those three: the theory's formulas are
for y = f(x W1) W2, and in a GLU dL/da = (dL/dy W2^T) * u and the input of W2 is
f(z) * u, so `metrics.flatness_metrics` would report other quantities than its
docstring defines; it skips such blocks. `spectral_metrics` reads the gate kernel.

Cached decoding: when the block's parent keeps a 'cache' collection (an attention
layer with decode=True), the block keeps its own position, `zeroth_bias_index`, in
'cache' (as Flax attention keeps `cache_index`): the pass that creates the cache adds
rows [0, length), and each later call adds the rows of its true positions and advances
the index.

The interceptor also refuses to be silent when a lifted transform (`nn.scan`,
`nn.vmap`) around a block does not carry what the method needs: a collection the
caller can write ('intermediates', 'perturbations'), probes the caller passed, or the
'weight_noise' rng; it raises, naming what the transform must carry.
"""
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparse_jax.metrics import STACK_MARKER
from sparse_jax.nn.dense import WEIGHT_NOISE_RNG
from sparse_jax.ops import weight_noise as noise_ops
from sparse_jax.ops.activations import activation_derivative, apply_activation
from sparse_jax.transforms.mlp_rule import DenseCall, contraction_axes, looks_like_mlp

ZEROTH_BIAS = "zeroth_bias"
# The block's own decode position in the 'cache' collection.
ZEROTH_BIAS_INDEX = "zeroth_bias_index"
DENSE_TYPES = (nn.Dense, nn.DenseGeneral)
SHAPES = ("Dense -> f -> Dense, and the gated (GLU) Dense, Dense -> f(gate) * up -> "
          "Dense, built from dense children (nn.Dense, nn.DenseGeneral, or a module whose "
          "params are a kernel and optional bias contracting the input's last axes)")


def _first_input(args: tuple, kwargs: dict) -> Any:
  return args[0] if args else kwargs.get("inputs", kwargs.get("x"))


def _with_input(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
  if args:
    return (value,) + tuple(args[1:]), kwargs
  key = "inputs" if "inputs" in kwargs else "x"
  return args, dict(kwargs, **{key: value})


def _shape(value: Any) -> tuple[int, ...] | None:
  return tuple(value.shape) if hasattr(value, "shape") else None


def _name(module: nn.Module) -> str:
  return "/".join(module.path) or "<root>"


def _kernel(dense: nn.Module, x: Any) -> jax.Array:
  """A dense layer's kernel as a matrix [inputs, outputs]: the axes it contracts with
  its input `x` flattened into one, the others into the other."""
  kernel = nn.meta.unbox(dense.variables["params"]["kernel"])
  k = contraction_axes(kernel.shape, _shape(x)) or 1
  return jnp.reshape(kernel, (int(np.prod(kernel.shape[:k])), -1))


def _dense_like_kernel(module: nn.Module) -> tuple[int, ...] | None:
  """The kernel's shape when `module`'s params are a `kernel` and optionally a `bias`
  (arrays, no submodules), else None (also before a module's params exist)."""
  params = module.variables.get("params", {})
  if "kernel" not in params or not set(params) <= {"kernel", "bias"}:
    return None
  leaves = [nn.meta.unbox(v) for v in params.values()]
  if not all(hasattr(v, "shape") for v in leaves):
    return None
  return tuple(nn.meta.unbox(params["kernel"]).shape)


def _param_shapes(module: nn.Module) -> str:
  flat = traverse_util.flatten_dict(dict(nn.meta.unbox(module.variables.get("params", {}))))
  return ", ".join(f"{'/'.join(p)} {tuple(np.shape(v))}" for p, v in flat.items()) or "none"


@dataclasses.dataclass
class _Frame:
  """One matched block's call: its input projections and the hidden value."""
  block: nn.Module
  projections: list[DenseCall] = dataclasses.field(default_factory=list)
  kernels: list[jax.Array] = dataclasses.field(default_factory=list)
  names: list[str] = dataclasses.field(default_factory=list)  # Every direct Dense.
  # Its other direct children: 'name (Class, params: ...)', for the shape error.
  children: list[str] = dataclasses.field(default_factory=list)
  decided: bool = False  # Plain or gated is known, z / a / hidden computed.
  glu: bool = False
  hidden: Any = None  # What the output projection gets: a, or a * u (after dropout).
  down: bool = False  # The output projection has run.
  extra: int = 0  # Dense calls after it.


@dataclasses.dataclass(frozen=True)
class RootState:
  """What the caller of the whole model asked for, to compare with what a block sees."""
  intermediates: bool  # 'intermediates' mutable.
  perturbations: bool  # 'perturbations' mutable (init, or collecting probe shapes).
  probes: frozenset  # Module paths the caller passed probes for.
  weight_noise: bool  # The 'weight_noise' rng given and some rho > 0.

  @classmethod
  def of(cls, root: nn.Module, rhos: tuple[float, float], observe: bool = True
         ) -> "RootState":
    """What `root`'s caller asked for; without `observe`, nothing is sown or probed."""
    probes = traverse_util.flatten_dict(dict(root.variables.get("perturbations", {})))
    return cls(observe and root.is_mutable_collection("intermediates"),
               observe and root.is_mutable_collection("perturbations"),
               frozenset(p[:-1] for p in probes) if observe else frozenset(),
               any(r > 0 for r in rhos) and root.has_rng(WEIGHT_NOISE_RNG))


class BlockInterceptor:
  """Rewrites the matched MLP blocks of one call; trace-time Python state only.

  `config` has the fields of `Sparsified`: activation, zeroth_bias, max_len,
  weight_noise, match, gate, observe, dense_types (None: nn.Dense, nn.DenseGeneral and
  any dense-like child, see `mlp_rule.contraction_axes`; else those classes only).
  """

  def __init__(self, config: Any, root: RootState, mixing: jax.Array | float):
    self.config, self.root, self.mixing = config, root, mixing
    self.stack: list[_Frame] = []
    self.matched: list[str] = []
    # Direct Dense calls of unmatched modules, for the no-match error.
    self.unmatched: dict[str, list[DenseCall]] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    frame = self.stack[-1] if self.stack else None
    if frame is not None and module.parent is frame.block:
      if isinstance(module, self._dense_types()):
        return self._dense(frame, module, next_fun, args, kwargs)
      if isinstance(module, nn.Dropout) and frame.projections and not frame.down:
        # The user's dropout on the hidden activations now drops ours (same rng use).
        self._decide(frame)
        args, kwargs = _with_input(args, kwargs, frame.hidden)
        frame.hidden = next_fun(*args, **kwargs)
        return frame.hidden
      if not self.config.match.matches(module):
        return self._child(frame, module, next_fun, args, kwargs)
    if self.config.match.matches(module):
      return self._block(module, next_fun, args, kwargs)
    out = next_fun(*args, **kwargs)
    parent = module.parent
    if (isinstance(parent, nn.Module)
        and not isinstance(parent, nn.MultiHeadDotProductAttention)
        and self._is_dense(module, _first_input(args, kwargs), out)):
      self.unmatched.setdefault(f"{_name(parent)} ({type(parent).__name__})", []).append(
          DenseCall(module.name, _first_input(args, kwargs), out))
    return out

  def _dense_types(self) -> tuple[type, ...]:
    return DENSE_TYPES + tuple(getattr(self.config, "dense_types", None) or ())

  def _is_dense(self, module: nn.Module, x: Any, out: Any = None) -> bool:
    """A dense layer by type, or (dense_types=None) by its params and shapes; before
    the call (`out` None) only once its params exist."""
    if isinstance(module, self._dense_types()):
      return True
    if getattr(self.config, "dense_types", None) is not None:
      return False
    kernel = _dense_like_kernel(module)
    return kernel is not None and contraction_axes(kernel, _shape(x), _shape(out)) is not None

  def _child(self, frame: _Frame, module: nn.Module, next_fun, args, kwargs):
    """A matched block's child that is not nn.Dense / Dropout: rewritten as a dense
    layer when it is one (its own Dense class, as t5x's), else run as it is."""
    x, out = _first_input(args, kwargs), None
    known = _dense_like_kernel(module) is not None or not module.is_initializing()
    if known and self._is_dense(module, x):
      return self._dense(frame, module, next_fun, args, kwargs)
    if known:
      out = next_fun(*args, **kwargs)
    elif self._would_be_down(frame, x):
      # At init its params appear with the call, and Linen creates them only once: the
      # call gets the hidden activations, as the output projection's would.
      args, kwargs = _with_input(args, kwargs, frame.hidden)
      out = next_fun(*args, **kwargs)
      if self._is_dense(module, frame.hidden, out):
        frame.names.append(module.name)
        return self._down(frame, module, next_fun, args, kwargs, out)
    else:  # An input projection or something else: look at its params after the call.
      out = next_fun(*args, **kwargs)
      if self._is_dense(module, x, out):
        return self._dense(frame, module, next_fun, args, kwargs, out)
    frame.children.append(f"{module.name} ({type(module).__name__}, params: "
                          f"{_param_shapes(module)})")
    return out

  def _would_be_down(self, frame: _Frame, x: Any) -> bool:
    """Whether a dense layer called on `x` now would be the output projection (then
    `frame.hidden` is computed)."""
    if not frame.projections or frame.down or any(x is p.outputs for p in frame.projections):
      return False
    if not frame.decided and self._is_up(frame, x):
      return False
    self._decide(frame)
    return _shape(x) == _shape(frame.hidden)

  def candidates(self) -> list[str]:
    """Unmatched modules whose Dense calls look like an MLP block's."""
    return [name for name, calls in self.unmatched.items() if looks_like_mlp(calls)]

  # ---------------------------------------------------------------- Dense children
  def _noise(self, y, x, dense: nn.Module, block: nn.Module, layer: int):
    rho = self.config.weight_noise[layer]
    if rho == 0 or not block.has_rng(WEIGHT_NOISE_RNG):
      return y
    kernel = nn.meta.unbox(dense.variables["params"]["kernel"])
    return noise_ops.dense_output_noise(y, x, kernel, rho, block.make_rng(WEIGHT_NOISE_RNG))

  def _dense(self, frame: _Frame, dense: nn.Module, next_fun, args, kwargs,
             out: Any = None):
    """One dense child's call; `out`: its output on `args` when it already ran (a
    dense-like child at init, recognised by its new params)."""
    frame.names.append(dense.name)
    if frame.down:
      frame.extra += 1  # Reported after the block returns.
      return next_fun(*args, **kwargs) if out is None else out
    x = _first_input(args, kwargs)
    if not frame.projections or (not frame.decided and self._is_up(frame, x)):
      out = next_fun(*args, **kwargs) if out is None else out
      out = self._noise(out, x, dense, frame.block, 0)
      frame.projections.append(DenseCall(dense.name, x, out))
      frame.kernels.append(_kernel(dense, x))
      if len(frame.projections) == 2:
        frame.glu = True
        self._decide(frame)
      return out  # What the user's activation sees; its result is replaced below.
    self._decide(frame)
    return self._down(frame, dense, next_fun, args, kwargs)

  @staticmethod
  def _is_up(frame: _Frame, x: Any) -> bool:
    """Whether a second Dense reads the first's input (a GLU's other projection)
    rather than the hidden activations (a plain block's output projection)."""
    first = frame.projections[0]
    if x is first.inputs:
      return True
    return _shape(x) == _shape(first.inputs) != _shape(first.outputs)

  def _gate_index(self, frame: _Frame) -> int:
    if not frame.glu:
      return 0
    named = [i for i, p in enumerate(frame.projections)
             if self.config.gate and re.search(self.config.gate, p.name)]
    return named[0] if len(named) == 1 else 0

  def _decide(self, frame: _Frame) -> None:
    """Takes z from the gate, computes a = act(z) and the hidden value; sows."""
    if frame.decided:
      return
    frame.decided = True
    block, gate = frame.block, self._gate_index(frame)
    observe = self.config.observe
    z = frame.projections[gate].outputs
    if observe:
      z = block.perturb("z", z)
    a = apply_activation(self.config.activation, z, self.mixing)
    frame.hidden = a * frame.projections[1 - gate].outputs if frame.glu else a
    if not observe:
      return
    # Under nn.scan these become [layers]: the metrics then read the stack per layer.
    block.perturb(STACK_MARKER, jnp.zeros((), jnp.float32))
    block.sow("intermediates", STACK_MARKER, jnp.zeros((), jnp.float32))
    block.sow("intermediates", "z", z)
    block.sow("intermediates", "a", a)
    block.sow("intermediates", "w1", frame.kernels[gate])
    if not frame.glu:
      # What SparseMlp sows for the theory metrics: input, f'(z) (and W2 below).
      block.sow("intermediates", "x", frame.projections[0].inputs)
      block.sow("intermediates", "derivative",
                activation_derivative(self.config.activation, z, self.mixing))

  def _down(self, frame: _Frame, dense: nn.Module, next_fun, args, kwargs,
            out: Any = None):
    """The output projection's call on the hidden value (`out`: already made on it)."""
    block, x = frame.block, _first_input(args, kwargs)
    if _shape(x) != _shape(frame.hidden):
      raise ValueError(
          f"MLP block {_name(block)}: the input of its Dense {dense.name!r} has shape "
          f"{_shape(x)}, not the shape {_shape(frame.hidden)} of the hidden activations; "
          f"sparsify supports {SHAPES}.\nFix: if {_name(block)} is not an MLP block, "
          "pass match=... to sparsify() so that only MLP blocks match.")
    if out is None:
      args, kwargs = _with_input(args, kwargs, frame.hidden)
      out = next_fun(*args, **kwargs)
    y = self._noise(out, frame.hidden, dense, block, 1)
    frame.down = True
    if not self.config.observe:
      return y
    if not frame.glu:
      block.sow("intermediates", "w2", _kernel(dense, frame.hidden))
    return block.perturb("y", y)

  # --------------------------------------------------------------------- the block
  def _check_carried(self, block: nn.Module) -> None:
    """Raises when a lifted transform around `block` hides what the method needs."""
    root, collections, rngs = self.root, [], []
    if root.perturbations and not block.is_mutable_collection("perturbations"):
      collections.append("perturbations")
    elif block.path in root.probes and not block.has_variable("perturbations", "z"):
      collections.append("perturbations")
    if root.intermediates and not block.is_mutable_collection("intermediates"):
      collections.append("intermediates")
    if root.weight_noise and not block.has_rng(WEIGHT_NOISE_RNG):
      rngs.append(WEIGHT_NOISE_RNG)
    if not collections and not rngs:
      return
    hidden = [repr(c) + " collection" for c in collections] + [
        repr(r) + " rng" for r in rngs]
    raise ValueError(
        f"MLP block {_name(block)} cannot see the {' and the '.join(hidden)} of this "
        "call (at init: where its probes are created): a lifted transform around it "
        "(nn.scan, nn.vmap, ...) does not carry them, so its sown z/a, its probes or its "
        "weight noise would be silently dropped.\nFix: let the transform carry them, "
        "e.g. nn.scan(block, variable_axes={'params': 0, 'intermediates': 0, "
        "'perturbations': 0}, split_rngs={'params': True, 'dropout': True, "
        "'weight_noise': True}, ...); or, to train without the metrics' hooks, "
        "sparsify(..., observe=False).")

  def _zeroth_bias(self, block: nn.Module, x: jax.Array) -> jax.Array:
    max_len = self.config.max_len
    ndim = getattr(x, "ndim", 0)
    if ndim < 2 or (max_len is None and ndim < 3):
      need = "[batch, length, features]" if max_len is None else "[..., length, features]"
      raise ValueError(
          f"MLP block {_name(block)}: a zeroth bias needs inputs {need}, got shape "
          f"{_shape(x)}.\nFix: sparsify(..., zeroth_bias=None) for a model without a "
          "sequence axis" + (", or pass max_len=" if max_len is None else "") + ".")
    length, features = x.shape[-2], x.shape[-1]
    if block.has_variable("params", ZEROTH_BIAS):
      rows = np.shape(nn.meta.unbox(block.scope.get_variable("params", ZEROTH_BIAS)))[0]
    elif not block.is_initializing():
      raise ValueError(
          f"MLP block {_name(block)} has no '{ZEROTH_BIAS}' param: these params come "
          "from the model before sparsify.\nFix: load them with sparse_jax."
          "merge_pretrained(sparse_model, params, *example_inputs, **kwargs).")
    else:  # The table: max_len rows, or (max_len=None) the length this init sees.
      rows = length if max_len is None else max_len
    # Through the scope: Module.param refuses setup-style blocks outside setup().
    table = block.scope.param(ZEROTH_BIAS, nn.initializers.zeros_init(),
                              (rows, features), jnp.float32)
    if block.has_variable("cache", ZEROTH_BIAS_INDEX):  # A decode step.
      index = block.scope.get_variable("cache", ZEROTH_BIAS_INDEX)
      if block.is_mutable_collection("cache"):
        block.scope.put_variable("cache", ZEROTH_BIAS_INDEX, index + length)
      return jax.lax.dynamic_slice_in_dim(table, index, length).astype(x.dtype)
    if length > rows:
      raise ValueError(
          f"MLP block {_name(block)}: sequence length {length} exceeds its zeroth bias "
          f"table ({rows} rows).\nFix: init with the longest sequence (the table length "
          "is then taken from it) or pass sparsify(..., max_len=) that long.")
    parent = block.parent
    if (block.is_mutable_collection("cache") and isinstance(parent, nn.Module)
        and "cache" in parent.variables):
      # The pass that creates the decode cache (its attention already did): start the
      # block's own position at 0.
      block.scope.put_variable("cache", ZEROTH_BIAS_INDEX, jnp.array(0, jnp.int32))
    return table[:length].astype(x.dtype)

  def _block(self, block: nn.Module, next_fun, args, kwargs):
    self.matched.append(_name(block))
    self._check_carried(block)
    position = self.config.zeroth_bias
    if position == "mlp_input":
      x = _first_input(args, kwargs)
      args, kwargs = _with_input(args, kwargs, x + self._zeroth_bias(block, x))
    frame = _Frame(block)
    self.stack.append(frame)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      self.stack.pop()
    if not frame.down or frame.extra:
      raise ValueError(self._shape_error(frame))
    if position == "mlp_output":
      out = out + self._zeroth_bias(block, out)
    return out

  def _shape_error(self, frame: _Frame) -> str:
    block = frame.block
    where = (f"MLP block {_name(block)} ({type(block).__name__}), matched by "
             f"{self.config.match.describe()},")
    own = sorted(k for k, v in block.variables.get("params", {}).items()
                 if not isinstance(v, dict) and not hasattr(v, "keys"))
    called = (f"; the submodules it called: {'; '.join(frame.children)}"
              if frame.children else "; it called no submodules")
    if not frame.names and own:
      return (f"{where} computes with its own parameters {own} (self.param kernels with "
              f"jnp.einsum, as Gemma's FeedForward) instead of Dense children{called}: "
              f"this block shape is not supported. sparsify supports {SHAPES}.\nFix: "
              "write the block's projections as nn.Dense / nn.DenseGeneral layers (same "
              "kernels), or leave it out of match=.")
    if not frame.names:
      return (f"{where} called no layer sparsify recognises as dense{called}. sparsify "
              f"supports {SHAPES}.\nFix: pass sparsify(..., dense_types=(YourDense,)) "
              "naming the block's dense class, or leave the block out of match=.")
    return (f"{where} calls {len(frame.names)} Dense layers directly ({frame.names}): "
            f"this block shape is not supported. sparsify supports {SHAPES}.\nFix: if "
            f"{_name(block)} is not an MLP block, pass match=... to sparsify() so that "
            "only MLP blocks match; otherwise write it in one of those shapes.")
