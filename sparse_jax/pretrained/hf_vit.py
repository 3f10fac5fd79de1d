"""Hugging Face ViT checkpoints (`hf:<dir>` whose config.json has model_type 'vit').

`ViTForImageClassification` (tensors under `vit.`, head `classifier`) or `ViTModel`
(no prefix; its pooler is not part of our model and is skipped, the head starts at
zero). torch Linear weights [out, in] are transposed, the attention ones reshaped into
[embed, heads, head_dim] / [heads, head_dim, embed], the patch convolution [d, 3, p, p]
transposed into [p, p, 3, d]. The activation is config.json's `hidden_act` ('gelu' is
the exact GELU), the LayerNorm epsilon its `layer_norm_eps` (1e-12 by default).
Finetuned models export in the same layout (`ViTForImageClassification`), with
`hidden_act` "jsrelu" (stock transformers refuses it rather than run GELU), a
"sparse_jax" entry with the activation and the zeroth bias position, and each block's
zeroth bias as `vit.encoder.layer.<i>.zeroth_bias` [tokens, d].
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
from safetensors.numpy import save_file

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import base, hf_t5, vit_source

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "jsrelu": "jsrelu"}
_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "jsrelu": "jsrelu"}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_IN_LAYER = {"layernorm_before": ("attn_norm",), "layernorm_after": ("mlp_norm",),
             "attention.attention.query": ("attention", "query"),
             "attention.attention.key": ("attention", "key"),
             "attention.attention.value": ("attention", "value"),
             "attention.output.dense": ("attention", "out"),
             "intermediate.dense": ("mlp", "wi"), "output.dense": ("mlp", "wo")}
_TOP = {"embeddings.cls_token": ("cls",),
        "embeddings.position_embeddings": ("pos_embedding",),
        "embeddings.patch_embeddings.projection.weight": ("embedding_kernel",),
        "embeddings.patch_embeddings.projection.bias": ("embedding_bias",),
        "layernorm.weight": ("encoder_norm", "scale"),
        "layernorm.bias": ("encoder_norm", "bias"),
        "classifier.weight": ("head", "kernel"), "classifier.bias": ("head", "bias")}


def is_hf_vit(location: str) -> bool:
  try:
    config = json.loads((epath.Path(location) / hf_t5.CONFIG).read_text())
  except (OSError, ValueError):
    return False
  return config.get("model_type") == "vit"


def _converted(name: str, value: np.ndarray, heads: int) -> tuple[base.Path, np.ndarray] | None:
  """(our path, value in our layout) of a HF ViT tensor, or None for the pooler."""
  name = name[len("vit."):] if name.startswith("vit.") else name
  if name.startswith("pooler."):
    return None
  if name in _TOP:
    path = _TOP[name]
    if path == ("embedding_kernel",):
      return path, value.transpose(2, 3, 1, 0)
    return path, (value.T if path == ("head", "kernel") else value)
  match = _LAYER.match(name)
  if match and match.group(2) == "zeroth_bias":
    return (f"block_{match.group(1)}", "mlp", "zeroth_bias"), value
  if match:
    module, _, leaf = match.group(2).rpartition(".")
    if module in _IN_LAYER:
      ours = (f"block_{match.group(1)}", *_IN_LAYER[module])
      if ours[-1] in ("attn_norm", "mlp_norm"):
        return ours + ({"weight": "scale", "bias": "bias"}[leaf],), value
      if leaf == "bias":
        if ours[-1] in ("query", "key", "value"):
          value = value.reshape(heads, -1)
        return ours + ("bias",), value
      if ours[-1] in ("query", "key", "value"):
        value = hf_t5.to_ours("attn_in", value, heads)
      elif ours[-1] == "out":
        value = hf_t5.to_ours("attn_out", value, heads)
      else:
        value = value.T
      return ours + ("kernel",), value
  raise ConfigError(f"Tensor {name} is not part of a HF ViT sparse_jax reads.\n"
                    "Fix: pass a ViTModel or ViTForImageClassification directory "
                    "(save_pretrained's layout).")


@functools.lru_cache(maxsize=2)
def _load(location: str) -> dict[base.Path, np.ndarray]:
  config = json.loads((epath.Path(location) / hf_t5.CONFIG).read_text())
  heads = int(config["num_attention_heads"])
  tensors = hf_t5.TensorFiles(location)
  out = {}
  for name in tensors.names():
    converted = _converted(name, np.asarray(tensors.read(name)), heads)
    if converted is not None:
      out[converted[0]] = converted[1]
  return out


class HfViTSource(vit_source.ViTSource):
  """A Hugging Face ViT directory."""
  format: ClassVar[str] = "hf"

  def _config(self) -> dict[str, Any]:
    return hf_t5.read_config(self.location, model_types=("vit",))

  @property
  def activation(self) -> str:  # type: ignore[override]
    act = self._config().get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
      raise ConfigError(f"hidden_act={act!r}: sparse_jax runs ViTs with ReLU or GELU "
                        "MLPs.\nFix: pass a ViT with hidden_act 'gelu'.")
    return _ACTIVATIONS[act]

  def tensors(self) -> dict[base.Path, np.ndarray]:
    return _load(self.location)

  def norm_epsilon(self) -> float:
    return float(self._config().get("layer_norm_eps", 1e-12))

  def recorded(self) -> dict[str, Any]:
    return self._config().get("sparse_jax", {})

  def export(self, params: Any, config: ml_collections.ConfigDict, directory: str) -> str:
    return export(params, config, directory, self._config())


def _hf_tensor(path: base.Path, value: np.ndarray) -> tuple[str, np.ndarray]:
  """The HF name and layout of our ViT param `path` (inverse of `_converted`)."""
  top = {ours: name for name, ours in _TOP.items()}
  if path in top:
    name = top[path] if path[0] == "head" else "vit." + top[path]
    if path == ("embedding_kernel",):
      value = value.transpose(3, 2, 0, 1)
    elif path == ("head", "kernel"):
      value = value.T
    return name, value
  block, *rest = path
  prefix = f"vit.encoder.layer.{int(block[len('block_'):])}."
  if rest == ["mlp", "zeroth_bias"]:
    return prefix + "zeroth_bias", value
  modules = {ours: name for name, ours in _IN_LAYER.items()}
  module, leaf = modules[tuple(rest[:-1])], rest[-1]
  if rest[0] in ("attn_norm", "mlp_norm"):
    return prefix + module + (".weight" if leaf == "scale" else ".bias"), value
  if leaf == "bias":
    return prefix + module + ".bias", value.reshape(-1)
  kind = {"query": "attn_in", "key": "attn_in", "value": "attn_in", "out": "attn_out"}.get(
      rest[-2], "linear")
  return prefix + module + ".weight", hf_t5.to_hf(kind, value)


def export(params: Any, config: ml_collections.ConfigDict, directory: str,
           source_config: dict[str, Any]) -> str:
  """Writes a ViT run's plain params as a HF `ViTForImageClassification` directory
  (config.json from `source_config` with the run's activation, classes and zeroth bias)."""
  m, s = config.model, config.sparsity
  if m.classifier != "token" or m.representation_size:
    raise ValueError("HF ViT has a class token head only; export this model as .npz "
                     "(pretrained.npz_vit.export).")
  flat = traverse_util.flatten_dict(base.host_params(params))
  if jax.process_index() > 0:
    return directory  # Process 0 writes the files.
  tensors = dict(_hf_tensor(p, np.asarray(v, np.float32)) for p, v in flat.items())
  activation = "jsrelu" if s.activation == "mixed" else s.activation
  hf = {k: v for k, v in source_config.items() if k not in ("id2label", "label2id")}
  hf.update(architectures=["ViTForImageClassification"], model_type="vit",
            hidden_act=_HF_ACTIVATION[activation],
            id2label={str(i): f"LABEL_{i}" for i in range(config.num_classes)},
            label2id={f"LABEL_{i}": i for i in range(config.num_classes)})
  record = {"activation": activation}
  if s.zeroth_bias_position != "none":
    record["zeroth_bias_position"] = s.zeroth_bias_position
  hf["sparse_jax"] = record
  os.makedirs(directory, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(directory, hf_t5.SAFETENSORS), metadata={"format": "pt"})
  with open(os.path.join(directory, hf_t5.CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return directory
