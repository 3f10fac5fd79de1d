"""What the ViT checkpoint formats share: the model config read off the tensors' shapes.

A ViT checkpoint (big_vision / vision_transformer `.npz`, HF ViT) is, once renamed into
`models.vit.VisionTransformer`'s param paths, a dict of arrays from which the model
config follows: width and patch from the patch embedding, depth from the blocks, heads
from the query kernel, MLP width, class token or not, the representation layer, the
classes and the image size (from the position embeddings). A head for another number
of classes than the run's (ImageNet-21k -> 1k) is not read: the run's head starts at
zero, as big_vision's finetuning does.
"""
import abc
import math
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import base

HEAD = (("head", "kernel"), ("head", "bias"))


class ViTSource(base.Source):
  """A ViT checkpoint whose tensors map one to one onto our params."""
  activation: ClassVar[str] = "gelu_tanh"  # What the format's MLPs use.

  @abc.abstractmethod
  def tensors(self) -> dict[base.Path, np.ndarray]:
    """Every tensor of the checkpoint, by our param path, in our layout."""

  @abc.abstractmethod
  def norm_epsilon(self) -> float:
    """The LayerNorm epsilon the checkpoint was trained with."""

  def recorded(self) -> dict[str, Any]:
    """What a sparse_jax export recorded about the model (activation, zeroth bias)."""
    return {}

  def shape_config(self) -> dict[str, Any]:
    """Model keys (and image size, classes) the tensors' shapes decide."""
    t = self.tensors()
    if ("embedding_kernel",) not in t:
      raise ConfigError(f"{self.describe()} has no patch embedding: not a ViT "
                        "checkpoint.\nFix: pass a ViT-B/16 (or other ViT) checkpoint.")
    patch, _, channels, width = t[("embedding_kernel",)].shape
    layers = 0
    while (f"block_{layers}", "mlp", "wi", "kernel") in t:
      layers += 1
    token = ("cls",) in t
    tokens = t[("pos_embedding",)].shape[1] - token
    side = math.isqrt(tokens)
    keys = {
        "model.hidden_size": int(width), "model.patch_size": int(patch),
        "model.num_layers": layers,
        "model.num_heads": int(t[("block_0", "attention", "query", "kernel")].shape[1]),
        "model.mlp_dim": int(t[("block_0", "mlp", "wi", "kernel")].shape[1]),
        "model.classifier": ("token" if token else
                             "map" if ("map_head", "probe") in t else "gap"),
        "model.norm_epsilon": float(self.norm_epsilon()),
        "model.representation_size": int(
            t[("pre_logits", "kernel")].shape[1] if ("pre_logits", "kernel") in t else 0),
        "image_size": int(side * patch),
    }
    if side * side != tokens or channels != 3:
      raise ConfigError(f"{self.describe()}: {tokens} patch positions of {channels} "
                        "channels is not a square RGB image.\nFix: pass a ViT checkpoint "
                        "of square RGB images.")
    return keys

  def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if config.model.name != "vit":
      raise ConfigError(f"finetune.checkpoint={self.describe()} is a ViT checkpoint, "
                        f"but the config's model is {config.model.name!r}.\nFix: "
                        "finetune it with configs/vit_imagenet.py:finetune.")
    base.check_mixing_completes(config)
    keys = self.shape_config()
    image_size = keys.pop("image_size")
    if config.image_size != image_size:
      raise ConfigError(
          f"{self.describe()} was trained on {image_size}px images (its position "
          f"embeddings), the config has image_size={config.image_size}; resizing "
          f"position embeddings is not implemented.\nFix: pass "
          f"--config.image_size={image_size}.")
    activation = self.recorded().get("activation", self.activation)
    s = config.sparsity
    if s.activation == "mixed":
      if not s.get("mixing_source"):
        keys["sparsity.mixing_source"] = activation
    elif s.activation == "relu" and activation != "relu":
      keys["sparsity.activation"] = activation  # A vanilla run keeps the source's.
    return base.with_updates(config, keys)

  def param_shapes(self) -> base.Shapes:
    return {p: tuple(v.shape) for p, v in self.tensors().items()}

  def read_params(self, shapes: Any, shardings: Any) -> dict[base.Path, jax.Array]:
    source = self.param_shapes()
    flat = traverse_util.flatten_dict(shapes)
    if HEAD[0] in source and HEAD[0] in flat and source[HEAD[0]] != tuple(
        flat[HEAD[0]].shape):
      # Another label set (e.g. ImageNet-21k -> 1k): the run's zero head stays.
      source = {p: s for p, s in source.items() if p not in HEAD}
    base.check_params_fit(self, source, shapes,
                          "Fix: finetune with the model keys the checkpoint gives (the "
                          "source sets them; do not override model.* on the command "
                          "line).")
    tensors = self.tensors()
    return base.placed(lambda p: np.asarray(tensors[p]), source, shapes, shardings)
