"""Vision Transformer (pre-LN, class token or global average pooling, learned position
embeddings).

Vanilla = ReLU MLPs. Sparsified = J-SquaredReLU + zeroth bias + restricted LayerNorm
(`mlp_norm_bias=False`: no bias on the norm before each MLP; its scale is clamped >= 1
by the post-update projection, see `sparse_jax.transforms.projections`). ViT-B/16 vanilla at 224 px with
1000 classes has exactly 86,567,656 parameters.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_jax.nn.attention import (MultiHeadAttention, torch_in_projection_init,
                                     torch_out_projection_init)
from sparse_jax.nn.dense import NoisyDense, layer_norm
from sparse_jax.nn.sparse_mlp import SparseMlp, ZerothBiasPosition
from sparse_jax.ops.mlp import MlpKernel
from sparse_jax.ops.activations import Activation

Dtype = Any


def attention_inits(name: str) -> dict[str, nn.initializers.Initializer]:
  """MultiHeadAttention's kernel inits for `name`: 'xavier' (Xavier uniform on each
  [d, d] projection, as big_vision) | 'torch' (torch's MultiheadAttention, which the
  official torchvision ViT uses: Xavier over the stacked [3d, d] q/k/v matrix, out
  projection U(+-1/sqrt(d)))."""
  if name == "torch":
    return dict(kernel_init=torch_in_projection_init(),
                out_init=torch_out_projection_init())
  return {}


class EncoderBlock(nn.Module):
  """x + Attn(LN(x)), then x + MLP(mlp_norm(x)) (+ zeroth bias inside the MLP)."""
  num_heads: int
  mlp_dim: int
  activation: Activation
  zeroth_bias_position: ZerothBiasPosition | None
  mlp_norm_bias: bool
  max_len: int
  weight_noise: float
  dtype: Dtype
  mlp_kernel: MlpKernel = MlpKernel()
  attention_init: str = "xavier"  # See `attention_inits`.
  norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x, *, deterministic: bool, mixing):
    d = x.shape[-1]
    h = layer_norm("attn_norm", dtype=self.dtype, epsilon=self.norm_epsilon)(x)
    x = x + MultiHeadAttention(self.num_heads, d // self.num_heads, dtype=self.dtype,
                               **attention_inits(self.attention_init),
                               name="attention")(h)
    # The from-scratch restricted LayerNorm has no bias: its output's offset is the zeroth
    # bias's job. (Finetuning keeps the bias, frozen by the optimizer.)
    h = layer_norm("mlp_norm", use_bias=self.mlp_norm_bias, dtype=self.dtype,
                   epsilon=self.norm_epsilon)(x)
    return x + SparseMlp(self.mlp_dim, self.activation, self.zeroth_bias_position,
                         self.max_len, (self.weight_noise, self.weight_noise),
                         dtype=self.dtype, mlp_kernel=self.mlp_kernel,
                         name="mlp")(h, deterministic=deterministic, mixing=mixing)


class MapHead(nn.Module):
  """Multi-head attention pooling (big_vision's MAPHead, SigLIP's pooling head): a
  learned probe attends over the tokens, then x + MLP(LayerNorm(x)); returns [B, d].
  Its MLP is the head's, not a Transformer block: GELU (tanh), never sparsified."""
  num_heads: int
  mlp_dim: int
  norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), (None, None, "embed")), (1, 1, d), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, d))
    x = MultiHeadAttention(self.num_heads, d // self.num_heads, dtype=self.dtype,
                           name="attention")(probe, kv=x)
    y = layer_norm("norm", dtype=self.dtype, epsilon=self.norm_epsilon)(x)
    y = NoisyDense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="wi")(y)
    y = NoisyDense(d, ("mlp", "embed"), dtype=self.dtype,
                   name="wo")(jax.nn.gelu(y, approximate=True))
    return (x + y)[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier; `__call__(images [B, H, W, C], train=...) -> logits [B, classes]`."""
  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  image_size: int
  activation: Activation = "relu"
  zeroth_bias_position: ZerothBiasPosition | None = None
  mlp_norm_bias: bool = True
  weight_noise: float = 0.0
  dtype: Dtype = jnp.float32
  mlp_kernel: MlpKernel = MlpKernel()  # How the MLP op runs ('xla' | 'pallas', tiles).
  attention_init: str = "xavier"  # 'xavier' | 'torch' (the official model's; see
                                  # `attention_inits`).
  # 'token': the head reads a learned class token (`cls`); 'gap': the mean of the patch
  # tokens (big_vision's pool_type='gap', no class token); 'map': attention pooling of
  # the patch tokens (`MapHead`, big_vision's pool_type='map', no class token).
  classifier: str = "token"
  norm_epsilon: float = 1e-6  # big_vision / vision_transformer 1e-6; HF ViT 1e-12.
  # > 0: a tanh dense layer `pre_logits` of this width before the head (the ImageNet-21k
  # vision_transformer checkpoints' "representation layer").
  representation_size: int = 0

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + (self.classifier == "token")

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool,
               mixing: jax.Array | float = 1.0) -> jax.Array:
    p = self.patch_size
    b, height, width, channels = images.shape
    h, w, d = height // p, width // p, self.hidden_size
    # Patch embedding as one matmul over flattened patches: the same function (and
    # parameter layout) as a stride-p VALID conv, but XLA:CPU differentiates a conv
    # kernel several times slower than a dot.
    patches = images.astype(self.dtype).reshape(b, h, p, w, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * channels)
    kernel = self.param("embedding_kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
        ("patch_height", "patch_width", "channels", "embed")), (p, p, channels, d), jnp.float32)
    bias = self.param("embedding_bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("embed",)), (d,), jnp.float32)
    x = patches @ kernel.reshape(-1, d).astype(self.dtype) + bias.astype(self.dtype)
    if self.classifier == "token":
      cls = self.param("cls", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x],
                          axis=1)
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "position", "embed")),
                     (1, self.num_tokens, d), jnp.float32)
    x = x + pos.astype(self.dtype)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.activation,
                       self.zeroth_bias_position, self.mlp_norm_bias, self.num_tokens,
                       self.weight_noise, self.dtype, self.mlp_kernel,
                       self.attention_init, self.norm_epsilon, name=f"block_{i}")(
                           x, deterministic=not train, mixing=mixing)
    x = layer_norm("encoder_norm", dtype=self.dtype, epsilon=self.norm_epsilon)(x)
    if self.classifier == "map":
      x = MapHead(self.num_heads, self.mlp_dim, self.norm_epsilon, self.dtype,
                  name="map_head")(x)
    else:
      x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size:
      x = jnp.tanh(NoisyDense(self.representation_size, ("embed", "mlp"),
                              name="pre_logits")(x))
    # Zero-initialised head, as in big_vision: every class starts equally likely.
    head = NoisyDense(self.num_classes, ("embed", "classes"),
                      kernel_init=nn.initializers.zeros_init(), name="head")
    return head(x).astype(jnp.float32)
