"""The sparsity-aware Transformer MLP block.

    [x + b0] -> z = x W1 + b1 -> a = f(z) -> y = a W2 + b2 -> [y + b0]

b0 is the zeroth bias (one learnable row per token position, zero-initialised), added
either to the MLP input ('mlp_input', the follow-up paper's text) or to its output
('mlp_output', the official code). f is ReLU, GELU, J-SquaredReLU or a mixture.

Gated (T5 v1.1, Flan-T5): a = f(x W1) * (x W1') with a second, linear input kernel W1'
(`wi_linear`); W1 (`wi`) is the gate, so z, f'(z) and dL/dz are the gate's and the
observed activation a is the product (what the second matmul reads, whose zeros are
the skippable work).

Observation hooks cost nothing unless asked for:
* `sow('intermediates', 'z' | 'a' | 'x' | 'derivative' | 'w1' | 'w2', ...)` stores
  pre-activations, activations, the MLP input, f'(z) and the two kernels only when the
  caller makes 'intermediates' mutable (metric steps);
* `perturb('z' | 'y', ...)` adds zero-valued probes whose gradients are dL/dz and dL/dy
  per token, only when the caller passes a 'perturbations' collection.
"""
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.nn.dense import WEIGHT_NOISE_RNG, DenseParams
from sparse_jax.ops import mlp as mlp_op
from sparse_jax.ops import weight_noise
from sparse_jax.ops.mlp_decode import mlp_decode
from sparse_jax.ops.activations import (Activation, activation_derivative,
                                         apply_activation, zero_below_zero)

Dtype = Any
ZerothBiasPosition = Literal["mlp_input", "mlp_output"]
ZEROTH_BIAS_POSITIONS = ("mlp_input", "mlp_output")


class SparseMlp(nn.Module):
  """MLP block with a configurable activation, zeroth bias and weight noise.

  Attributes:
    d_ff: hidden width.
    activation: 'relu', 'jsrelu' or 'mixed' ((1 - k) relu + k jsrelu, k from the call),
      or an `ops.activations.SShaped` (with `mlp_kernel.impl='xla'`).
    zeroth_bias_position: None (no zeroth bias), 'mlp_input' or 'mlp_output'.
    max_len: rows of the zeroth bias table (longest sequence the block accepts).
    weight_noise: rho of the per-token weight noise, per dense layer ('wi', 'wo').
    use_bias: whether the two dense layers have biases (T5 has none).
    dropout_rate: dropout on the activations a (T5), after they are observed.
    kernel_init: init of W1 (and of W2 unless `out_init` is given).
    mlp_kernel: how the fused MLP op runs (`impl` 'xla' | 'pallas', tiles, mesh).
    gated: a = f(x W1) * (x W1_linear) (T5 v1.1); runs as plain jnp (impl 'xla').
  """
  d_ff: int
  activation: Activation = "relu"
  zeroth_bias_position: ZerothBiasPosition | None = None
  max_len: int = 0
  weight_noise: tuple[float, float] = (0.0, 0.0)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  out_init: nn.initializers.Initializer | None = None
  mlp_kernel: mlp_op.MlpKernel = mlp_op.MlpKernel()
  gated: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               mixing: jax.Array | float = 1.0, position: jax.Array | int | None = None,
               sparse_decode: bool = False) -> jax.Array:
    """y for x [..., length, d_model].

    Args:
      x: the tokens.
      deterministic: no dropout and no weight noise.
      mixing: the JSReLU share of the 'mixed' activation.
      position: decoding: the true position of x's first token (traced is fine). The
        zeroth bias then adds rows position .. position + length - 1 of its table
        instead of rows 0 .. length - 1. The caller keeps position + length <= max_len
        (a traced position cannot be checked here; `dynamic_slice` would clamp it).
      sparse_decode: run the MLP through `ops.mlp_decode.mlp_decode`, which reads only
        the rows of W2 some token needs (same result up to rounding; deterministic
        calls with a named activation only).
    """
    d_model, length = x.shape[-1], x.shape[-2]
    zeroth_bias = None
    if self.zeroth_bias_position is not None:
      if self.zeroth_bias_position not in ZEROTH_BIAS_POSITIONS:
        raise ValueError(f"zeroth_bias_position={self.zeroth_bias_position!r}; expected "
                         f"None or one of {ZEROTH_BIAS_POSITIONS}.")
      if length > self.max_len:
        raise ValueError(f"Sequence length {length} exceeds the zeroth bias table "
                         f"({self.max_len} rows); raise max_len.")
      table = self.param(
          "zeroth_bias",
          nn.with_logical_partitioning(nn.initializers.zeros_init(), ("position", "embed")),
          (self.max_len, d_model), jnp.float32)
      if position is None:
        zeroth_bias = table[:length]
      else:  # A decode step: the rows of the tokens' true positions, not the first ones.
        zeroth_bias = jax.lax.dynamic_slice_in_dim(table, position, length, axis=0)
      zeroth_bias = zeroth_bias.astype(self.dtype)
    if self.zeroth_bias_position == "mlp_input":
      x = x + zeroth_bias
    x = x.astype(self.dtype)
    w1, b1 = DenseParams(self.d_ff, ("embed", "mlp"), self.use_bias, self.kernel_init,
                         name="wi")(d_model)
    linear = None
    if self.gated:
      w1_linear, b1_linear = DenseParams(self.d_ff, ("embed", "mlp"), self.use_bias,
                                         self.kernel_init, name="wi_linear")(d_model)
      linear = _pre_activation(x, w1_linear, b1_linear, None, self.dtype)
    w2, b2 = DenseParams(d_model, ("mlp", "embed"), self.use_bias,
                         self.out_init or self.kernel_init, name="wo")(self.d_ff)
    hidden_shape = x.shape[:-1] + (self.d_ff,)
    z_offset = self._z_offset(x, w1, hidden_shape, deterministic)
    wo_noise = self._noise_rng(self.weight_noise[1], deterministic)
    if self.is_mutable_collection("intermediates") or wo_noise is not None:
      # Observed values: recomputed outside the fused op (XLA merges the duplicate
      # x W1 when the op is the jnp one). Dropout comes after observation.
      z = jax.lax.stop_gradient(_pre_activation(x, w1, b1, z_offset, self.dtype))
      a = apply_activation(self.activation, z, mixing)
      if linear is not None:
        a = a * jax.lax.stop_gradient(linear)
      self.sow("intermediates", "z", z)
      self.sow("intermediates", "a", a)
      # For the theory metrics (`metrics.flatness_metrics`, `spectral_metrics`): the
      # MLP input, f'(z) and the kernels this call used (LoRA-merged, cast).
      self.sow("intermediates", "x", jax.lax.stop_gradient(x))
      self.sow("intermediates", "derivative", activation_derivative(self.activation, z,
                                                                    mixing))
      self.sow("intermediates", "w1", jax.lax.stop_gradient(w1))
      self.sow("intermediates", "w2", jax.lax.stop_gradient(w2))
    keep = None
    if self.dropout_rate > 0 and not deterministic:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate,
                                  hidden_shape)
    cast = lambda p: None if p is None else p.astype(self.dtype)
    if linear is not None:
      if sparse_decode or self.mlp_kernel.impl != "xla":
        raise ValueError("A gated MLP runs only as plain jnp (mlp_impl='xla', no "
                         "sparse_decode).\nFix: pass --config.mlp_impl=xla and decode "
                         "with sparse_mlp=False.")
      y = _gated_mlp(x, cast(w1), cast(b1), cast(w2), cast(b2), linear, self.activation,
                     mixing, z_offset, keep, self.dropout_rate)
    elif sparse_decode:
      if (not zero_below_zero(self.activation) or z_offset is not None
          or keep is not None):
        raise ValueError(
            f"sparse_decode needs a deterministic call without probes and a named "
            f"activation ('relu', 'jsrelu', 'mixed'); got activation={self.activation!r}, "
            f"deterministic={deterministic}.\nFix: decode with deterministic=True and "
            "no 'perturbations', or with sparse_decode=False.")
      y = mlp_decode(x, cast(w1), cast(b1), cast(w2), cast(b2), activation=self.activation,
                     mixing=mixing)
    else:
      y = mlp_op.mlp(x, cast(w1), cast(b1), cast(w2), cast(b2), activation=self.activation,
                     mixing=mixing, z_offset=z_offset, dropout_keep=keep,
                     dropout_rate=self.dropout_rate, kernel=self.mlp_kernel)
    if wo_noise is not None:
      if keep is not None:  # W2 sees the dropped, rescaled activations.
        a = jnp.where(keep, a / (1.0 - self.dropout_rate), jnp.zeros_like(a))
      y = weight_noise.dense_output_noise(y, a, w2, self.weight_noise[1], wo_noise)
    y = self.perturb("y", y)
    if self.zeroth_bias_position == "mlp_output":
      y = y + zeroth_bias
    return y

  def _noise_rng(self, rho: float, deterministic: bool) -> jax.Array | None:
    if rho > 0 and not deterministic and self.has_rng(WEIGHT_NOISE_RNG):
      return self.make_rng(WEIGHT_NOISE_RNG)
    return None

  def _z_offset(self, x, w1, hidden_shape, deterministic) -> jax.Array | None:
    """The z probe (dL/dz for metrics) plus W1's weight noise, or None when neither."""
    offset = None
    # As `perturb` itself: a probe exists at init, when the caller collects probe shapes
    # (mutable 'perturbations') and when the caller passes probes.
    if (self.is_initializing() or self.is_mutable_collection("perturbations")
        or self.has_variable("perturbations", "z")):
      offset = self.perturb("z", jnp.zeros(hidden_shape, self.dtype))
    rng = self._noise_rng(self.weight_noise[0], deterministic)
    if rng is not None:
      noise = weight_noise.dense_output_noise(jnp.zeros(hidden_shape, self.dtype), x, w1,
                                              self.weight_noise[0], rng)
      offset = noise if offset is None else offset + noise
    return offset


def _gated_mlp(x, w1, b1, w2, b2, linear, activation, mixing, z_offset, keep,
               dropout_rate):
  """f(x W1 + b1 + z_offset) * linear, dropped out, times W2, plus b2 (plain jnp)."""
  z = jnp.dot(x, w1, preferred_element_type=jnp.float32).astype(x.dtype)
  if b1 is not None:
    z = z + b1
  if z_offset is not None:
    z = z + z_offset
  a = apply_activation(activation, z, mixing) * linear
  if keep is not None:
    a = jnp.where(keep, a / (1.0 - dropout_rate), jnp.zeros_like(a))
  y = jnp.dot(a, w2, preferred_element_type=jnp.float32).astype(x.dtype)
  return y if b2 is None else y + b2


def _pre_activation(x, w1, b1, z_offset, dtype):
  z = jnp.dot(x, w1.astype(dtype))
  if b1 is not None:
    z = z + b1.astype(dtype)
  return z if z_offset is None else z + z_offset
