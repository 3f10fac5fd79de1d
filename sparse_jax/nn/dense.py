"""Dense layers with logical axis names and optional weight noise."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.ops import weight_noise

Dtype = Any
WEIGHT_NOISE_RNG = "weight_noise"


class DenseParams(nn.Module):
  """The kernel [in, out] and bias [out] (or None) of a dense layer, with logical axes.

  For ops that take the weights as arrays (the fused MLP op) while keeping the param
  names and init of `NoisyDense` (`<name>/kernel`, `<name>/bias`).
  """
  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    return dense_params(self, in_features)


def dense_params(module, in_features: int) -> tuple[jax.Array, jax.Array | None]:
  """Creates (or reads) `kernel` and `bias` in `module`'s scope from its attributes
  `features`, `axes`, `use_bias` and `kernel_init`."""
  kernel = module.param("kernel", nn.with_logical_partitioning(module.kernel_init,
                                                               module.axes),
                        (in_features, module.features), jnp.float32)
  bias = None
  if module.use_bias:
    bias = module.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), module.axes[-1:]), (module.features,), jnp.float32)
  return kernel, bias


class NoisyDense(nn.Module):
  """y = x W + b with logical axes (in_axis, out_axis) and optional weight noise.

  Weight noise (rho > 0) is drawn only when `deterministic=False` and the caller
  passed an rng stream named "weight_noise" to `apply`, so eval is always noise-free.
  """
  features: int
  axes: tuple[str, str]
  use_bias: bool = True
  weight_noise: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kernel, bias = dense_params(self, x.shape[-1])
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    if self.weight_noise > 0 and not deterministic and self.has_rng(WEIGHT_NOISE_RNG):
      y = weight_noise.dense_output_noise(y, x, kernel, self.weight_noise,
                                          self.make_rng(WEIGHT_NOISE_RNG))
    return y


def layer_norm(name: str, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
               epsilon: float = 1e-6) -> nn.LayerNorm:
  """A LayerNorm whose scale and bias carry the logical axis 'embed'."""
  return nn.LayerNorm(
      name=name, use_bias=use_bias, dtype=dtype, epsilon=epsilon,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def rms_norm(name: str, *, dtype: Dtype = jnp.float32, epsilon: float = 1e-6) -> nn.RMSNorm:
  """T5's layer norm: x / rms(x) * scale, no mean subtraction and no bias; scale on 'embed'."""
  return nn.RMSNorm(
      name=name, dtype=dtype, epsilon=epsilon,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)))
