"""Models built from sparse_jax.nn; `build_model(config)` picks one from the config."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sparse_jax.errors import ConfigError
from sparse_jax.models.residual_mlp import ResidualMlp
from sparse_jax.models.t5 import T5, T5Config
from sparse_jax.models.vit import VisionTransformer
from sparse_jax.ops.activations import Activation, SShaped, mixed
from sparse_jax.ops.mlp import MlpKernel

MODELS = ("vit", "t5", "residual_mlp")


def build_model(config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh | None = None) -> nn.Module:
  """The Linen module described by `config.model`, `config.sparsity` and `config.mlp_*`.

  `mesh`: the mesh the model runs on; the Pallas MLP kernels run per shard of it.
  """
  m, s = config.model, config.sparsity
  kernel = mlp_kernel(config, mesh)
  position = None if s.zeroth_bias_position == "none" else s.zeroth_bias_position
  if m.name == "vit":
    return VisionTransformer(
        num_classes=config.num_classes, patch_size=m.patch_size,
        hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        mlp_dim=m.mlp_dim, image_size=config.image_size, activation=activation_spec(config),
        zeroth_bias_position=position,
        # From scratch the restricted norm drops its bias; finetuning (uplift) keeps it
        # frozen.
        mlp_norm_bias=not (s.restricted_norm and s.norm_projection == "clamp"),
        weight_noise=s.weight_noise, dtype=jnp.dtype(m.dtype), mlp_kernel=kernel,
        attention_init=m.get("attention_init", "xavier"),
        classifier=m.get("classifier", "token"), norm_epsilon=m.get("norm_epsilon", 1e-6),
        representation_size=m.get("representation_size", 0))
  if m.name == "t5":
    # T5's RMS norm has no bias, so the restricted norm differs only by its projection.
    return T5(T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, num_heads=m.num_heads,
        head_dim=m.head_dim, d_ff=m.d_ff, num_encoder_layers=m.num_encoder_layers,
        num_decoder_layers=m.num_decoder_layers,
        relative_attention_num_buckets=m.relative_attention_num_buckets,
        relative_attention_max_distance=m.relative_attention_max_distance,
        dropout_rate=m.dropout_rate,
        attention_dropout_rate=m.get("attention_dropout_rate", 0.0),
        activation=activation_spec(config),
        zeroth_bias_position=position, max_len=m.max_len,
        weight_noise=s.weight_noise, tie_embeddings=m.get("tie_embeddings", True),
        output_rescale=m.get("output_rescale", True), gated_mlp=m.get("gated_mlp", False),
        dtype=jnp.dtype(m.dtype), mlp_kernel=kernel))
  if m.name == "residual_mlp":
    return ResidualMlp(num_classes=config.num_classes, width=m.width,
                       num_blocks=m.num_blocks, dtype=jnp.dtype(m.dtype))
  raise ConfigError(f"Unknown model {m.name!r}.\nFix: set config.model.name to one of "
                    f"{MODELS}.")


def activation_spec(config: ml_collections.ConfigDict) -> Activation:
  """`config.sparsity.activation` as the MLP op takes it: the name, for 's_shaped' an
  `SShaped` carrying its shifts and half-width, for 'mixed' the mixture from
  `sparsity.mixing_source` (ReLU when unset)."""
  s = config.sparsity
  if s.activation == "s_shaped":
    return SShaped(shift_x=float(s.s_shaped_shift_x), shift_y=float(s.s_shaped_shift_y),
                   half_width=float(s.s_shaped_half_width))
  if s.activation == "mixed":
    return mixed(s.get("mixing_source") or "relu")
  return s.activation


def mlp_kernel(config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh | None = None) -> MlpKernel:
  """`config.mlp_impl`, `mlp_backend` and `mlp_tiles` as the MLP op's static settings.

  The kernels are built for the platform of `mesh`'s devices (a TPU topology's when
  compiling for one here), not for this host's.
  """
  tiles = config.get("mlp_tiles")
  platform = None if mesh is None else mesh.devices.flat[0].platform
  return MlpKernel(impl=config.get("mlp_impl", "xla"),
                   backend=config.get("mlp_backend", "auto"),
                   tiles=None if tiles is None else tuple(int(t) for t in tiles),
                   mesh=mesh if mesh is not None and mesh.size > 1 else None,
                   platform=platform)
