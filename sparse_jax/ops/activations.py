"""MLP activations: ReLU, GELU, J-SquaredReLU, the mixtures that bridge a pretrained
activation to JSReLU while finetuning, and the shifted S-shaped activation of the papers'
validation experiment.

J-SquaredReLU (Peng et al., arXiv 2309.03004) is f(z) = (z^2/2 + z) * 1[z >= 0]. Its
derivative (z + 1) * 1[z >= 0] is 1 at z = 0 and jumps from 0 just below it: a unit that
is active at all gets a gradient of at least 1, so making it inactive is preferred when
the loss allows, which is what drives activation sparsity.
"""
import dataclasses
from typing import Literal, Union

import jax
import jax.numpy as jnp

ActivationName = Literal["relu", "jsrelu", "mixed", "gelu", "gelu_tanh"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jsrelu", "mixed", "gelu", "gelu_tanh")
# Activations a finetune can start from: 'gelu' is the exact (erf) GELU of HF's "gelu"
# (HF ViT), 'gelu_tanh' the tanh approximation of HF's "gelu_new" (T5 v1.1, Flan-T5) and
# of flax's nn.gelu (big_vision / vision_transformer ViTs).
SOURCE_ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "jsrelu")


@dataclasses.dataclass(frozen=True)
class SShaped:
  """The shifted S-shaped activation, with its parameters (hashable: static under jit).

      f(z) = relu(u - w)^2 - relu(-u - w)^2 + s_y,   u = z - s_x

  Flat (f = s_y, f' = 0) on [s_x - w, s_x + w], quadratic outside. The papers' CIFAR-10
  validation moves this flat region by s_x, s_y = +-1.6 (w = 1.5) to show that training
  concentrates z where f' = 0 wherever that is, i.e. that gradient sparsity, not the
  value 0, is what training seeks.
  """
  shift_x: float = 0.0
  shift_y: float = 0.0
  half_width: float = 1.5


@dataclasses.dataclass(frozen=True)
class Mixed:
  """(1 - k) source(z) + k jsrelu(z): the finetuning bridge from a checkpoint whose MLPs
  use `source` ('relu', 'gelu', 'gelu_tanh'). `Mixed("relu")` is the name 'mixed'."""
  source: str = "relu"


# What every function taking an activation accepts: a name, or a parametrised SShaped
# or Mixed.
Activation = Union[ActivationName, SShaped, Mixed]


def mixed(source: str) -> Activation:
  """The mixed activation from `source`: the name 'mixed' for ReLU (what the block-sparse
  kernels take), else a `Mixed`."""
  if source not in SOURCE_ACTIVATIONS:
    raise ValueError(f"Cannot mix from activation {source!r}; expected one of "
                     f"{SOURCE_ACTIVATIONS}.")
  return "mixed" if source == "relu" else Mixed(source)


def zero_below_zero(activation: Activation) -> bool:
  """Whether f(z) and f'(z) are 0 for every z < 0 (ReLU, JSReLU and their mixture): the
  premise of the block-sparse kernels and of sparse decoding. GELU is not."""
  return activation in ("relu", "jsrelu", "mixed") or activation == Mixed("relu")


def relu(z: jax.Array) -> jax.Array:
  """max(z, 0), with derivative 1[z > 0] (0 at z = 0, as in PyTorch).

  `jnp.maximum` would split the tie at 0 and give 0.5 there.
  """
  return jnp.where(z > 0, z, jnp.zeros_like(z))


def jsrelu(z: jax.Array) -> jax.Array:
  """J-SquaredReLU: (z^2/2 + z) for z >= 0, else 0.

  Plain autodiff of this `where` gives exactly f'(z) = (z + 1) * 1[z >= 0], including
  f'(0) = 1 (the `where` picks the active branch at 0).
  """
  return jnp.where(z >= 0, z * z / 2 + z, jnp.zeros_like(z))


def gelu(z: jax.Array) -> jax.Array:
  """z * Phi(z), exact (erf): HF's "gelu"."""
  return jax.nn.gelu(z, approximate=False)


def gelu_tanh(z: jax.Array) -> jax.Array:
  """GELU's tanh approximation: HF's "gelu_new", flax's `nn.gelu` default."""
  return jax.nn.gelu(z, approximate=True)


def mixed_activation(z: jax.Array, k: jax.Array | float, source: str = "relu") -> jax.Array:
  """(1 - k) source(z) + k jsrelu(z): the finetuning bridge from a `source` checkpoint."""
  k = jnp.asarray(k, z.dtype)
  return (1 - k) * apply_activation(source, z) + k * jsrelu(z)


def mixing_coefficient(step: jax.Array | int, mixing_steps: int) -> jax.Array:
  """k = clip(step / T_mix, 0, 1); T_mix = 0 means a direct swap (k = 1 from step 0)."""
  if mixing_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.clip(jnp.asarray(step, jnp.float32) / mixing_steps, 0.0, 1.0)


def s_shaped(z: jax.Array, spec: SShaped = SShaped()) -> jax.Array:
  """The S-shaped activation `spec` (see SShaped); its autodiff derivative is
  2 (u - w) above the flat region, -2 (u + w) below it and exactly 0 on it."""
  u = z - jnp.asarray(spec.shift_x, z.dtype)
  w = jnp.asarray(spec.half_width, z.dtype)
  zero = jnp.zeros_like(z)
  # `where` (not relu(.)^2 via maximum) keeps the derivative 0 at the region's edges.
  upper = jnp.where(u > w, jnp.square(u - w), zero)
  lower = jnp.where(u < -w, jnp.square(u + w), zero)
  return upper - lower + jnp.asarray(spec.shift_y, z.dtype)


def apply_activation(name: Activation, z: jax.Array,
                     k: jax.Array | float = 1.0) -> jax.Array:
  """Applies the activation `name` (or an SShaped / Mixed); `k` is the JSReLU share of
  the mixtures."""
  if isinstance(name, SShaped):
    return s_shaped(z, name)
  if isinstance(name, Mixed):
    return mixed_activation(z, k, name.source)
  if name == "relu":
    return relu(z)
  if name == "jsrelu":
    return jsrelu(z)
  if name == "mixed":
    return mixed_activation(z, k)
  if name == "gelu":
    return gelu(z)
  if name == "gelu_tanh":
    return gelu_tanh(z)
  raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


def activation_derivative(name: Activation, z: jax.Array,
                          k: jax.Array | float = 1.0) -> jax.Array:
  """f'(z) as autodiff of `apply_activation` gives it (the ties at 0 included)."""
  one, zero = jnp.ones_like(z), jnp.zeros_like(z)
  if isinstance(name, SShaped):
    u = z - jnp.asarray(name.shift_x, z.dtype)
    w = jnp.asarray(name.half_width, z.dtype)
    return (jnp.where(u > w, 2 * (u - w), zero) + jnp.where(u < -w, -2 * (u + w), zero))
  relu_grad = jnp.where(z > 0, one, zero)
  jsrelu_grad = jnp.where(z >= 0, z + 1, zero)
  if name in ("gelu", "gelu_tanh"):
    # Elementwise, so the derivative of the sum is f'(z) per element.
    return jax.grad(lambda v: jnp.sum(apply_activation(name, v)))(z)
  if isinstance(name, Mixed):
    k = jnp.asarray(k, z.dtype)
    return (1 - k) * activation_derivative(name.source, z) + k * jsrelu_grad
  if name == "relu":
    return relu_grad
  if name == "jsrelu":
    return jsrelu_grad
  if name == "mixed":
    k = jnp.asarray(k, z.dtype)
    return (1 - k) * relu_grad + k * jsrelu_grad
  raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")
