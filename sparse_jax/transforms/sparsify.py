"""`sparsify`: the method inside someone else's Flax Linen model, without editing it.

    sparse = sparsify(model)  # JSReLU, zeroth bias on each MLP block's output.
    params = merge_pretrained(sparse, pretrained, x, train=False)
    logits = sparse.apply({"params": params}, x, train=False)

(`merge_pretrained` and `optax_projections` are in `sparsify_params`.)

Mechanism: `Sparsified` wraps the model, shares its scope (`nn.share_scope`, so the
parameter tree is the model's own, plus one `zeroth_bias` leaf per MLP block) and runs
it under `nn.intercept_methods`. The interceptor (`sparsify_block.BlockInterceptor`)
watches the calls of modules the rule matches (`mlp_rule.MlpRule`; default: classes
named `MlpBlock`, `MLPBlock`, `Mlp`, `MLP`, `FeedForward`) and rewrites each matched
block's direct dense calls (`nn.Dense`, `nn.DenseGeneral`, or its own dense class, as
t5x's, recognised by its kernel / bias params; or `dense_types=`): plain blocks (Dense -> f -> Dense)
and gated ones (Dense, Dense -> f(gate) * up -> Dense) get the chosen activation on
the gate, the zeroth bias, weight noise, probes and sown values; see that module.

Why this and not the alternatives: a wrapper that rebuilds the model (or a subclass of
the user's MLP) needs to know its constructor and its names; rewriting a jaxpr loses
Linen's variables and rngs. Interception keeps the user's module, names and init
untouched, works for compact and setup-style blocks (the zeroth bias is created through
the block's scope, which `Module.param` would refuse outside a compact method), and the
result is a plain Linen module: `init`, `apply`, `jit`, `mutable=`, `rngs=` all work.
The cost is that a matched block must call its Dense children directly in one of the
two shapes (anything else is an error naming the block and the shapes supported), and a
matched block's other children are left alone. A model with no matching block raises at
init/apply time, listing the modules that look like MLP blocks.
"""
import flax.linen as nn
import jax
from flax import nnx

from sparse_jax.nn.sparse_mlp import ZEROTH_BIAS_POSITIONS, ZerothBiasPosition
from sparse_jax.ops.activations import ACTIVATIONS, ActivationName
from sparse_jax.transforms.mlp_rule import Match, MlpRule, mlp_rule
from sparse_jax.transforms.sparsify_block import (ZEROTH_BIAS, ZEROTH_BIAS_INDEX,
                                                  BlockInterceptor, RootState)
from sparse_jax.transforms.sparsify_nnx import sparsify_nnx

__all__ = ["Sparsified", "sparsify", "ZEROTH_BIAS", "ZEROTH_BIAS_INDEX",
           "DEFAULT_GATE_PATTERN"]

# Which of a gated block's two input projections is the gate, by the Dense's name.
DEFAULT_GATE_PATTERN = r"(?i)gate"


class Sparsified(nn.Module):
  """A Linen model whose MLP blocks run the method; see `sparsify` for the fields.

  Its params are the wrapped model's (same tree) plus `zeroth_bias` in each matched
  block. `__call__(*args, mixing=1.0, **kwargs)` calls the model; `mixing` is the
  JSReLU share k of activation='mixed' (e.g. `ops.activations.mixing_coefficient`)
  and is not passed on. Other methods: `apply(v, 'encode', x, method='call_method')`.
  """
  module: nn.Module
  activation: ActivationName = "jsrelu"
  zeroth_bias: ZerothBiasPosition | None = "mlp_output"
  max_len: int | None = None
  weight_noise: tuple[float, float] = (0.0, 0.0)
  match: MlpRule = MlpRule()
  gate: str | None = DEFAULT_GATE_PATTERN
  observe: bool = True
  dense_types: tuple[type, ...] | None = None

  def setup(self):
    nn.share_scope(self, self.module)

  def __call__(self, *args, mixing: jax.Array | float = 1.0, **kwargs):
    return self.call_method("__call__", *args, mixing=mixing, **kwargs)

  def mlp_rule_target(self) -> tuple[nn.Module, MlpRule]:
    """(the wrapped model, the rule): what `mlp_rule.find_mlp_blocks` looks into."""
    return self.module, self.match

  def call_method(self, method: str, *args, mixing: jax.Array | float = 1.0, **kwargs):
    """Runs the wrapped model's `method` with its MLP blocks sparsified."""
    interceptor = BlockInterceptor(
        self, RootState.of(self, self.weight_noise, self.observe), mixing)
    with nn.intercept_methods(interceptor):
      out = getattr(self.module, method)(*args, **kwargs)
    if not interceptor.matched:
      found = interceptor.candidates()
      looks = (f"Modules that look like MLP blocks (two Dense calls with an elementwise "
               f"function between them): {', '.join(found)}." if found else
               "No module called two Dense layers with an elementwise function between "
               "them.")
      raise ValueError(
          f"sparsify found no MLP block in {type(self.module).__name__}.{method}: no "
          f"module matched {self.match.describe()}. {looks}\nFix: pass "
          "match=YourMlpClass, match=r'regex on the module path' (e.g. 'mlp$') or "
          "match=lambda module: ... to sparsify().")
    return out


def sparsify(module: nn.Module | nnx.Module, *, activation: ActivationName = "jsrelu",
             zeroth_bias: ZerothBiasPosition | None = "mlp_output",
             max_len: int | None = None,
             weight_noise: float | tuple[float, float] = 0.0,
             match: Match = None, gate: str | None = DEFAULT_GATE_PATTERN,
             observe: bool = True,
             dense_types: type | tuple[type, ...] | None = None,
             rngs: nnx.Rngs | None = None) -> Sparsified | nnx.Module:
  """Returns `module` with its MLP blocks sparsified, as a Linen module; a Flax NNX
  model is sparsified in place and returned (`transforms.sparsify_nnx`).

  The defaults are the papers' sparsified recipe on the model's own MLPs:
  J-SquaredReLU, and a zero-initialised zeroth bias on each block's output whose
  table length is the sequence length of the input the params are initialised with;
  no weight noise.

  For an NNX model the blocks' dense layers are their `nnx.Linear` /
  `nnx.LinearGeneral` attributes, `max_len` is required (the tables are built now),
  `dense_types` is not supported, weight noise draws from `rngs` while the model is in
  training mode (`model.train()` / `model.eval()`), the hooks store values only inside
  `nnx.capture`, and the 'mixed' share is set with `set_mixing(model, k)`.

  Args:
    module: any unbound Flax Linen model, or a Flax NNX model.
    activation: 'jsrelu' (J-SquaredReLU, default), 'relu', or 'mixed' ((1 - k) relu +
      k jsrelu with k passed as `mixing=` to each call). In a gated block it replaces
      the gate's activation.
    zeroth_bias: 'mlp_output' (default: added to each block's output, as the official
      code), 'mlp_input' (to its input) or None (none). One zero-initialised [rows,
      d_model] param per block, so a pretrained model starts exactly where it was.
    max_len: rows of each zeroth bias table; None (default): the length (the axis before
      the features) of the block's input at init, so init with the longest sequence.
      Cached decoding (decode=True, 'cache' collection) adds the row of each token's
      position.
    weight_noise: rho of per-token weight noise on the input projections (the first
      Dense; a gated block's gate and up) and the output projection of each block (one
      float: both), drawn only when `apply` gets rngs={'weight_noise': key}.
    match: which modules are MLP blocks: None (classes named MlpBlock, MLPBlock, Mlp,
      MLP, FeedForward), a Module class or tuple of classes, a regex searched in the
      '/'-joined module path, a callable(module) -> bool, or an `MlpRule`.
    gate: regex on the Dense names of a gated block's two input projections that marks
      the gate (default 'gate', case-insensitive: gate_proj); when neither or both
      match, the first one called is the gate (t5x's wi_0, w1 in LLaMA-style code).
    observe: True (default): the hooks the metrics read (sown z, a, ...; zero probes
      on z and the block output in 'perturbations'). False leaves them out: the method
      itself (activation, zeroth bias, weight noise) runs unchanged, nothing is sown
      or probed, and the blocks run inside lifted transforms that carry only 'params'
      (and 'dropout'), such as big_vision's nn.scan over layers; the metrics then have
      nothing to read.
    dense_types: which children of a block are its dense layers. None (default):
      nn.Dense, nn.DenseGeneral and any child whose params are a `kernel` (and
      optionally a `bias`) whose first axes are the input's last ones and whose output
      has the kernel's other axes (a contraction, as t5x's own `DenseGeneral`); a
      class or tuple of classes: nn.Dense, nn.DenseGeneral and those only.
    rngs: NNX models with weight noise only: an `nnx.Rngs` whose 'weight_noise'
      stream (else its default) seeds each block's own stream.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not one of the method's.\nFix: pass "
                     f"one of {ACTIVATIONS}.")
  if zeroth_bias is not None and zeroth_bias not in ZEROTH_BIAS_POSITIONS:
    raise ValueError(f"zeroth_bias={zeroth_bias!r} is not a zeroth bias position.\nFix: "
                     f"pass None or one of {ZEROTH_BIAS_POSITIONS}.")
  if max_len is not None and max_len < 1:
    raise ValueError(f"max_len={max_len!r} is not a table length.\nFix: pass None (the "
                     "length at init) or the longest sequence length (>= 1).")
  rhos = (tuple(weight_noise) if isinstance(weight_noise, (tuple, list))
          else (weight_noise, weight_noise))
  if len(rhos) != 2 or any(r < 0 for r in rhos):
    raise ValueError(f"weight_noise={weight_noise!r} is not a noise level.\nFix: pass "
                     "rho >= 0, or a pair (input projections, output projection).")
  if isinstance(module, nnx.Module):
    if dense_types is not None:
      raise ValueError("sparsify of an NNX model has no dense_types (its dense layers "
                       "are its nnx.Linear attributes).\nFix: leave dense_types=None.")
    return sparsify_nnx(module, rule=mlp_rule(match), activation=activation,
                        zeroth_bias=zeroth_bias, max_len=max_len, gate=gate,
                        observe=observe, weight_noise=(float(rhos[0]), float(rhos[1])),
                        rngs=rngs)
  if rngs is not None:
    raise ValueError("rngs= is for NNX models; a Linen model draws its weight noise from "
                     "apply's rngs.\nFix: drop rngs= and pass rngs={'weight_noise': key} "
                     "to apply.")
  if isinstance(dense_types, type):
    dense_types = (dense_types,)
  if dense_types is not None and not all(
      isinstance(t, type) and issubclass(t, nn.Module) for t in dense_types):
    raise TypeError(f"dense_types={dense_types!r} is not a tuple of Module classes.\n"
                    "Fix: pass None (recognised by their params) or your dense classes.")
  return Sparsified(module, activation, zeroth_bias, max_len,
                    (float(rhos[0]), float(rhos[1])), mlp_rule(match), gate, observe,
                    None if dense_types is None else tuple(dense_types))
