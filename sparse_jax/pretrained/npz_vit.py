"""big_vision / vision_transformer ViT checkpoints (`npz:<file.npz>`), and the export.

The public ViT-B/16 releases (ImageNet-21k, AugReg) are flat `.npz` files of the Flax
params tree, '/'-joined: `embedding/kernel` [p, p, 3, d] (a conv, the same layout as our
patch embedding), `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_<i>/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, Dense_1}` (vision_transformer's names; big_vision's are
`LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`, its position
embedding the top-level `pos_embedding`, and a scanned encoder's blocks one
`Transformer/encoderblock/...` stack on a leading depth axis),
`Transformer/encoder_norm`, optionally `pre_logits`, and `head`. The attention kernels
are Flax DenseGeneral's [d, heads, head_dim] / [heads, head_dim, d], as ours, so every
tensor is copied unchanged. Their MLPs use flax's `nn.gelu` (the tanh approximation)
and LayerNorm epsilon 1e-6.

The export writes vision_transformer's names, each MLP block's zeroth bias as
`.../MlpBlock_3/zeroth_bias` [tokens, d], and a JSON string `sparse_jax` with the
activation and the zeroth bias position (the file has no other config).
big_vision's MAP head (`MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0,
MlpBlock_0}`) is `models.vit.MapHead`.
"""
import functools
import json
import os
import re
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import base, vit_source

_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
# (vision_transformer name, big_vision name) -> ours, inside an encoder block.
_IN_BLOCK = {("LayerNorm_0", "LayerNorm_0"): ("attn_norm",),
             ("LayerNorm_2", "LayerNorm_1"): ("mlp_norm",),
             ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"):
                 ("attention",),
             ("MlpBlock_3/Dense_0", "MlpBlock_0/Dense_0"): ("mlp", "wi"),
             ("MlpBlock_3/Dense_1", "MlpBlock_0/Dense_1"): ("mlp", "wo"),
             ("MlpBlock_3", "MlpBlock_0"): ("mlp",)}
_TOP = {"embedding/kernel": ("embedding_kernel",), "embedding/bias": ("embedding_bias",),
        "cls": ("cls",), "Transformer/posembed_input/pos_embedding": ("pos_embedding",),
        "pos_embedding": ("pos_embedding",),  # big_vision's.
        "Transformer/encoder_norm/scale": ("encoder_norm", "scale"),
        "Transformer/encoder_norm/bias": ("encoder_norm", "bias"),
        "pre_logits/kernel": ("pre_logits", "kernel"),
        "pre_logits/bias": ("pre_logits", "bias"),
        "head/kernel": ("head", "kernel"), "head/bias": ("head", "bias")}
# big_vision's MAP head (pool_type='map') -> ours (models.vit.MapHead).
_MAP = {"MAPHead_0/MultiHeadDotProductAttention_0": ("map_head", "attention"),
        "MAPHead_0/LayerNorm_0": ("map_head", "norm"),
        "MAPHead_0/MlpBlock_0/Dense_0": ("map_head", "wi"),
        "MAPHead_0/MlpBlock_0/Dense_1": ("map_head", "wo"),
        "MAPHead_0": ("map_head",)}
RECORD = "sparse_jax"
_FIX = ("Fix: pass --config.finetune.checkpoint=npz:<a ViT .npz of big_vision or "
        "vision_transformer, e.g. ViT-B_16.npz>.")


def our_path(name: str) -> base.Path | None:
  """Our param path of an .npz name (either naming), or None if it is not ours."""
  if name in _TOP:
    return _TOP[name]
  for prefix, ours in _MAP.items():  # Longest prefixes first (dict order).
    if name.startswith(prefix + "/"):
      return (*ours, *name[len(prefix) + 1:].split("/"))
  match = _BLOCK.match(name)
  if not match:
    return None
  block, rest = f"block_{match.group(1)}", match.group(2)
  for (vt, bv), ours in sorted(_IN_BLOCK.items(), key=lambda kv: -len(kv[0][0])):
    for prefix in (vt, bv):
      if rest.startswith(prefix + "/"):
        return (block, *ours, *rest[len(prefix) + 1:].split("/"))
  return None


def npz_name(path: base.Path) -> str:
  """The vision_transformer name of our param `path` (inverse of `our_path`)."""
  for name, ours in _TOP.items():
    if ours == path:
      return name
  for prefix, ours in _MAP.items():
    if path[:len(ours)] == ours:
      return "/".join([prefix, *path[len(ours):]])
  block, *rest = path
  i = int(block[len("block_"):])
  for (vt, _), ours in sorted(_IN_BLOCK.items(), key=lambda kv: -len(kv[1])):
    if tuple(rest[:len(ours)]) == ours:
      return "/".join([f"Transformer/encoderblock_{i}", vt, *rest[len(ours):]])
  raise ValueError(f"No .npz name for {'/'.join(path)}.")


@functools.lru_cache(maxsize=2)
def _load(location: str) -> tuple[dict[base.Path, np.ndarray], dict[str, Any]]:
  if not epath.Path(location).exists():
    raise ConfigError(f"finetune.checkpoint=npz:{location} does not exist.\n{_FIX}")
  try:
    with epath.Path(location).open("rb") as f, np.load(f, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise ConfigError(f"{location} is not a readable .npz ({e}).\n{_FIX}") from None
  record = json.loads(str(arrays.pop(RECORD))) if RECORD in arrays else {}
  arrays = _unstacked(arrays)
  tensors = {}
  for name, value in arrays.items():
    path = our_path(name)
    if path is None:
      raise ConfigError(f"The checkpoint npz:{location} does not fit this model: its "
                        f"tensor {name} is not part of a ViT sparse_jax reads.\n{_FIX}")
    tensors[path] = value
  return tensors, record


def _unstacked(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision's scanned encoder (`Transformer/encoderblock/...`, every block's tensor
  stacked on a leading depth axis) as one `encoderblock_<i>` per block."""
  out = {}
  for name, value in arrays.items():
    if name.startswith("Transformer/encoderblock/"):
      rest = name[len("Transformer/encoderblock/"):]
      for i, block in enumerate(value):
        out[f"Transformer/encoderblock_{i}/{rest}"] = block
    else:
      out[name] = value
  return out


class NpzViTSource(vit_source.ViTSource):
  """A big_vision / vision_transformer ViT `.npz`."""
  format: ClassVar[str] = "npz"
  activation: ClassVar[str] = "gelu_tanh"

  def tensors(self) -> dict[base.Path, np.ndarray]:
    return _load(self.location)[0]

  def recorded(self) -> dict[str, Any]:
    return _load(self.location)[1]

  def norm_epsilon(self) -> float:
    return 1e-6

  def tensor_name(self, path: base.Path) -> str:
    try:
      return npz_name(path)
    except ValueError:
      return "/".join(path)

  def export(self, params: Any, config: ml_collections.ConfigDict, directory: str) -> str:
    return export(params, config, os.path.join(directory, "model.npz"))


def export(params: Any, config: ml_collections.ConfigDict, path: str) -> str:
  """Writes a ViT run's plain params to the .npz `path` (vision_transformer names)."""
  s = config.sparsity
  activation = "jsrelu" if s.activation == "mixed" else s.activation
  flat = traverse_util.flatten_dict(base.host_params(params))
  if jax.process_index() > 0:
    return path  # Process 0 writes the file.
  arrays = {npz_name(p): np.asarray(v, np.float32) for p, v in flat.items()}
  record = {"activation": activation}
  if s.zeroth_bias_position != "none":
    record["zeroth_bias_position"] = s.zeroth_bias_position
  arrays[RECORD] = np.array(json.dumps(record, sort_keys=True))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path
