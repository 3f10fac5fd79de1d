"""MLP activations: ReLU, J-SquaredReLU, the ReLU -> JSReLU mixture, and the shifted
S-shaped activation of the papers' validation experiment.

J-SquaredReLU (Peng et al., arXiv 2309.03004) is f(z) = (z^2/2 + z) * 1[z >= 0]. Its
derivative (z + 1) * 1[z >= 0] is 1 at z = 0 and jumps from 0 just below it: a unit that
is active at all gets a gradient of at least 1, so making it inactive is preferred when
the loss allows, which is what drives activation sparsity.
"""
import dataclasses
from typing import Literal, Union

import jax
import jax.numpy as jnp

ActivationName = Literal["relu", "jsrelu", "mixed"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jsrelu", "mixed")


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


# What every function taking an activation accepts: a name, or a parametrised SShaped.
Activation = Union[ActivationName, SShaped]


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


def mixed_activation(z: jax.Array, k: jax.Array | float) -> jax.Array:
  """(1 - k) relu(z) + k jsrelu(z): the finetuning bridge from a ReLU checkpoint."""
  k = jnp.asarray(k, z.dtype)
  return (1 - k) * relu(z) + k * jsrelu(z)


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
  """Applies the activation `name` (or an SShaped); `k` is the JSReLU share of 'mixed'."""
  if isinstance(name, SShaped):
    return s_shaped(z, name)
  if name == "relu":
    return relu(z)
  if name == "jsrelu":
    return jsrelu(z)
  if name == "mixed":
    return mixed_activation(z, k)
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
  if name == "relu":
    return relu_grad
  if name == "jsrelu":
    return jsrelu_grad
  if name == "mixed":
    k = jnp.asarray(k, z.dtype)
    return (1 - k) * relu_grad + k * jsrelu_grad
  raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")
