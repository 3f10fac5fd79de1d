"""T5 encoder-decoder in the v1.0 layout (Raffel et al. 2020), with sparsity-aware MLPs.

v1.0 = ReLU feed-forward blocks without biases, RMS layer norm (scale only) before every
sublayer, relative position buckets shared by the layers of a stack, and input/output
embeddings tied (logits = x @ E^T / sqrt(d_model)). T5-Base (d_model 768, 12 heads of 64,
d_ff 3072, 12 + 12 layers, vocabulary 32128) has exactly 222,903,552 parameters.

Sparsified = J-SquaredReLU + a zeroth bias in each of the 24 feed-forward blocks (one
table of [max_len, d_model] per block; the decoder uses its first rows) + the restricted
RMS norm before each feed-forward block (its scale is clamped >= 1 by the post-update
projection, `sparse_jax.transforms.projections`), optionally weight noise on `wi`.

Parameter layout (paths the projections and metrics rely on):
  token_embedder/embedding                          [vocab, embed]
  encoder/relative_attention_bias/embedding         [buckets, heads]
  encoder/layer_<i>/{attn_norm, attention, mlp_norm, mlp}
  encoder/final_norm
  decoder/relative_attention_bias/embedding
  decoder/layer_<i>/{self_attn_norm, self_attention, cross_attn_norm, cross_attention,
                     mlp_norm, mlp}
  decoder/final_norm
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.nn.attention import MultiHeadAttention
from sparse_jax.nn.dense import rms_norm
from sparse_jax.nn.sparse_mlp import SparseMlp, ZerothBiasPosition
from sparse_jax.ops.mlp import MlpKernel
from sparse_jax.ops.activations import ActivationName

Dtype = Any
MASKED = -1e9  # Added to the logits of masked keys; exp() of it is exactly 0 in float32.


def relative_position_buckets(query_length: int, key_length: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucket [query_length, key_length] of each relative position key - query.

  Half the buckets (per direction, if bidirectional) hold exact distances 0..n-1; the
  rest cover distances up to `max_distance` logarithmically, farther ones share the last.
  Computed in numpy: lengths are static, so this is a constant of the compiled program.
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  distance = -relative  # > 0 for keys before the query.
  bucket = np.zeros_like(distance)
  if bidirectional:
    num_buckets //= 2
    bucket += (distance < 0) * num_buckets
    distance = np.abs(distance)
  else:
    distance = np.maximum(distance, 0)
  exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    log_ratio = np.log(np.maximum(distance, 1) / exact) / np.log(max_distance / exact)
  far = exact + (log_ratio * (num_buckets - exact)).astype(np.int64)
  far = np.minimum(far, num_buckets - 1)
  return (bucket + np.where(distance < exact, distance, far)).astype(np.int32)


class RelativePositionBias(nn.Module):
  """Learned scalar per (bucket, head), added to attention logits: [1, heads, q, k]."""
  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> jax.Array:
    table = self.param("embedding", nn.with_logical_partitioning(
        self.embedding_init, ("relpos_buckets", "heads")),
                       (self.num_buckets, self.num_heads), jnp.float32)
    buckets = relative_position_buckets(query_length, key_length,
                                        bidirectional=self.bidirectional,
                                        num_buckets=self.num_buckets,
                                        max_distance=self.max_distance)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 model; the defaults are T5-Base v1.0 (vanilla)."""
  vocab_size: int = 32128
  d_model: int = 768
  num_heads: int = 12
  head_dim: int = 64
  d_ff: int = 3072
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  activation: ActivationName = "relu"
  zeroth_bias_position: ZerothBiasPosition | None = None
  max_len: int = 512  # Rows of each zeroth bias table: the longest input or target.
  weight_noise: float = 0.0  # rho of per-token weight noise on the first MLP dense (wi).
  dtype: Dtype = jnp.float32
  mlp_kernel: MlpKernel = MlpKernel()  # How the MLP op runs ('xla' | 'pallas', tiles).


def _attention(cfg: T5Config, name: str) -> MultiHeadAttention:
  # T5's initialisation (Mesh TensorFlow): no 1/sqrt(head_dim) on the logits; the query
  # init is that much smaller instead.
  d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
  return MultiHeadAttention(
      cfg.num_heads, cfg.head_dim, use_bias=False, scale_logits=False, dtype=cfg.dtype,
      kernel_init=nn.initializers.normal(d ** -0.5),
      query_init=nn.initializers.normal((d * cfg.head_dim) ** -0.5),
      out_init=nn.initializers.normal(inner ** -0.5), name=name)


def _mlp(cfg: T5Config) -> SparseMlp:
  return SparseMlp(
      cfg.d_ff, cfg.activation, cfg.zeroth_bias_position, cfg.max_len,
      (cfg.weight_noise, 0.0), use_bias=False, dtype=cfg.dtype,
      dropout_rate=cfg.dropout_rate,
      kernel_init=nn.initializers.normal(cfg.d_model ** -0.5),
      out_init=nn.initializers.normal(cfg.d_ff ** -0.5), mlp_kernel=cfg.mlp_kernel,
      name="mlp")


def _position_bias(cfg: T5Config, bidirectional: bool) -> RelativePositionBias:
  return RelativePositionBias(
      cfg.num_heads, cfg.relative_attention_num_buckets,
      cfg.relative_attention_max_distance, bidirectional,
      embedding_init=nn.initializers.normal(cfg.d_model ** -0.5),
      name="relative_attention_bias")


class EncoderLayer(nn.Module):
  """x + SelfAttn(norm(x)), then x + MLP(mlp_norm(x))."""
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias, *, deterministic: bool, mixing):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    h = rms_norm("attn_norm", dtype=cfg.dtype)(x)
    x = x + drop(_attention(cfg, "attention")(h, bias))
    h = rms_norm("mlp_norm", dtype=cfg.dtype)(x)
    return x + drop(_mlp(cfg)(h, deterministic=deterministic, mixing=mixing))


class DecoderLayer(nn.Module):
  """x + causal SelfAttn, x + CrossAttn(encoder output), x + MLP, each on a normed x."""
  cfg: T5Config

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, *, deterministic: bool, mixing):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    h = rms_norm("self_attn_norm", dtype=cfg.dtype)(x)
    x = x + drop(_attention(cfg, "self_attention")(h, self_bias))
    h = rms_norm("cross_attn_norm", dtype=cfg.dtype)(x)
    x = x + drop(_attention(cfg, "cross_attention")(h, cross_bias, kv=encoded))
    h = rms_norm("mlp_norm", dtype=cfg.dtype)(x)
    return x + drop(_mlp(cfg)(h, deterministic=deterministic, mixing=mixing))


class Encoder(nn.Module):
  """Bidirectional layers over embedded inputs; `key_mask` [B, 1, 1, Li] hides padding."""
  cfg: T5Config

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic: bool, mixing):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    length = x.shape[1]
    bias = _position_bias(cfg, bidirectional=True)(length, length) + key_mask
    x = drop(x)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layer_{i}")(x, bias, deterministic=deterministic,
                                              mixing=mixing)
    return drop(rms_norm("final_norm", dtype=cfg.dtype)(x))


class Decoder(nn.Module):
  """Causal layers over embedded targets (shifted right), attending to the encoder."""
  cfg: T5Config

  @nn.compact
  def __call__(self, x, encoded, encoder_key_mask, *, deterministic: bool, mixing):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    length = x.shape[1]
    causal = np.where(np.tril(np.ones((length, length), bool)), 0.0, MASKED)
    self_bias = _position_bias(cfg, bidirectional=False)(length, length) + causal
    x = drop(x)
    for i in range(cfg.num_decoder_layers):
      x = DecoderLayer(cfg, name=f"layer_{i}")(x, encoded, self_bias, encoder_key_mask,
                                              deterministic=deterministic, mixing=mixing)
    return drop(rms_norm("final_norm", dtype=cfg.dtype)(x))


class T5(nn.Module):
  """T5 v1.0 encoder-decoder.

  `__call__(encoder_tokens [B, Li], decoder_tokens [B, Lt], train=...)` returns logits
  [B, Lt, vocab_size] in float32. Token id 0 is padding (and the decoder start token).
  """
  cfg: T5Config = T5Config()

  @nn.compact
  def __call__(self, encoder_tokens: jax.Array, decoder_tokens: jax.Array, *,
               train: bool, mixing: jax.Array | float = 1.0) -> jax.Array:
    cfg, deterministic = self.cfg, not train
    embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, name="token_embedder",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))
    key_mask = jnp.where(encoder_tokens > 0, 0.0, MASKED)[:, None, None, :]
    encoded = Encoder(cfg, name="encoder")(
        embedder(encoder_tokens), key_mask, deterministic=deterministic, mixing=mixing)
    decoded = Decoder(cfg, name="decoder")(
        embedder(decoder_tokens), encoded, key_mask, deterministic=deterministic,
        mixing=mixing)
    # Tied embeddings: T5 v1.0 rescales the decoder output by 1/sqrt(d_model).
    logits = embedder.attend(decoded * cfg.d_model ** -0.5)
    return logits.astype(jnp.float32)
