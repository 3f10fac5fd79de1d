"""MLP activations: ReLU, J-SquaredReLU and the ReLU -> JSReLU mixture.

J-SquaredReLU (Peng et al., arXiv 2309.03004) is f(z) = (z^2/2 + z) * 1[z >= 0]. Its
derivative (z + 1) * 1[z >= 0] is 1 at z = 0 and jumps from 0 just below it: a unit that
is active at all gets a gradient of at least 1, so making it inactive is preferred when
the loss allows, which is what drives activation sparsity.
"""
from typing import Literal

import jax
import jax.numpy as jnp

ActivationName = Literal["relu", "jsrelu", "mixed"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jsrelu", "mixed")


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


def apply_activation(name: ActivationName, z: jax.Array,
                     k: jax.Array | float = 1.0) -> jax.Array:
  """Applies the activation `name`; `k` is the JSReLU share used by 'mixed'."""
  if name == "relu":
    return relu(z)
  if name == "jsrelu":
    return jsrelu(z)
  if name == "mixed":
    return mixed_activation(z, k)
  raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


def activation_derivative(name: ActivationName, z: jax.Array,
                          k: jax.Array | float = 1.0) -> jax.Array:
  """f'(z) as autodiff of `apply_activation` gives it (the ties at 0 included)."""
  one, zero = jnp.ones_like(z), jnp.zeros_like(z)
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
