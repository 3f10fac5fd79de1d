"""Models built from sparse_jax.nn; `build_model(config)` picks one from the config."""
import jax.numpy as jnp
import ml_collections

from sparse_jax.errors import ConfigError
from sparse_jax.models.vit import VisionTransformer

MODELS = ("vit",)


def build_model(config: ml_collections.ConfigDict) -> VisionTransformer:
  """The Linen module described by `config.model` and `config.sparsity`."""
  m, s = config.model, config.sparsity
  if m.name != "vit":
    raise ConfigError(f"Unknown model {m.name!r}.\nFix: set config.model.name to one of {MODELS}.")
  position = None if s.zeroth_bias_position == "none" else s.zeroth_bias_position
  return VisionTransformer(
      num_classes=config.num_classes, patch_size=m.patch_size, hidden_size=m.hidden_size,
      num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      image_size=config.image_size, activation=s.activation,
      zeroth_bias_position=position,
      # From scratch the restricted norm drops its bias; finetuning (uplift) keeps it frozen.
      mlp_norm_bias=not (s.restricted_norm and s.norm_projection == "clamp"),
      weight_noise=s.weight_noise, dtype=jnp.dtype(m.dtype))
