"""Hugging Face T5 checkpoints as finetune sources (`hf:<dir>`), and the export back.

A directory as `save_pretrained` writes it: config.json, the weights as model.safetensors
(or sharded with model.safetensors.index.json, or pytorch_model.bin, read without
torch), and usually T5's SentencePiece model spiece.model. T5 v1.0 (`t5-base`: ReLU,
tied embeddings, the decoder output rescaled by 1/sqrt(d_model)) and v1.1 / Flan-T5
(gated-GELU feed-forward blocks, untied lm_head without the rescale) map onto
`models.t5.T5` tensor by tensor: torch Linear weights [out, in] are transposed into our
[in, out] kernels and the attention ones reshaped into [embed, heads, head_dim] (or
[heads, head_dim, embed]), nothing else; so import -> export -> import gives identical
params.

The export records what a finetune changed in config.json: `feed_forward_proj`
"jsrelu" / "gated-jsrelu" (stock transformers has no such activation and refuses to
load it rather than run the wrong function) and a "sparse_jax" entry with the
activation and the zeroth bias (position, rows); each feed-forward block's zeroth bias
is the tensor `<block>.layer.<i>.zeroth_bias` [rows, d_model], added to the block's
output (or input) at each position.
"""
import json
import os
import re
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import base, torch_bin

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
SPIECE = "spiece.model"
# HF activation names -> ours (T5Config maps "gated-gelu" to "gelu_new", the tanh form).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "jsrelu": "jsrelu"}
HF_ACTIVATION = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "jsrelu": "jsrelu"}
_FIX = ("Fix: pass --config.finetune.checkpoint=hf:<directory with config.json and "
        "model.safetensors of a T5 (as save_pretrained writes it)>.")


def is_hf_t5(location: str) -> bool:
  """Whether `location` holds a HF T5 (config.json with model_type t5 and weights)."""
  d = epath.Path(location)
  try:
    config = json.loads((d / CONFIG).read_text())
  except (OSError, ValueError):
    return False
  return config.get("model_type") in ("t5", "mt5") and any(
      (d / f).exists() for f in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN))


# ----------------------------------------------------------------------------- config
def read_config(location: str, model_types: tuple[str, ...] = ("t5", "mt5")
                ) -> dict[str, Any]:
  """config.json of the HF directory `location` (ConfigError unless a `model_types`)."""
  path = epath.Path(location) / CONFIG
  if not path.exists():
    raise ConfigError(f"finetune.checkpoint=hf:{location} has no {CONFIG}.\n{_FIX}")
  try:
    config = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}).\n{_FIX}") from None
  if config.get("model_type") not in model_types:
    raise ConfigError(f"{path} describes a {config.get('model_type')!r} model; "
                      f"hf: sources here are T5 and ViT (model_type 't5', 'vit').\n{_FIX}")
  return config


def source_activation(hf: dict[str, Any]) -> tuple[str, bool]:
  """(our activation name, gated) of a HF T5 config."""
  extra = hf.get("sparse_jax", {})
  proj = hf.get("feed_forward_proj", "relu")
  gated = proj.startswith("gated-")
  name = proj[len("gated-"):] if gated else proj
  if gated and name == "gelu":
    name = "gelu_new"  # As HF's T5Config: 'gated-gelu' is the tanh approximation.
  name = extra.get("activation", ACTIVATIONS.get(name, name))
  if name not in ACTIVATIONS.values():
    raise ConfigError(f"feed_forward_proj={proj!r}: sparse_jax runs T5 with ReLU, GELU "
                      f"(exact or tanh) or J-SquaredReLU MLPs, not {name!r}.\n{_FIX}")
  return name, gated


def model_updates(hf: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config keys -> values a HF T5 config decides."""
  tied = bool(hf.get("tie_word_embeddings", True))
  activation, gated = source_activation(hf)
  eps = hf.get("layer_norm_epsilon", 1e-6)
  if abs(eps - 1e-6) > 1e-12:
    raise ConfigError(f"layer_norm_epsilon={eps}: sparse_jax's T5 norms use 1e-6.\n{_FIX}")
  layers = int(hf["num_layers"])
  updates = {
      "model.vocab_size": int(hf["vocab_size"]), "model.d_model": int(hf["d_model"]),
      "model.num_heads": int(hf["num_heads"]), "model.head_dim": int(hf["d_kv"]),
      "model.d_ff": int(hf["d_ff"]), "model.num_encoder_layers": layers,
      "model.num_decoder_layers": int(hf.get("num_decoder_layers") or layers),
      "model.relative_attention_num_buckets": int(
          hf.get("relative_attention_num_buckets", 32)),
      "model.relative_attention_max_distance": int(
          hf.get("relative_attention_max_distance", 128)),
      "model.gated_mlp": gated,
      # HF rescales the decoder output iff the head is tied (transformers >= 5 says so
      # in scale_decoder_outputs); a tied source may still be finetuned untied (the
      # official finetune's LoRA on lm_head), keeping the rescale.
      "model.output_rescale": bool(hf.get("scale_decoder_outputs", tied)),
      "model.tie_embeddings": bool(config.model.tie_embeddings) and tied,
  }
  rows = hf.get("sparse_jax", {}).get("zeroth_bias_rows")
  if rows:
    updates["model.max_len"] = int(rows)
  s = config.sparsity
  if s.activation == "mixed":
    if not s.get("mixing_source"):
      updates["sparsity.mixing_source"] = activation
  elif s.activation == "relu" and activation != "relu":
    # A vanilla run of a GELU (or JSReLU) source keeps the source's own activation.
    updates["sparsity.activation"] = activation
  return updates


# ----------------------------------------------------------------------------- names
def _mapping(cfg: dict[str, Any]) -> dict[str, tuple[base.Path, str]]:
  """HF tensor name -> (our path, kind); kind: 'copy' | 'linear' (transpose) |
  'attn_in' ([h*d, e] -> [e, h, d]) | 'attn_out' ([e, h*d] -> [h, d, e])."""
  gated = cfg["model.gated_mlp"]
  out: dict[str, tuple[base.Path, str]] = {
      "shared.weight": (("token_embedder", "embedding"), "copy")}
  if not cfg["hf_tied"]:
    out["lm_head.weight"] = (("lm_head", "kernel"), "linear")

  def attention(hf_prefix, ours):
    for hf, name in (("q", "query"), ("k", "key"), ("v", "value")):
      out[f"{hf_prefix}.{hf}.weight"] = (ours + (name, "kernel"), "attn_in")
    out[f"{hf_prefix}.o.weight"] = (ours + ("out", "kernel"), "attn_out")

  def mlp(hf_prefix, ours):
    ff = f"{hf_prefix}.DenseReluDense"
    if gated:
      out[f"{ff}.wi_0.weight"] = (ours + ("mlp", "wi", "kernel"), "linear")
      out[f"{ff}.wi_1.weight"] = (ours + ("mlp", "wi_linear", "kernel"), "linear")
    else:
      out[f"{ff}.wi.weight"] = (ours + ("mlp", "wi", "kernel"), "linear")
    out[f"{ff}.wo.weight"] = (ours + ("mlp", "wo", "kernel"), "linear")
    out[f"{hf_prefix}.layer_norm.weight"] = (ours + ("mlp_norm", "scale"), "copy")
    out[f"{hf_prefix}.zeroth_bias"] = (ours + ("mlp", "zeroth_bias"), "copy")

  for stack, layers in (("encoder", cfg["model.num_encoder_layers"]),
                        ("decoder", cfg["model.num_decoder_layers"])):
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        (stack, "relative_attention_bias", "embedding"), "copy")
    out[f"{stack}.final_layer_norm.weight"] = ((stack, "final_norm", "scale"), "copy")
    for i in range(layers):
      block, ours = f"{stack}.block.{i}.layer", (stack, f"layer_{i}")
      if stack == "encoder":
        attention(f"{block}.0.SelfAttention", ours + ("attention",))
        out[f"{block}.0.layer_norm.weight"] = (ours + ("attn_norm", "scale"), "copy")
        mlp(f"{block}.1", ours)
      else:
        attention(f"{block}.0.SelfAttention", ours + ("self_attention",))
        out[f"{block}.0.layer_norm.weight"] = (ours + ("self_attn_norm", "scale"), "copy")
        attention(f"{block}.1.EncDecAttention", ours + ("cross_attention",))
        out[f"{block}.1.layer_norm.weight"] = (ours + ("cross_attn_norm", "scale"), "copy")
        mlp(f"{block}.2", ours)
  return out


# HF's per-stack copies of the shared embedding (absent from most safetensors files).
_ALIASES = re.compile(r"^(encoder|decoder)\.embed_tokens\.weight$")


def to_ours(kind: str, value: np.ndarray, heads: int) -> np.ndarray:
  """A HF tensor in our layout (a transpose and a reshape: exact)."""
  if kind == "copy":
    return value
  if kind == "linear":
    return value.T
  if kind == "attn_in":
    return value.T.reshape(value.shape[1], heads, -1)
  return value.T.reshape(heads, -1, value.shape[0])  # attn_out: [e, h*d] -> [h, d, e]


def to_hf(kind: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `to_ours`."""
  if kind == "copy":
    return value
  if kind == "linear":
    return value.T
  if kind == "attn_in":
    return value.reshape(value.shape[0], -1).T
  return value.reshape(-1, value.shape[-1]).T


def _our_shape(kind: str, shape: tuple[int, ...], heads: int) -> tuple[int, ...]:
  if kind == "copy":
    return tuple(shape)
  if kind == "linear":
    return tuple(shape[::-1])
  if kind == "attn_in":
    return (shape[1], heads, shape[0] // heads)
  return (heads, shape[1] // heads, shape[0])


# ----------------------------------------------------------------------------- tensors
class TensorFiles:
  """Names, shapes and values of the tensors of one HF weights directory."""

  def __init__(self, location: str):
    d = epath.Path(location)
    self._files: dict[str, str] = {}
    self._bin: dict[str, np.ndarray] | None = None
    if (d / SAFETENSORS_INDEX).exists():
      weight_map = json.loads((d / SAFETENSORS_INDEX).read_text())["weight_map"]
      self._files = {name: str(d / f) for name, f in weight_map.items()}
    elif (d / SAFETENSORS).exists():
      with safe_open(str(d / SAFETENSORS), framework="numpy") as f:
        self._files = {name: str(d / SAFETENSORS) for name in f.keys()}
    elif (d / TORCH_BIN).exists():
      try:
        self._bin = torch_bin.load(str(d / TORCH_BIN))
      except ValueError as e:
        raise ConfigError(f"{e}\n{_FIX}") from None
    else:
      raise ConfigError(f"hf:{location} holds no {SAFETENSORS}, {SAFETENSORS_INDEX} or "
                        f"{TORCH_BIN}.\n{_FIX}")

  def names(self) -> list[str]:
    return list(self._bin) if self._bin is not None else list(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    if self._bin is not None:
      return tuple(self._bin[name].shape)
    with safe_open(self._files[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    if self._bin is not None:
      return self._bin[name]
    with safe_open(self._files[name], framework="numpy") as f:
      return f.get_tensor(name)


# ----------------------------------------------------------------------------- source
class HfT5Source(base.Source):
  """A Hugging Face T5 directory (v1.0 ReLU / v1.1 and Flan-T5 gated GELU)."""
  format: ClassVar[str] = "hf"

  def hf_config(self) -> dict[str, Any]:
    """The model's HF config.json."""
    return read_config(self.location)

  def tensor_files(self) -> Any:
    """The weights, by HF name: `names()`, `shape(name)`, `read(name)` (numpy)."""
    return TensorFiles(self.location)

  def _layout(self) -> dict[str, Any]:
    hf = self.hf_config()
    layout = model_updates(hf, _NEUTRAL)
    layout["hf_tied"] = bool(hf.get("tie_word_embeddings", True))
    return layout

  def tensor_name(self, path: base.Path) -> str:
    names = {ours: hf for hf, (ours, _) in _mapping(self._layout()).items()}
    return names.get(path, "/".join(path))

  def vocabulary_path(self) -> str | None:
    path = epath.Path(self.location) / SPIECE
    return str(path) if path.exists() else None

  def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model shape, activation, gating, head and zeroth-bias rows from config.json,
    the tokenizer from spiece.model (when the directory has one)."""
    if config.model.name != "t5":
      raise ConfigError(f"finetune.checkpoint=hf:{self.location} is a T5 checkpoint, "
                        f"but the config's model is {config.model.name!r}.\nFix: "
                        "finetune it with configs/t5_c4.py (e.g. :base,finetune).")
    base.check_mixing_completes(config)
    updates = model_updates(self.hf_config(), config)
    vocab = self.vocabulary_path()
    if vocab:
      updates["text.vocabulary_path"] = vocab
    self.param_shapes()  # The weights must be there and readable.
    return base.with_updates(config, updates)

  def param_shapes(self) -> base.Shapes:
    layout = self._layout()
    mapping = _mapping(layout)
    heads = layout["model.num_heads"]
    tensors = self.tensor_files()
    shapes = {}
    for name in tensors.names():
      if _ALIASES.match(name) or (name == "lm_head.weight" and layout["hf_tied"]):
        continue  # Copies of shared.weight (torch state dicts keep the tied ones).
      if name not in mapping:
        raise ConfigError(f"The checkpoint hf:{self.location} does not fit this model: "
                          f"its tensor {name} is not part of a T5 as config.json "
                          "describes it.\nFix: make config.json describe these weights "
                          "(feed_forward_proj, num_layers, num_decoder_layers, "
                          "tie_word_embeddings), e.g. re-save the model with "
                          "save_pretrained.")
      path, kind = mapping[name]
      shapes[path] = _our_shape(kind, tensors.shape(name), heads)
    return shapes

  def read_params(self, shapes: Any, shardings: Any) -> dict[base.Path, jax.Array]:
    source = self.param_shapes()
    base.check_params_fit(self, source, shapes,
                          "Fix: finetune with the model keys config.json gives (the "
                          "source sets them; do not override model.* on the command line).")
    layout = self._layout()
    by_path = {ours: (hf, kind) for hf, (ours, kind) in _mapping(layout).items()}
    tensors = self.tensor_files()

    def reader(path):
      hf, kind = by_path[path]
      return to_ours(kind, np.asarray(tensors.read(hf)), layout["model.num_heads"])
    params = base.placed(reader, source, shapes, shardings)
    flat_shapes = traverse_util.flatten_dict(shapes)
    lm_head, embedding = ("lm_head", "kernel"), ("token_embedder", "embedding")
    if lm_head in flat_shapes and lm_head not in source:
      # Untied from a tied source: the head starts as the embedding (transposed).
      params[lm_head] = base.placed(lambda _: reader(embedding).T, [lm_head], shapes,
                                    shardings)[lm_head]
    return params

  def export(self, params: Any, config: ml_collections.ConfigDict, directory: str) -> str:
    return export(params, config, directory, vocabulary=self.vocabulary_path())


_NEUTRAL = ml_collections.ConfigDict(dict(
    model=dict(tie_embeddings=True), sparsity=dict(activation="jsrelu", mixing_source="")))


# ----------------------------------------------------------------------------- export
def hf_config_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The HF T5 config.json of a sparse_jax T5 run's model (after its last step)."""
  m, s = config.model, config.sparsity
  activation = s.activation
  if activation == "mixed":
    if config.num_steps < s.activation_mixing_steps:
      raise ValueError(f"The run ends at step {config.num_steps}, before the activation "
                       f"is all J-SquaredReLU (step {s.activation_mixing_steps}): its "
                       "mixed activation has no HF name.\nFix: finetune for at least "
                       "sparsity.activation_mixing_steps steps.")
    activation = "jsrelu"
  tied = bool(m.tie_embeddings)
  proj = HF_ACTIVATION[activation]
  if m.gated_mlp:
    proj = "gated-" + ("gelu" if proj == "gelu_new" else proj)
  hf = {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": int(m.vocab_size), "d_model": int(m.d_model), "d_kv": int(m.head_dim),
      "d_ff": int(m.d_ff), "num_layers": int(m.num_encoder_layers),
      "num_decoder_layers": int(m.num_decoder_layers), "num_heads": int(m.num_heads),
      "relative_attention_num_buckets": int(m.relative_attention_num_buckets),
      "relative_attention_max_distance": int(m.relative_attention_max_distance),
      "dropout_rate": float(m.dropout_rate), "layer_norm_epsilon": 1e-6,
      "initializer_factor": 1.0, "feed_forward_proj": proj,
      "is_encoder_decoder": True, "use_cache": True, "pad_token_id": 0,
      "eos_token_id": 1, "decoder_start_token_id": 0, "tie_word_embeddings": tied,
  }
  if activation == "gelu_tanh" and m.gated_mlp:
    hf["dense_act_fn"] = "gelu_new"
  extra = {"activation": activation}
  if s.zeroth_bias_position != "none":
    extra.update(zeroth_bias_position=s.zeroth_bias_position,
                 zeroth_bias_rows=int(m.max_len))
  if extra != {"activation": activation} or activation == "jsrelu":
    hf["sparse_jax"] = extra
  return hf


def export(params: Any, config: ml_collections.ConfigDict, directory: str,
           vocabulary: str | None = None) -> str:
  """Writes a T5 run's plain params as a HF directory: config.json, model.safetensors
  (float32) and, when given, the SentencePiece `vocabulary` as spiece.model.

  An untied head that keeps v1.0's 1/sqrt(d_model) rescale (a finetune untied from a
  tied source) has no HF equivalent flag: the rescale is folded into lm_head.weight.
  """
  m = config.model
  hf = hf_config_of(config)
  layout = model_updates(hf, _NEUTRAL) | {"hf_tied": hf["tie_word_embeddings"]}
  flat = traverse_util.flatten_dict(base.host_params(params))
  if jax.process_index() > 0:
    return directory  # Process 0 writes the files.
  tensors = {}
  for name, (path, kind) in _mapping(layout).items():
    if path in flat:
      tensors[name] = np.ascontiguousarray(to_hf(kind, np.asarray(flat[path],
                                                                 np.float32)))
  if not hf["tie_word_embeddings"] and m.output_rescale:
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float32(m.d_model ** -0.5)
  missing = [p for p in flat if p not in {path for path, _ in _mapping(layout).values()}]
  if missing:
    raise ValueError(f"No HF T5 name for {'/'.join(missing[0])}.")
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, SAFETENSORS), metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if vocabulary:
    epath.Path(vocabulary).copy(epath.Path(directory) / SPIECE, overwrite=True)
  return directory
