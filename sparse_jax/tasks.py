"""What a model is trained on: its inputs from a batch, loss, metrics and input pipeline.

The trainer is task-agnostic; `task_for(config)` returns one of
* `ImageClassification` (ViT): batches {'image', 'label'} (+ 'mask' in eval), softmax
  cross-entropy against (soft) labels, top-1 accuracy, per-example sparsity masks;
* `SpanCorruption` (T5): batches {'encoder_input_tokens', 'decoder_input_tokens',
  'decoder_target_tokens', 'decoder_loss_weights'} (+ 'mask'), token cross-entropy and
  accuracy, and sparsity statistics per stack over real (non-padding) tokens only.
"""
import dataclasses
import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sparse_jax import metrics as metrics_lib

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ImageClassification:
  """Images -> class logits."""
  stacks = None  # One stack of MLP blocks: metric keys `<name>/layer_<i>`.
  data_module = "sparse_jax.data.images"

  def dummy_inputs(self, config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
    return (jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32),)

  def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
    return (batch["image"],)

  def batch_shapes(self, config: ml_collections.ConfigDict, train: bool
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """A global train or eval batch as the input pipeline yields it, as shapes."""
    size, image = _batch_size(config, train), config.image_size
    out = {"image": jax.ShapeDtypeStruct((size, image, image, 3), jnp.float32)}
    if train:  # Soft (mixed, smoothed) targets.
      out["label"] = jax.ShapeDtypeStruct((size, config.num_classes), jnp.float32)
    else:
      out["label"] = jax.ShapeDtypeStruct((size,), jnp.int32)
      out["mask"] = jax.ShapeDtypeStruct((size,), jnp.float32)
    return out

  def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
    return jnp.mean(metrics_lib.cross_entropy(logits, batch["label"]))

  def loss_normalizer(self, batch: Batch) -> jax.Array:
    """What the loss is a mean over: examples."""
    return jnp.asarray(batch["label"].shape[0], jnp.float32)

  def metrics(self, logits: jax.Array, batch: Batch, mask: jax.Array | None = None
              ) -> dict[str, jax.Array]:
    return metrics_lib.classification_metrics(logits, batch["label"], mask)

  def sparsity_masks(self, batch: Batch, mask: jax.Array | None = None
                     ) -> metrics_lib.Masks:
    return mask


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
  """Corrupted text -> the dropped spans (T5 pretraining)."""
  stacks = ("encoder", "decoder")
  data_module = "sparse_jax.data.text"

  def dummy_inputs(self, config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
    t = config.text
    return (jnp.ones((1, t.inputs_length), jnp.int32),
            jnp.ones((1, t.targets_length), jnp.int32))

  def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
    return batch["encoder_input_tokens"], batch["decoder_input_tokens"]

  def batch_shapes(self, config: ml_collections.ConfigDict, train: bool
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """A global train or eval batch as the input pipeline yields it, as shapes."""
    size, t = _batch_size(config, train), config.text
    tokens = lambda n, dtype=jnp.int32: jax.ShapeDtypeStruct((size, n), dtype)
    out = {"encoder_input_tokens": tokens(t.inputs_length),
           "decoder_input_tokens": tokens(t.targets_length),
           "decoder_target_tokens": tokens(t.targets_length),
           "decoder_loss_weights": tokens(t.targets_length, jnp.float32)}
    if not train:
      out["mask"] = jax.ShapeDtypeStruct((size,), jnp.float32)
    return out

  def loss(self, logits: jax.Array, batch: Batch) -> jax.Array:
    return metrics_lib.masked_mean(
        metrics_lib.cross_entropy(logits, batch["decoder_target_tokens"]),
        self._decoder_weights(batch, None))

  def loss_normalizer(self, batch: Batch) -> jax.Array:
    """What the loss is a mean over: target tokens."""
    return jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)

  def metrics(self, logits: jax.Array, batch: Batch, mask: jax.Array | None = None
              ) -> dict[str, jax.Array]:
    return metrics_lib.token_metrics(logits, batch["decoder_target_tokens"],
                                     self._decoder_weights(batch, mask))

  def sparsity_masks(self, batch: Batch, mask: jax.Array | None = None
                     ) -> metrics_lib.Masks:
    encoder = (batch["encoder_input_tokens"] > 0).astype(jnp.float32)
    if mask is not None:
      encoder = encoder * mask[:, None]
    return {"encoder": encoder, "decoder": self._decoder_weights(batch, mask)}

  @staticmethod
  def _decoder_weights(batch: Batch, mask: jax.Array | None) -> jax.Array:
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    return weights if mask is None else weights * mask[:, None]


def _batch_size(config: ml_collections.ConfigDict, train: bool) -> int:
  return int(config.batch_size if train else config.eval_batch_size)


Task = ImageClassification | SpanCorruption
TASKS: dict[str, Any] = {"vit": ImageClassification, "t5": SpanCorruption,
                         "residual_mlp": ImageClassification}


def task_for(config: ml_collections.ConfigDict) -> Task:
  """The task of `config.model.name` (validated by config_schema)."""
  return TASKS[config.model.name]()


def data_pipeline(task: Task) -> ModuleType:
  """The task's input pipeline module (prepare_dataset, train_iterator, eval_iterator).

  Imported on demand: the pipelines import TensorFlow, which costs seconds.
  """
  return importlib.import_module(task.data_module)
