"""Multi-head attention with logical axis names on every parameter."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = nn.initializers.Initializer


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention; q/k/v kernels are [embed, heads, kv], out [heads, kv, embed].

  `bias` (broadcastable to [batch, heads, q, k]) is added to the logits: attention masks
  and relative position biases both enter this way. `kv` (default: `x`) is the sequence
  attended to, e.g. the encoder output in a decoder's cross-attention.

  Attributes:
    num_heads, head_dim: the head layout (inner width num_heads * head_dim).
    use_bias: biases on the four projections (ViT yes, T5 no).
    scale_logits: divide logits by sqrt(head_dim). T5 does not; it folds that factor
      into the query initialisation instead (`query_init`).
    kernel_init: init of key/value/out kernels; `query_init` overrides it for the query.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  scale_logits: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  query_init: Initializer | None = None
  out_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None,
               kv: jax.Array | None = None) -> jax.Array:
    def projection(name, axes, features, axis, init):
      return nn.DenseGeneral(
          features, axis=axis, name=name, use_bias=self.use_bias, dtype=self.dtype,
          kernel_init=nn.with_logical_partitioning(init, axes),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                 axes[len(axes) - len(features):]))

    kv = x if kv is None else kv
    heads, axes = (self.num_heads, self.head_dim), ("embed", "heads", "kv")
    q = projection("query", axes, heads, -1, self.query_init or self.kernel_init)(x)
    k = projection("key", axes, heads, -1, self.kernel_init)(kv)
    v = projection("value", axes, heads, -1, self.kernel_init)(kv)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if self.scale_logits:
      logits = logits / jnp.sqrt(self.head_dim).astype(self.dtype)
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return projection("out", ("heads", "kv", "embed"), (x.shape[-1],), (-2, -1),
                      self.out_init or self.kernel_init)(out)
