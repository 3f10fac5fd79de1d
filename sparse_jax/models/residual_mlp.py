"""Residual LayerNorm MLP: the papers' model for the spectral-concentration bound.

    z = Linear(flatten(image))                       in -> width
    4 x  z <- relu(Linear(LN(z))) + z                 LN without scale and bias
    logits = Linear(z)                               width -> classes

Observation hooks, as in `nn.SparseMlp`, cost nothing unless asked for: each block sows
its pre-activation 'z', activation 'a' and hidden kernel 'w1' into 'intermediates'
(so activation density and the spectral metrics of W1 work on it), and has a zero
probe 'block_output' on its output whose gradient is dL/d(block output) per example
(for `metrics.gradient_noise_anisotropy`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.nn.dense import DenseParams, NoisyDense
from sparse_jax.ops.activations import relu

Dtype = Any


class ResidualBlock(nn.Module):
  """z + relu(LN(z) W + b), LN without learnable scale or bias."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    width = z.shape[-1]
    h = nn.LayerNorm(use_bias=False, use_scale=False, dtype=self.dtype, name="norm")(z)
    kernel, bias = DenseParams(width, ("embed", "mlp"), name="hidden")(width)
    pre = jnp.dot(h, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    a = relu(pre)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "z", jax.lax.stop_gradient(pre))
      self.sow("intermediates", "a", jax.lax.stop_gradient(a))
      self.sow("intermediates", "w1", jax.lax.stop_gradient(kernel))
    # The probe's gradient is dL/d(block output); zero-valued, so the output is unchanged.
    return self.perturb("block_output", a + z)


class ResidualMlp(nn.Module):
  """Images [B, H, W, C] -> logits [B, classes] through `num_blocks` residual blocks."""
  num_classes: int
  width: int
  num_blocks: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               mixing: jax.Array | float = 1.0) -> jax.Array:
    del train, mixing  # Same call as the other models; nothing here depends on them.
    x = images.reshape(images.shape[0], -1).astype(self.dtype)
    z = NoisyDense(self.width, ("pixels", "embed"), dtype=self.dtype, name="input")(x)
    for i in range(self.num_blocks):
      z = ResidualBlock(self.dtype, name=f"block_{i}")(z)
    head = NoisyDense(self.num_classes, ("embed", "classes"), dtype=self.dtype,
                      name="head")
    return head(z).astype(jnp.float32)
