"""T5 encoder-decoder in the v1.0 layout (Raffel et al. 2020), with sparsity-aware MLPs,
and the v1.1 / Flan-T5 variant (gated GELU MLPs, untied output without the rescale).

v1.0 = ReLU feed-forward blocks without biases, RMS layer norm (scale only) before every
sublayer, relative position buckets shared by the layers of a stack, and input/output
embeddings tied (logits = x @ E^T / sqrt(d_model); `tie_embeddings=False` gives the
output its own kernel, for the official finetune's LoRA on it). T5-Base (d_model 768, 12 heads of 64,
d_ff 3072, 12 + 12 layers, vocabulary 32128) has exactly 222,903,552 parameters.

Sparsified = J-SquaredReLU + a zeroth bias in each of the 24 feed-forward blocks (one
table of [max_len, d_model] per block; the decoder uses its first rows) + the restricted
RMS norm before each feed-forward block (its scale is clamped >= 1 by the post-update
projection, `sparse_jax.transforms.projections`), optionally weight noise on `wi`.

Decoding (`T5.decode_step`, the loop in `sparse_jax.decoding`): one token per call, with
the decoder's self-attention keys/values and the cross-attention's projections of the
encoder output kept in the 'cache' collection (created by the first call, with 'cache'
mutable), the relative position bias and the zeroth bias taken at the token's true
position, and optionally the decoder MLPs run through `ops.mlp_decode` (only the active
rows of W2 read).

Parameter layout (paths the projections and metrics rely on):
  token_embedder/embedding                          [vocab, embed]
  encoder/relative_attention_bias/embedding         [buckets, heads]
  encoder/layer_<i>/{attn_norm, attention, mlp_norm, mlp}
  encoder/final_norm
  decoder/relative_attention_bias/embedding
  decoder/layer_<i>/{self_attn_norm, self_attention, cross_attn_norm, cross_attention,
                     mlp_norm, mlp}
  decoder/final_norm
  lm_head/kernel                                    [embed, vocab] (untied only)
  .../mlp/{wi, wo}/kernel, and wi_linear/kernel     (gated only: wi is the gate)
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
  def __call__(self, query_length: int, key_length: int,
               query_position: jax.Array | None = None) -> jax.Array:
    """[1, heads, query_length, key_length]; queries at query_position + i if given
    (decoding, traced), else at positions 0 .. query_length - 1."""
    table = self.param("embedding", nn.with_logical_partitioning(
        self.embedding_init, ("relpos_buckets", "heads")),
                       (self.num_buckets, self.num_heads), jnp.float32)
    rows = query_length if query_position is None else key_length
    buckets = relative_position_buckets(rows, key_length,
                                        bidirectional=self.bidirectional,
                                        num_buckets=self.num_buckets,
                                        max_distance=self.max_distance)
    if query_position is not None:  # The rows of the queries' true positions.
      buckets = jax.lax.dynamic_slice_in_dim(jnp.asarray(buckets), query_position,
                                             query_length, axis=0)
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
  attention_dropout_rate: float = 0.0  # On the attention probabilities (HF T5: 0.1).
  activation: ActivationName = "relu"
  zeroth_bias_position: ZerothBiasPosition | None = None
  max_len: int = 512  # Rows of each zeroth bias table: the longest input or target.
  weight_noise: float = 0.0  # rho of per-token weight noise on the first MLP dense (wi).
  # False: the logits come from their own kernel `lm_head/kernel` [d_model, vocab]
  # (initialised as the embedding, and with the same 1/sqrt(d_model) rescale), as in the
  # official finetune, whose LoRA on HF's `lm_head` unties it from the frozen embedding.
  tie_embeddings: bool = True
  # The decoder output times 1/sqrt(d_model) before the output projection: T5 v1.0 (and
  # HF T5 whenever tie_word_embeddings is set); T5 v1.1 / Flan-T5 (untied) do not.
  output_rescale: bool = True
  # a = f(x wi) * (x wi_linear): T5 v1.1 / Flan-T5's gated-GELU feed-forward blocks.
  gated_mlp: bool = False
  dtype: Dtype = jnp.float32
  mlp_kernel: MlpKernel = MlpKernel()  # How the MLP op runs ('xla' | 'pallas', tiles).


def _attention(cfg: T5Config, name: str) -> MultiHeadAttention:
  # T5's initialisation (Mesh TensorFlow): no 1/sqrt(head_dim) on the logits; the query
  # init is that much smaller instead.
  d, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
  return MultiHeadAttention(
      cfg.num_heads, cfg.head_dim, use_bias=False, scale_logits=False, dtype=cfg.dtype,
      dropout_rate=cfg.attention_dropout_rate,
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
      gated=cfg.gated_mlp, name="mlp")


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
    x = x + drop(_attention(cfg, "attention")(h, bias, deterministic=deterministic))
    h = rms_norm("mlp_norm", dtype=cfg.dtype)(x)
    return x + drop(_mlp(cfg)(h, deterministic=deterministic, mixing=mixing))


class DecoderLayer(nn.Module):
  """x + causal SelfAttn, x + CrossAttn(encoder output), x + MLP, each on a normed x.

  Decoding: `position` (traced) is the position of x's first token, the attention
  layers keep their keys/values in 'cache' ([batch, `decode_length`, ...] for
  self-attention) and `sparse_mlp` runs the MLP through `ops.mlp_decode`.
  """
  cfg: T5Config

  @nn.compact
  def __call__(self, x, encoded, self_bias, cross_bias, *, deterministic: bool, mixing,
               position: jax.Array | None = None, decode_length: int = 0,
               sparse_mlp: bool = False):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    h = rms_norm("self_attn_norm", dtype=cfg.dtype)(x)
    x = x + drop(_attention(cfg, "self_attention")(
        h, self_bias, decode_position=position, cache_length=decode_length,
        deterministic=deterministic))
    h = rms_norm("cross_attn_norm", dtype=cfg.dtype)(x)
    x = x + drop(_attention(cfg, "cross_attention")(h, cross_bias, kv=encoded,
                                                    decode_position=position,
                                                    deterministic=deterministic))
    h = rms_norm("mlp_norm", dtype=cfg.dtype)(x)
    return x + drop(_mlp(cfg)(h, deterministic=deterministic, mixing=mixing,
                              position=position, sparse_decode=sparse_mlp))


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
  """Causal layers over embedded targets (shifted right), attending to the encoder.

  With `decode_length` (decoding), x holds the next token(s) only; their position is the
  'cache' collection's `index` (advanced by each call), the keys cover positions
  0 .. decode_length - 1 and those after the queries are masked.
  """
  cfg: T5Config

  @nn.compact
  def __call__(self, x, encoded, encoder_key_mask, *, deterministic: bool, mixing,
               decode_length: int | None = None, sparse_mlp: bool = False):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
    length = x.shape[1]
    position = None
    position_bias = _position_bias(cfg, bidirectional=False)
    if decode_length is None:
      causal = np.where(np.tril(np.ones((length, length), bool)), 0.0, MASKED)
      self_bias = position_bias(length, length) + causal
    else:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      position = index.value
      index.value = position + length
      queries = position + np.arange(length)[:, None]
      causal = jnp.where(np.arange(decode_length)[None, :] <= queries, 0.0, MASKED)
      self_bias = position_bias(length, decode_length, query_position=position) + causal
    x = drop(x)
    for i in range(cfg.num_decoder_layers):
      x = DecoderLayer(cfg, name=f"layer_{i}")(
          x, encoded, self_bias, encoder_key_mask, deterministic=deterministic,
          mixing=mixing, position=position, decode_length=decode_length or 0,
          sparse_mlp=sparse_mlp)
    return drop(rms_norm("final_norm", dtype=cfg.dtype)(x))


def _key_mask(encoder_tokens: jax.Array) -> jax.Array:
  """[B, 1, 1, Li]: 0 for real encoder tokens, MASKED for padding (id 0)."""
  return jnp.where(encoder_tokens > 0, 0.0, MASKED)[:, None, None, :]


class T5(nn.Module):
  """T5 v1.0 (or, with `gated_mlp` and untied `output_rescale=False`, v1.1) encoder-decoder.

  `__call__(encoder_tokens [B, Li], decoder_tokens [B, Lt], train=...)` returns logits
  [B, Lt, vocab_size] in float32. Token id 0 is padding (and the decoder start token).
  It is `decode(decoder_tokens, encode(encoder_tokens), encoder_tokens)`; decoding one
  token at a time is `decode_step`.
  """
  cfg: T5Config = T5Config()

  def setup(self):
    cfg = self.cfg
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                   ("embed", "vocab")))

  def __call__(self, encoder_tokens: jax.Array, decoder_tokens: jax.Array, *,
               train: bool, mixing: jax.Array | float = 1.0) -> jax.Array:
    encoded = self.encode(encoder_tokens, train=train, mixing=mixing)
    return self.decode(decoder_tokens, encoded, encoder_tokens, train=train,
                       mixing=mixing)

  def encode(self, encoder_tokens: jax.Array, *, train: bool = False,
             mixing: jax.Array | float = 1.0) -> jax.Array:
    """The encoder's output [B, Li, d_model] for `encoder_tokens` [B, Li]."""
    return self.encoder(self.token_embedder(encoder_tokens), _key_mask(encoder_tokens),
                        deterministic=not train, mixing=mixing)

  def decode(self, decoder_tokens: jax.Array, encoded: jax.Array,
             encoder_tokens: jax.Array, *, train: bool = False,
             mixing: jax.Array | float = 1.0, decode_length: int | None = None,
             sparse_mlp: bool = False) -> jax.Array:
    """Logits [B, Lt, vocab_size] (float32) of the decoder over `encoded`.

    `encoder_tokens` only mark the padding of `encoded`. `decode_length` and
    `sparse_mlp`: see `decode_step`.
    """
    cfg = self.cfg
    decoded = self.decoder(
        self.token_embedder(decoder_tokens), encoded, _key_mask(encoder_tokens),
        deterministic=not train, mixing=mixing, decode_length=decode_length,
        sparse_mlp=sparse_mlp)
    # T5 v1.0 (tied embeddings) rescales the decoder output by 1/sqrt(d_model); HF keeps
    # the rescale when a LoRA layer replaces the tied lm_head, and so does the untied head
    # started from it. T5 v1.1's own untied head has no rescale (output_rescale=False).
    if cfg.output_rescale:
      decoded = decoded * cfg.d_model ** -0.5
    if cfg.tie_embeddings:
      logits = self.token_embedder.attend(decoded)
    else:
      logits = self.lm_head(decoded)
    return logits.astype(jnp.float32)

  def decode_step(self, tokens: jax.Array, encoded: jax.Array, encoder_tokens: jax.Array,
                  *, decode_length: int, mixing: jax.Array | float = 1.0,
                  sparse_mlp: bool = False) -> jax.Array:
    """Logits [B, 1, vocab_size] of the next token after `tokens` [B, 1].

    Needs the 'cache' collection mutable: the first call creates it (the decoder's
    position index at 0, zero self-attention caches of `decode_length` positions, the
    cross-attention's keys/values projected from `encoded`), every call advances the
    position by one. Equal, up to float rounding, to the logits `__call__` gives at that
    position when teacher-forced with the same prefix.

    Args:
      tokens: the previous token of each sequence (0, the start token, at first).
      encoded: `encode(encoder_tokens)` (read only by the call that creates the cache).
      encoder_tokens: [B, Li], for their padding mask.
      decode_length: static: the positions the cache holds (the longest output).
      mixing: the JSReLU share of the 'mixed' activation.
      sparse_mlp: the decoder MLPs run through `ops.mlp_decode.mlp_decode`, reading only
        the rows of W2 of the units some token of the batch has active.

    Raises:
      ValueError: the zeroth bias table is shorter than `decode_length`.
    """
    cfg = self.cfg
    if cfg.zeroth_bias_position is not None and decode_length > cfg.max_len:
      raise ValueError(f"decode_length={decode_length} exceeds the zeroth bias table "
                       f"({cfg.max_len} rows).\nFix: decode at most {cfg.max_len} tokens.")
    return self.decode(tokens, encoded, encoder_tokens, mixing=mixing,
                       decode_length=decode_length, sparse_mlp=sparse_mlp)
