"""Multi-head self-attention with logical axis names on every parameter."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class MultiHeadAttention(nn.Module):
  """Self-attention; q/k/v kernels are [embed, heads, kv], the output [heads, kv, embed].

  `bias` (broadcastable to [batch, heads, q, k]) is added to the logits: attention masks
  and relative position biases both enter this way.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    def projection(name, axes, features, axis):
      return nn.DenseGeneral(
          features, axis=axis, name=name, use_bias=self.use_bias, dtype=self.dtype,
          kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                 axes[len(axes) - len(features):]))

    heads = (self.num_heads, self.head_dim)
    q, k, v = (projection(n, ("embed", "heads", "kv"), heads, -1)(x)
               for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(self.dtype)
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return projection("out", ("heads", "kv", "embed"), (x.shape[-1],), (-2, -1))(out)
