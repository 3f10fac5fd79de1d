"""Image classification input pipeline: `sklearn_digits`, `cifar10`, `mnist`, `imagenet2012`.

Records are read through TFDS with the image still encoded, so per-process
sharding, shuffling and resume-skipping only touch raw bytes; ImageNet JPEGs
are then decoded and augmented per example in parallel tf.data maps, while the
tiny digits are decoded once, cached, and augmented a whole batch at a time.

All randomness is stateless and keyed by (config.seed, epoch | example counter
| step), so a run restarted at step k yields exactly the batches of an
uninterrupted run. Whole epochs are skipped for free (each epoch's shuffle
seed depends only on its index); within the resumed epoch the skipped records
are read but never decoded.
"""

import math
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sparse_jax.data import mixing
from sparse_jax.data import preprocess
from sparse_jax.data import randaugment
from sparse_jax.data import sources
# Re-exported: this module is the pipeline's public API.
from sparse_jax.data.sources import DatasetInfo  # noqa: F401
from sparse_jax.data.sources import prepare_dataset  # noqa: F401

# Distinct tags keep the shuffle / per-example / per-batch seed streams apart.
_SHUFFLE_TAG, _EXAMPLE_TAG, _BATCH_TAG = 1, 2, 3
_MAX_EPOCHS = 2**62  # "Forever", as a finite range for flat_map.


# The pipeline functions hold no tensor-dependent Python control flow, so
# AutoGraph would only add seconds of conversion to every iterator we build.
_plain = tf.autograph.experimental.do_not_convert


def _key(config, tag: int) -> tf.Tensor:
  """The root seed of one randomness stream."""
  return tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, 0], tf.int64), tag)


def _fold(key: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _augment_example(config, spec: sources.Spec, key: tf.Tensor,
                     image_bytes: tf.Tensor) -> tf.Tensor:
  """ImageNet: decodes and augments one JPEG; `key` is its own seed."""
  crop_key, flip_key, ra_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 3))
  image = preprocess.decode_and_random_crop(
      image_bytes, config.image_size, crop_key)
  if sources.input_value(config, 'flip'):
    image = preprocess.flip(image, flip_key)
  image = _randaugment(config, image, ra_key)
  return preprocess.normalize(image)


def _randaugment(config, image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  layers = sources.input_value(config, 'randaugment_layers')
  if not layers:
    return image
  magnitude = sources.input_value(config, 'randaugment_magnitude')
  return randaugment.randaugment(image, layers, magnitude, key)


def _augment_digits(config, images: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Small images (digits, CIFAR-10, MNIST): augments a whole uint8 [B, H, W, C] batch
  at once."""
  shift_key, ra_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  size = config.image_size
  # Grey images stay single-channel until the end: a third of the work.
  images = preprocess.resize(tf.cast(images, tf.float32), size,
                             antialias=size < images.shape[1])
  pad = size // 8 if sources.input_value(config, 'crop') != 'none' else 0
  flip = sources.input_value(config, 'flip')
  if pad or flip:
    images = preprocess.batch_crop_flip(images, pad, flip, shift_key)
  if images.shape[-1] == 1:
    images = tf.image.grayscale_to_rgb(images)
  if sources.input_value(config, 'randaugment_layers'):
    keys = tf.random.experimental.stateless_split(ra_key, images.shape[0])
    images = tf.map_fn(lambda args: _randaugment(config, *args),
                       (images, keys), fn_output_signature=tf.float32)
  return preprocess.normalize(images)


def _soft_labels(config, spec: sources.Spec, labels: tf.Tensor) -> tf.Tensor:
  smoothing = sources.input_value(config, 'label_smoothing')
  one_hot = tf.one_hot(labels, spec.num_classes)
  return one_hot * (1.0 - smoothing) + smoothing / spec.num_classes


def train_iterator(config, *, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator over this process's share of each global train batch.

  Args:
    config: experiment ConfigDict (dataset, image_size, batch_size, seed,
      input.*; see `sources.validate`). Call `prepare_dataset` first.
    start_step: first step to yield; equals the `start_step`-th batch of an
      iterator started at 0 (for resuming from a checkpoint).
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    An iterator of {'image': float32 [B, S, S, 3] in [-1, 1], 'label': float32
    [B, K] soft targets summing to 1}, B = batch_size // process_count.
  """
  sources.configure_tf()
  spec = sources.validate(config, process_count)
  batch = config.batch_size // process_count
  shard = tfds.even_splits(spec.train_split, n=process_count)[process_index]
  records = sources.read_records(config, shard)
  epoch_size = int(records.cardinality())
  if epoch_size < 1:
    raise sources.error(
        f'Process {process_index}/{process_count} got no {config.dataset} '
        'training examples.', 'use fewer processes or a larger dataset')
  per_example = spec.crops[0] == 'inception'  # Variable-size JPEGs.
  if not per_example:
    # Small images decode into little memory (1,500 digits: ~100 KB; CIFAR-10:
    # 150 MB): decoding them once beats re-decoding (or skipping encoded
    # records) every epoch.
    records = records.map(_plain(lambda r: {
        'image': preprocess.decode_small(r['image'], spec.stored_shape),
        'label': r['label']}))
    records = records.cache()
  shuffle_key = _key(config, _SHUFFLE_TAG)
  buffer = sources.input_value(config, 'shuffle_buffer')

  def epoch(index):
    # A fresh, seeded order each epoch that depends only on the epoch index.
    seed = tf.random.stateless_uniform(
        [], _fold(shuffle_key, index), minval=None, maxval=None, dtype=tf.int64)
    return records.shuffle(buffer, seed=seed)

  first = start_step * batch  # Local example counter of the first example.
  start_epoch, offset = divmod(first, epoch_size)
  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(_plain(epoch))
  ds = ds.skip(offset)  # Before any decoding: skipped records stay bytes.
  if per_example:
    example_key = _key(config, _EXAMPLE_TAG)

    def example(counter, record):
      # Keyed by the global example counter, unique over processes.
      key = _fold(example_key, counter * process_count + process_index)
      return {'image': _augment_example(config, spec, key, record['image']),
              'label': record['label']}

    ds = ds.enumerate(start=first).map(
        _plain(example), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True).enumerate(start=start_step)
  batch_key = _fold(_key(config, _BATCH_TAG), process_index)

  def finish_batch(step, examples):
    aug_key, mix_key = tf.unstack(tf.random.experimental.stateless_split(
        _fold(batch_key, step), 2))
    images = examples['image']
    if not per_example:
      images = _augment_digits(config, images, aug_key)
    images, labels = mixing.mix_batch(
        images, _soft_labels(config, spec, examples['label']), seed=mix_key,
        mixup_alpha=sources.input_value(config, 'mixup_alpha'),
        cutmix_alpha=sources.input_value(config, 'cutmix_alpha'))
    return {'image': images, 'label': labels}

  ds = ds.map(_plain(finish_batch), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(2).with_options(sources.data_options(config)).as_numpy_iterator()


def _eval_example(config, spec: sources.Spec, record: dict) -> dict:
  size = config.image_size
  if spec.crops[0] == 'inception':  # ImageNet-style JPEGs.
    image = preprocess.decode_and_center_crop(
        record['image'], size, sources.input_value(config, 'eval_resize'))
  else:
    image = preprocess.resize(
        tf.cast(preprocess.decode_small(record['image'], spec.stored_shape),
                tf.float32), size, antialias=size < spec.stored_shape[0])
    if spec.stored_shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
  return {'image': preprocess.normalize(image),
          'label': tf.cast(record['label'], tf.int32),
          'mask': tf.constant(1.0, tf.float32)}


def eval_iterator(config, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over this process's share of the eval split.

  Every process yields the same number of full batches (so collective ops stay
  in step); the tail is padded with zero images whose mask is 0.

  Args:
    config: experiment ConfigDict (see `train_iterator`).
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    An iterator of {'image': float32 [b, S, S, 3] in [-1, 1], 'label': int32 [b],
    'mask': float32 [b], 1.0 for real examples}, b = eval_batch_size //
    process_count.
  """
  sources.configure_tf()
  spec = sources.validate(config, process_count)
  batch = config.eval_batch_size // process_count
  # The split's cardinality comes from TFDS metadata: nothing is read here.
  total = int(sources.read_records(config, spec.eval_split).cardinality())
  # even_splits gives shards of ceil or floor(total / n) examples.
  num_batches = math.ceil(math.ceil(total / process_count) / batch)
  shard = tfds.even_splits(spec.eval_split, n=process_count)[process_index]
  ds = sources.read_records(config, shard).map(
      _plain(lambda record: _eval_example(config, spec, record)),
      num_parallel_calls=tf.data.AUTOTUNE)
  size = config.image_size
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros((size, size, 3), tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0, tf.float32)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch).batch(batch)
  ds = ds.prefetch(2).with_options(sources.data_options(config))
  return ds.as_numpy_iterator()
