"""`sparsify`: the method inside someone else's Flax Linen model, without editing it.

    sparse = sparsify(model, activation="jsrelu", zeroth_bias="mlp_output", max_len=64)
    params = merge_pretrained(jax.eval_shape(sparse.init, rng, x)["params"], pretrained)
    logits = sparse.apply({"params": params}, x)

(`merge_pretrained` and `optax_projections` are in `sparsify_params`.)

Mechanism: `Sparsified` wraps the model, shares its scope (`nn.share_scope`, so the
parameter tree is the model's own, plus one `zeroth_bias` leaf per MLP block) and runs
it under `nn.intercept_methods`. The interceptor watches the calls of modules the rule
matches (`mlp_rule.MlpRule`; default: classes named `MlpBlock`, `MLPBlock`, `Mlp`,
`MLP`, `FeedForward`). Inside a matched block it

* takes the first direct `nn.Dense`'s output z (adding per-token weight noise when the
  'weight_noise' rng is given, and a `perturb('z')` probe), computes a = f(z) with the
  chosen activation and sows 'z', 'a' (and, for the theory metrics, the input 'x',
  f'(z) as 'derivative' and the kernels 'w1', 'w2') into 'intermediates' on the block;
* feeds a, passed through the block's own `nn.Dropout` calls if any, to the second
  direct `nn.Dense` in place of whatever the user's activation produced (so ReLU,
  GELU or anything elementwise is replaced), and probes its output with `perturb('y')`;
* adds the zeroth bias (a [max_len, d] zero-initialised param of the block, one row
  per position) to the block's first positional input ('mlp_input') or to its output
  ('mlp_output').

Why this and not the alternatives: a wrapper that rebuilds the model (or a subclass of
the user's MLP) needs to know its constructor and its names; rewriting a jaxpr loses
Linen's variables and rngs. Interception keeps the user's module, names and init
untouched, works for compact and setup-style blocks (the zeroth bias is created through
the block's scope, which `Module.param` would refuse outside a compact method), and the
result is a plain Linen module: `init`, `apply`, `jit`, `mutable=`, `rngs=` all work.
The cost is that the block must call exactly two `nn.Dense`/`nn.DenseGeneral` children
directly (anything else is an error naming the block), and a matched block's other
children are left alone. A model with no matching block raises at init/apply time.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.nn.dense import WEIGHT_NOISE_RNG
from sparse_jax.nn.sparse_mlp import ZEROTH_BIAS_POSITIONS, ZerothBiasPosition
from sparse_jax.ops import weight_noise as noise_ops
from sparse_jax.ops.activations import (ACTIVATIONS, ActivationName, activation_derivative,
                                         apply_activation)
from sparse_jax.transforms.mlp_rule import Match, MlpRule, mlp_rule

ZEROTH_BIAS = "zeroth_bias"
DENSE_TYPES = (nn.Dense, nn.DenseGeneral)


def _first_input(args: tuple, kwargs: dict) -> Any:
  return args[0] if args else kwargs.get("inputs", kwargs.get("x"))


def _with_input(args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
  if args:
    return (value,) + tuple(args[1:]), kwargs
  key = "inputs" if "inputs" in kwargs else "x"
  return args, dict(kwargs, **{key: value})


@dataclasses.dataclass
class _Frame:
  block: nn.Module
  denses: int = 0
  a: Any = None


class _Interceptor:
  """Rewrites the matched MLP blocks of one call; trace-time Python state only."""

  def __init__(self, config: "Sparsified", mixing: jax.Array | float):
    self.config, self.mixing = config, mixing
    self.stack: list[_Frame] = []
    self.matched: list[str] = []
    self.seen: list[str] = []

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    frame = self.stack[-1] if self.stack else None
    if frame is not None and module.parent is frame.block:
      if isinstance(module, DENSE_TYPES):
        return self._dense(frame, module, next_fun, args, kwargs)
      if isinstance(module, nn.Dropout) and frame.denses == 1:
        # The user's dropout on the activation now drops our activation (same rng use).
        args, kwargs = _with_input(args, kwargs, frame.a)
        frame.a = next_fun(*args, **kwargs)
        return frame.a
    if self.config.match.matches(module):
      return self._block(module, next_fun, args, kwargs)
    self.seen.append(f"{'/'.join(module.path) or '<root>'} ({type(module).__name__})")
    return next_fun(*args, **kwargs)

  def _noise(self, y, x, dense: nn.Module, block: nn.Module, layer: int):
    rho = self.config.weight_noise[layer]
    if rho == 0 or not block.has_rng(WEIGHT_NOISE_RNG):
      return y
    kernel = nn.meta.unbox(dense.variables["params"]["kernel"])
    return noise_ops.dense_output_noise(y, x, kernel, rho, block.make_rng(WEIGHT_NOISE_RNG))

  def _dense(self, frame: _Frame, dense: nn.Module, next_fun, args, kwargs):
    frame.denses += 1
    block, x = frame.block, _first_input(args, kwargs)
    if frame.denses == 1:
      z = self._noise(next_fun(*args, **kwargs), x, dense, block, 0)
      z = block.perturb("z", z)
      frame.a = apply_activation(self.config.activation, z, self.mixing)
      block.sow("intermediates", "z", z)
      block.sow("intermediates", "a", frame.a)
      # What SparseMlp sows for the theory metrics: input, f'(z), kernel.
      block.sow("intermediates", "x", x)
      block.sow("intermediates", "derivative",
                activation_derivative(self.config.activation, z, self.mixing))
      block.sow("intermediates", "w1", _kernel(dense))
      return z  # What the user's activation sees; its result is replaced below.
    if frame.denses == 2:
      if getattr(x, "shape", None) != frame.a.shape:
        raise ValueError(f"MLP block {_name(block)}: the input of its second Dense has "
                         f"shape {getattr(x, 'shape', None)}, not the shape {frame.a.shape}"
                         " of the first Dense's output; sparsify needs Dense -> "
                         "elementwise activation (-> Dropout) -> Dense.")
      args, kwargs = _with_input(args, kwargs, frame.a)
      y = self._noise(next_fun(*args, **kwargs), frame.a, dense, block, 1)
      block.sow("intermediates", "w2", _kernel(dense))
      return block.perturb("y", y)
    return next_fun(*args, **kwargs)  # A third Dense: reported after the block returns.

  def _zeroth_bias(self, block: nn.Module, x: jax.Array) -> jax.Array:
    c = self.config
    if getattr(x, "ndim", 0) < 2:
      raise ValueError(f"MLP block {_name(block)}: a zeroth bias needs inputs [..., "
                       f"length, features], got shape {getattr(x, 'shape', None)}.")
    length, features = x.shape[-2], x.shape[-1]
    if length > c.max_len:
      raise ValueError(f"MLP block {_name(block)}: sequence length {length} exceeds the "
                       f"zeroth bias table ({c.max_len} rows); raise max_len.")
    if not block.is_initializing() and not block.has_variable("params", ZEROTH_BIAS):
      raise ValueError(f"MLP block {_name(block)} has no '{ZEROTH_BIAS}' param: these "
                       "params come from the model before sparsify. Use "
                       "merge_pretrained(jax.eval_shape(sparse_model.init, rng, ...)"
                       "['params'], params).")
    # Through the scope: Module.param refuses setup-style blocks outside setup().
    table = block.scope.param(ZEROTH_BIAS, nn.initializers.zeros_init(),
                              (c.max_len, features), jnp.float32)
    return table[:length].astype(x.dtype)

  def _block(self, block: nn.Module, next_fun, args, kwargs):
    self.matched.append(_name(block))
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
    if frame.denses != 2:
      raise ValueError(
          f"MLP block {_name(block)} ({type(block).__name__}), matched by "
          f"{self.config.match.describe()}, calls {frame.denses} Dense layers directly; "
          "sparsify needs exactly two (Dense -> activation -> Dense). Pass match=... "
          "to select the right modules.")
    if position == "mlp_output":
      out = out + self._zeroth_bias(block, out)
    return out


def _kernel(dense: nn.Module) -> jax.Array:
  """A Dense's kernel as a matrix [inputs, outputs] (DenseGeneral's axes flattened)."""
  kernel = nn.meta.unbox(dense.variables["params"]["kernel"])
  return jnp.reshape(kernel, (-1, kernel.shape[-1]) if isinstance(dense, nn.Dense) else
                     (kernel.shape[0], -1))


def _name(module: nn.Module) -> str:
  return "/".join(module.path) or "<root>"


class Sparsified(nn.Module):
  """A Linen model whose MLP blocks run the method; see `sparsify` for the fields.

  Its params are the wrapped model's (same tree) plus `zeroth_bias` in each matched
  block. `__call__(*args, mixing=1.0, **kwargs)` calls the model; `mixing` is the
  JSReLU share k of activation='mixed' (e.g. `ops.activations.mixing_coefficient`)
  and is not passed on. Other methods: `apply(v, 'encode', x, method='call_method')`.
  """
  module: nn.Module
  activation: ActivationName = "jsrelu"
  zeroth_bias: ZerothBiasPosition | None = None
  max_len: int = 0
  weight_noise: tuple[float, float] = (0.0, 0.0)
  match: MlpRule = MlpRule()

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, mixing: jax.Array | float = 1.0, **kwargs):
    return self.call_method("__call__", *args, mixing=mixing, **kwargs)

  def call_method(self, method: str, *args, mixing: jax.Array | float = 1.0, **kwargs):
    """Runs the wrapped model's `method` with its MLP blocks sparsified."""
    interceptor = _Interceptor(self, mixing)
    with nn.intercept_methods(interceptor):
      out = getattr(self.module, method)(*args, **kwargs)
    if not interceptor.matched:
      seen = ", ".join(list(dict.fromkeys(interceptor.seen))[:12]) or "none"
      raise ValueError(
          f"sparsify found no MLP block in {type(self.module).__name__}.{method}: no "
          f"module matched {self.match.describe()}. Modules called: {seen}. Pass "
          "match=YourMlpClass, match=r'regex on the module path' (e.g. 'mlp$') or "
          "match=lambda module: ... to sparsify().")
    return out


def sparsify(module: nn.Module, *, activation: ActivationName = "jsrelu",
             zeroth_bias: ZerothBiasPosition | None = None, max_len: int = 0,
             weight_noise: float | tuple[float, float] = 0.0,
             match: Match = None) -> Sparsified:
  """Returns `module` with its MLP blocks sparsified, as a Linen module.

  Args:
    module: any unbound Flax Linen model.
    activation: 'jsrelu' (J-SquaredReLU), 'relu', or 'mixed' ((1 - k) relu + k jsrelu
      with k passed as `mixing=` to each call).
    zeroth_bias: None, 'mlp_input' (added to the block's input) or 'mlp_output' (to its
      output, as the official code). One zero-initialised [max_len, d_model] param per
      block, so a pretrained model starts exactly where it was.
    max_len: rows of each zeroth bias table (longest sequence; the axis before last).
    weight_noise: rho of per-token weight noise on the first and second Dense of each
      block (one float: both), drawn only when `apply` gets rngs={'weight_noise': key}.
    match: which modules are MLP blocks: None (classes named MlpBlock, MLPBlock, Mlp,
      MLP, FeedForward), a Module class or tuple of classes, a regex searched in the
      '/'-joined module path, a callable(module) -> bool, or an `MlpRule`.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; expected one of {ACTIVATIONS}.")
  if zeroth_bias is not None and zeroth_bias not in ZEROTH_BIAS_POSITIONS:
    raise ValueError(f"zeroth_bias={zeroth_bias!r}; expected None or one of "
                     f"{ZEROTH_BIAS_POSITIONS}.")
  if zeroth_bias is not None and max_len < 1:
    raise ValueError("A zeroth bias needs max_len >= 1 (the longest sequence length).")
  rhos = (tuple(weight_noise) if isinstance(weight_noise, (tuple, list))
          else (weight_noise, weight_noise))
  if len(rhos) != 2 or any(r < 0 for r in rhos):
    raise ValueError(f"weight_noise={weight_noise!r}; expected rho >= 0 or a pair.")
  return Sparsified(module, activation, zeroth_bias, max_len,
                    (float(rhos[0]), float(rhos[1])), mlp_rule(match))
