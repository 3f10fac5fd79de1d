"""Mesh TensorFlow T5 checkpoints (`mtf:<checkpoint>`): the original T5 v1.0 and v1.1
releases (gs://t5-data/pretrained_models/..., model.ckpt-<step>), read with
`tf.train.load_checkpoint`.

Their variables are named like the HF modules (`encoder/block_000/layer_000/
SelfAttention/q`, `.../layer_001/DenseReluDense/wi/kernel` or `wi_0`/`wi_1`,
`.../layer_norm/scale`, `encoder/final_layer_norm/scale`, `shared/embedding`,
`decoder/logits/kernel` for v1.1's untied head), stored [in, out] (the relative attention
bias [heads, buckets]); each is transposed into the HF tensor of the same name and read
as `hf_t5` reads it. Adafactor's slots (`*_slot_*`) and `global_step` are skipped. The
checkpoint holds no config: the shapes give the widths, the relative attention bias the
heads, `wi_0` a gated-GELU (v1.1) model, `decoder/logits` an untied head; the relative
attention's max distance and the tokenizer stay the config's
(`model.relative_attention_max_distance`, 128 as T5's; `text.vocabulary_path`, T5's
public SentencePiece model by default). Finetuned models export in the HF
layout.
"""
import re
from typing import Any, ClassVar

import ml_collections
import numpy as np

from sparse_jax.errors import ConfigError
from sparse_jax.pretrained import base, hf_t5

_FIX = ("Fix: pass --config.finetune.checkpoint=mtf:<a T5 checkpoint prefix, e.g. "
        "gs://t5-data/pretrained_models/base/model.ckpt-999900, or its directory>.")
_SKIP = re.compile(r"(^global_step$|_slot_|adam_[mv]|/Adafactor)")
_BLOCK = re.compile(r"^(encoder|decoder)/block_(\d+)/layer_(\d+)/(.+)$")


def hf_name(name: str) -> str | None:
  """The HF tensor name of a Mesh TF variable (None for optimizer state)."""
  if _SKIP.search(name):
    return None
  if name == "shared/embedding":
    return "shared.weight"
  if name == "decoder/logits/kernel":
    return "lm_head.weight"
  match = re.match(r"^(encoder|decoder)/(final_layer_norm|rms_norm)/scale$", name)
  if match:
    return f"{match.group(1)}.final_layer_norm.weight"
  match = _BLOCK.match(name)
  if match:
    stack, block, layer, rest = match.groups()
    rest = re.sub(r"^(layer_norm|rms_norm)/scale$", "layer_norm.weight", rest)
    rest = re.sub(r"/kernel$", "", rest).replace("/", ".")
    rest = rest if rest.endswith(".weight") else rest + ".weight"
    return f"{stack}.block.{int(block)}.layer.{int(layer)}.{rest}"
  return name  # Not a T5 variable: named in param_shapes' error.


class _Variables:
  """A TF checkpoint's variables under their HF names (`hf_t5.TensorFiles`' interface)."""

  def __init__(self, location: str):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    path = location
    if tf.io.gfile.isdir(location):
      path = tf.train.latest_checkpoint(location)
      if path is None:
        raise ConfigError(f"mtf:{location} holds no TF checkpoint (no 'checkpoint' "
                          f"file).\n{_FIX}")
    try:
      self._reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
      raise ConfigError(f"mtf:{location} is not a readable TF checkpoint "
                        f"({type(e).__name__}).\n{_FIX}") from None
    shapes = self._reader.get_variable_to_shape_map()
    self._names = {hf_name(n): n for n in sorted(shapes) if hf_name(n) is not None}
    self._shapes = {hf: tuple(shapes[n]) for hf, n in self._names.items()}

  def names(self) -> list[str]:
    return list(self._names)

  def shape(self, name: str) -> tuple[int, ...]:
    # Transposed into HF's [out, in] (a vector or the embedding stays).
    shape = self._shapes[name]
    return shape if name == "shared.weight" else shape[::-1]

  def read(self, name: str) -> np.ndarray:
    value = np.asarray(self._reader.get_tensor(self._names[name])).astype(np.float32)
    return value if name == "shared.weight" else value.T


class MtfT5Source(hf_t5.HfT5Source):
  """A Mesh TensorFlow T5 checkpoint (T5 v1.0 / v1.1 releases)."""
  format: ClassVar[str] = "mtf"

  def tensor_files(self) -> Any:
    return _Variables(self.location)

  def hf_config(self) -> dict[str, Any]:
    """The HF config the variables' shapes imply."""
    t = self.tensor_files()
    names = set(t.names())
    def shape(name):
      if name not in names:
        raise ConfigError(f"mtf:{self.location} has no {name} (as HF names it): not a "
                          f"T5 checkpoint.\n{_FIX}")
      return t.shape(name)
    vocab, d_model = shape("shared.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias."
                           "weight")  # HF's [buckets, heads] (Mesh TF's transposed).
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in names
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense."
                 f"{'wi_0' if gated else 'wi'}.weight")[0]
    count = lambda stack: len({n.split(".")[2] for n in names
                               if n.startswith(f"{stack}.block.")})
    return {"model_type": "t5", "vocab_size": vocab, "d_model": d_model,
            "d_kv": inner // heads, "num_heads": heads, "d_ff": d_ff,
            "num_layers": count("encoder"), "num_decoder_layers": count("decoder"),
            "relative_attention_num_buckets": buckets,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu" if gated else "relu",
            "tie_word_embeddings": "lm_head.weight" not in names}

  def vocabulary_path(self) -> str | None:
    return None  # Not part of the checkpoint: the config's text.vocabulary_path.

  def configure(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    distance = config.model.relative_attention_max_distance  # Not in the checkpoint.
    return base.with_updates(super().configure(config),
                             {"model.relative_attention_max_distance": distance})
