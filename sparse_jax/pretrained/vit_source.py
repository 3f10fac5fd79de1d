"""What the ViT checkpoint formats share: the model config read off the tensors' shapes.

A ViT checkpoint (big_vision / vision_transformer `.npz`, HF ViT) is, once renamed into
`models.vit.VisionTransformer`'s param paths, a dict of arrays from which the model
config follows: width and patch from the patch embedding, depth from the blocks, heads
from the query kernel, MLP width, class token or not, the representation layer, the
classes and the image size (from the position embeddings). A head for another number
of classes than the run's (ImageNet-21k -> 1k) is not read: the run's head starts at
zero, as big_vision's finetuning does. A run at another image size (224 -> 384 px, as
finetuning at a higher resolution does) gets the position embeddings, and a sparse_jax
export's per-position zeroth biases, resized: the patch grid bilinearly, the class
token's row as it is.
"""
import abc
import logging
import math
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import base

HEAD = (("head", "kernel"), ("head", "bias"))
log = logging.getLogger("sparse_jax")


def resized_positions(table: np.ndarray, class_token: bool, side: int) -> np.ndarray:
  """A per-position table [..., tokens, d] (position embeddings, zeroth biases) for a
  square patch grid, resized to `side` x `side` patches: the grid bilinearly (half-pixel
  centres, antialiased when shrinking: `jax.image.resize`), the class token's row (the
  first, if `class_token`) kept as it is."""
  head, grid = table[..., :int(class_token), :], table[..., int(class_token):, :]
  old = math.isqrt(grid.shape[-2])
  grid = grid.reshape(*grid.shape[:-2], old, old, grid.shape[-1])
  grid = np.asarray(jax.image.resize(grid.astype(np.float32),
                                     (*grid.shape[:-3], side, side, grid.shape[-1]),
                                     method="bilinear"))
  grid = grid.reshape(*grid.shape[:-3], side * side, grid.shape[-1]).astype(table.dtype)
  return np.concatenate([head, grid], axis=-2)


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
    patch = keys["model.patch_size"]
    if config.image_size != image_size and config.image_size % patch:
      fits = max(patch, round(config.image_size / patch) * patch)
      raise ConfigError(
          f"image_size={config.image_size} is not a whole number of the checkpoint's "
          f"{patch}px patches ({self.describe()} was trained on {image_size}px images); "
          f"its position embeddings can be resized only to a whole grid.\nFix: pass "
          f"--config.image_size={fits} (or {image_size}, the checkpoint's own).")
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

  def tensors_at(self, positions: int) -> dict[base.Path, np.ndarray]:
    """`tensors()` with the per-position tables (position embeddings, zeroth biases)
    resized to a run of `positions` rows (class token included) where the checkpoint
    has another number."""
    tensors = self.tensors()
    rows = tensors[("pos_embedding",)].shape[-2]
    if rows == positions:
      return tensors
    token = ("cls",) in tensors
    side = math.isqrt(positions - token)
    old = math.isqrt(rows - token)
    log.info("%s: position embeddings resized from %dx%d to %dx%d patches.",
             self.describe(), old, old, side, side)
    return {p: (resized_positions(v, token, side)
                if p == ("pos_embedding",) or (p[-1] == "zeroth_bias" and v.ndim == 2
                                               and v.shape[0] == rows) else v)
            for p, v in tensors.items()}

  def read_params(self, shapes: Any, shardings: Any) -> dict[base.Path, jax.Array]:
    flat = traverse_util.flatten_dict(shapes)
    tensors = self.tensors_at(flat[("pos_embedding",)].shape[-2])
    source = {p: tuple(v.shape) for p, v in tensors.items()}
    if HEAD[0] in source and HEAD[0] in flat and source[HEAD[0]] != tuple(
        flat[HEAD[0]].shape):
      # Another label set (e.g. ImageNet-21k -> 1k): the run's zero head stays.
      source = {p: s for p, s in source.items() if p not in HEAD}
    base.check_params_fit(self, source, shapes,
                          "Fix: finetune with the model keys the checkpoint gives (the "
                          "source sets them; do not override model.* on the command "
                          "line).")
    return base.placed(lambda p: np.asarray(tensors[p]), source, shapes, shardings)
