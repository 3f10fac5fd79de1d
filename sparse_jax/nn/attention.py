"""Multi-head attention with logical axis names on every parameter."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = nn.initializers.Initializer


def torch_in_projection_init(stacked: int = 3) -> Initializer:
  """torch `MultiheadAttention`'s q/k/v init: Xavier uniform over the `stacked` [3d, d]
  in-projection matrix, so each kernel [d, ...] ~ U(+-sqrt(6 / (d + 3 d'))), d' its
  output width (std sqrt(2 / (4 d)) = 0.0255 at d = 768, not Xavier's 0.0361 of one
  [d, d] matrix)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = shape[0], math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + stacked * fan_out))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_out_projection_init() -> Initializer:
  """torch `MultiheadAttention`'s out projection: `nn.Linear`'s default (Kaiming
  uniform, a = sqrt(5)) = U(+-1/sqrt(fan_in)) (std 0.0208 at width 768)."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


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
    dropout_rate: dropout on the attention probabilities when called with
      deterministic=False (HF T5 uses its dropout rate, 0.1, here too).
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  scale_logits: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  query_init: Initializer | None = None
  out_init: Initializer | None = None
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None,
               kv: jax.Array | None = None, *, decode_position: jax.Array | None = None,
               cache_length: int = 0, deterministic: bool = True) -> jax.Array:
    """Attention of x's queries over `kv` (default x); see the class docstring.

    Decoding (`decode_position` given, the position of x's first token) keeps keys and
    values in the 'cache' collection, created on the first call with it mutable:
    self-attention (`kv` None) writes x's keys and values into a [batch,
    `cache_length`, heads, kv] cache at `decode_position` and attends over the whole
    cache (`bias` must mask the positions not yet written); cross-attention projects
    `kv` once, on that first call, and later calls read the cached projections.
    """
    def projection(name, axes, features, axis, init):
      return nn.DenseGeneral(
          features, axis=axis, name=name, use_bias=self.use_bias, dtype=self.dtype,
          kernel_init=nn.with_logical_partitioning(init, axes),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                 axes[len(axes) - len(features):]))

    heads, axes = (self.num_heads, self.head_dim), ("embed", "heads", "kv")
    q = projection("query", axes, heads, -1, self.query_init or self.kernel_init)(x)
    key = lambda inputs: projection("key", axes, heads, -1, self.kernel_init)(inputs)
    value = lambda inputs: projection("value", axes, heads, -1, self.kernel_init)(inputs)
    if decode_position is None:
      kv = x if kv is None else kv
      k, v = key(kv), value(kv)
    elif kv is not None:  # Cross-attention: the encoder's keys/values, projected once.
      k = self.variable("cache", "cached_key", key, kv).value
      v = self.variable("cache", "cached_value", value, kv).value
    else:  # Self-attention: this step's keys/values join the earlier ones.
      shape = (x.shape[0], cache_length, *heads)
      cached = [self.variable("cache", name, jnp.zeros, shape, self.dtype)
                for name in ("cached_key", "cached_value")]
      for var, new in zip(cached, (key(x), value(x))):
        var.value = jax.lax.dynamic_update_slice_in_dim(
            var.value, new.astype(self.dtype), decode_position, axis=1)
      k, v = (var.value for var in cached)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if self.scale_logits:
      logits = logits / jnp.sqrt(self.head_dim).astype(self.dtype)
    if bias is not None:
      logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    if self.dropout_rate > 0:  # Uses the 'dropout' rng, only when not deterministic.
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return projection("out", ("heads", "kv", "embed"), (x.shape[-1],), (-2, -1),
                      self.out_init or self.kernel_init)(out)
