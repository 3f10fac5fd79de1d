"""The sparsity-aware Transformer MLP block.

    [x + b0] -> z = x W1 + b1 -> a = f(z) -> y = a W2 + b2 -> [y + b0]

b0 is the zeroth bias (one learnable row per token position, zero-initialised), added
either to the MLP input ('mlp_input', the follow-up paper's text) or to its output
('mlp_output', the official code). f is ReLU, J-SquaredReLU or their mixture.

Observation hooks cost nothing unless asked for:
* `sow('intermediates', 'z' | 'a', ...)` stores pre-activations and activations only
  when the caller makes 'intermediates' mutable (metric steps);
* `perturb('z' | 'y', ...)` adds zero-valued probes whose gradients are dL/dz and dL/dy
  per token, only when the caller passes a 'perturbations' collection.
"""
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.nn.dense import NoisyDense
from sparse_jax.ops.activations import ActivationName, apply_activation

Dtype = Any
ZerothBiasPosition = Literal["mlp_input", "mlp_output"]
ZEROTH_BIAS_POSITIONS = ("mlp_input", "mlp_output")


class SparseMlp(nn.Module):
  """MLP block with a configurable activation, zeroth bias and weight noise.

  Attributes:
    d_ff: hidden width.
    activation: 'relu', 'jsrelu' or 'mixed' ((1 - k) relu + k jsrelu, k from the call).
    zeroth_bias_position: None (no zeroth bias), 'mlp_input' or 'mlp_output'.
    max_len: rows of the zeroth bias table (longest sequence the block accepts).
    weight_noise: rho of the per-token weight noise, per dense layer ('wi', 'wo').
    use_bias: whether the two dense layers have biases (T5 has none).
    dropout_rate: dropout on the activations a (T5), after they are observed.
    kernel_init: init of W1 (and of W2 unless `out_init` is given).
  """
  d_ff: int
  activation: ActivationName = "relu"
  zeroth_bias_position: ZerothBiasPosition | None = None
  max_len: int = 0
  weight_noise: tuple[float, float] = (0.0, 0.0)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  out_init: nn.initializers.Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               mixing: jax.Array | float = 1.0) -> jax.Array:
    d_model, length = x.shape[-1], x.shape[-2]
    zeroth_bias = None
    if self.zeroth_bias_position is not None:
      if self.zeroth_bias_position not in ZEROTH_BIAS_POSITIONS:
        raise ValueError(f"zeroth_bias_position={self.zeroth_bias_position!r}; expected "
                         f"None or one of {ZEROTH_BIAS_POSITIONS}.")
      if length > self.max_len:
        raise ValueError(f"Sequence length {length} exceeds the zeroth bias table "
                         f"({self.max_len} rows); raise max_len.")
      zeroth_bias = self.param(
          "zeroth_bias",
          nn.with_logical_partitioning(nn.initializers.zeros_init(), ("position", "embed")),
          (self.max_len, d_model), jnp.float32)[:length].astype(self.dtype)
    if self.zeroth_bias_position == "mlp_input":
      x = x + zeroth_bias
    z = NoisyDense(self.d_ff, ("embed", "mlp"), use_bias=self.use_bias,
                   weight_noise=self.weight_noise[0], kernel_init=self.kernel_init,
                   dtype=self.dtype, name="wi")(x, deterministic=deterministic)
    z = self.perturb("z", z)
    a = apply_activation(self.activation, z, mixing)
    self.sow("intermediates", "z", z)
    self.sow("intermediates", "a", a)
    if self.dropout_rate > 0:
      a = nn.Dropout(self.dropout_rate)(a, deterministic=deterministic)
    y = NoisyDense(d_model, ("mlp", "embed"), use_bias=self.use_bias,
                   weight_noise=self.weight_noise[1],
                   kernel_init=self.out_init or self.kernel_init,
                   dtype=self.dtype, name="wo")(a, deterministic=deterministic)
    y = self.perturb("y", y)
    if self.zeroth_bias_position == "mlp_output":
      y = y + zeroth_bias
    return y
