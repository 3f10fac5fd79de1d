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

Repeated augmentation (`input.repeated_augmentation` = r > 1, the official ViT
recipe's `RASampler` with r = 3): an epoch is `train examples // batch_size`
steps, in which 1/r of the images are each seen r times, every copy with its
own augmentation. The split is cut into one shard per process. Each epoch
draws from every shard a uniformly random 1/r of its images, the first of a
fresh stateless permutation of the whole shard (`index_shuffle`, seeded by
(epoch, shard)), so every image has the same chance in every epoch however
small the shuffle buffer, which then only orders the drawn images. (A buffer
alone, reading the shard in file order, could only ever emit the shard's first
`buffer + 1/r of it` images.) The processes that read a shard agree on its
draw and order, and process p takes copy c of the j-th image of shard
(p - c) mod P at its local position r j + c. The r copies of
an image thus land on r different processes when there are at least r, at
nearly the same step; with fewer processes, each local batch is laid out in r
strided groups, so copies sit >= batch / r - 1 positions apart, on different
devices once the local batch is split over more than r of them.
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
_SHUFFLE_TAG, _EXAMPLE_TAG, _BATCH_TAG, _DRAW_TAG = 1, 2, 3, 4
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
      image_bytes, config.image_size, crop_key,
      sources.input_value(config, 'crop_sampler'))
  if sources.input_value(config, 'flip'):
    image = preprocess.flip(image, flip_key)
  image = _randaugment(config, image, ra_key)
  return preprocess.normalize(image)


def _randaugment(config, image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  layers = sources.input_value(config, 'randaugment_layers')
  if not layers:
    return image
  magnitude = sources.input_value(config, 'randaugment_magnitude')
  return randaugment.randaugment(image, layers, magnitude, key,
                                 sources.input_value(config, 'randaugment_scale'))


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


def targets(config, labels: tf.Tensor, num_classes: int, *, images: tf.Tensor,
            seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Mixup / CutMix of a batch, then its training targets [B, K].

  `input.mix_targets`: 'soft' keeps the mixed one-hot targets; 'hard' (the
  official ViT recipe) replaces each by the one-hot of its argmax, the class
  with the larger share. Label smoothing (`input.label_smoothing`) comes last.

  Returns:
    (mixed images, targets summing to 1).
  """
  images, mixed = mixing.mix_batch(
      images, tf.one_hot(labels, num_classes), seed=seed,
      mixup_alpha=sources.input_value(config, 'mixup_alpha'),
      cutmix_alpha=sources.input_value(config, 'cutmix_alpha'))
  if sources.input_value(config, 'mix_targets') == 'hard':
    mixed = tf.one_hot(tf.argmax(mixed, axis=-1), num_classes)
  smoothing = sources.input_value(config, 'label_smoothing')
  return images, mixed * (1.0 - smoothing) + smoothing / num_classes


def spread_copies(batch: int, repetitions: int) -> tf.Tensor:
  """The gather order that lays a local batch out as `repetitions` strided groups
  (positions 0, r, 2r, ... first, then 1, r + 1, ...): consecutive examples, such
  as the copies of a repeated image, end up >= batch // r - 1 positions apart."""
  return tf.constant([i for c in range(repetitions)
                      for i in range(c, batch, repetitions)], tf.int32)


def _repeated_epochs(config, spec: sources.Spec, decode_small, start_step: int,
                     process_index: int, process_count: int) -> tuple[tf.data.Dataset, int]:
  """This process's records for repeated augmentation (see the module docstring)
  from `start_step` on, and the local example counter of the first."""
  reps = sources.input_value(config, 'repeated_augmentation')
  batch = config.batch_size // process_count
  total = int(sources.read_records(config, spec.train_split).cardinality())
  steps = total // config.batch_size  # Per epoch, as the official RASampler.
  if steps < 1:
    raise sources.error(
        f'{config.dataset} has {total} training examples, fewer than one '
        f'batch of {config.batch_size}.', 'pass a smaller --config.batch_size')
  local = steps * batch  # Local examples per epoch.
  per_shard = -(-local // reps)  # Images each shard gives per epoch.
  shards = tfds.even_splits(spec.train_split, n=process_count)
  # The shard of each copy c, and the distinct shards this process reads.
  sources_of_copy = [(process_index - c) % process_count for c in range(reps)]
  read = list(dict.fromkeys(sources_of_copy))
  records, sizes = {}, {}
  for s in read:
    records[s] = sources.read_records(config, shards[s])
    sizes[s] = int(records[s].cardinality())
    if sizes[s] < per_shard:
      raise sources.error(
          f'{config.dataset} has {total} training examples: with '
          f'repeated_augmentation={reps}, batch_size={config.batch_size} and '
          f'{process_count} processes, a shard of {sizes[s]} '
          f'gives fewer than the {per_shard} images an epoch needs.',
          'use fewer processes or --config.input.repeated_augmentation=1')
    if decode_small is not None:
      records[s] = records[s].map(_plain(decode_small)).cache()
  shuffle_key, draw_key = _key(config, _SHUFFLE_TAG), _key(config, _DRAW_TAG)
  # The buffers together hold what one unrepeated shuffle buffer would.
  buffer = -(-sources.input_value(config, 'shuffle_buffer') // len(read))

  def epoch(index):
    def shuffled(s):
      # Seeded by (epoch, shard) only: every process reading shard s agrees.
      draw_seed = _fold(_fold(draw_key, index), s)
      last = tf.constant(sizes[s] - 1, tf.int64)

      def drawn(position, record):
        del record
        # A bijection of [0, size): exactly per_shard images have a rank below it. The
        # whole shard is read (as bytes) to keep them: tfds records have no random
        # access, and a shuffle buffer alone would only reach the shard's prefix.
        rank = tf.random.experimental.index_shuffle(position, draw_seed, last)
        return rank < per_shard

      seed = tf.random.stateless_uniform(
          [], _fold(_fold(shuffle_key, index), s), minval=None, maxval=None,
          dtype=tf.int64)
      return records[s].enumerate().filter(_plain(drawn)).map(
          _plain(lambda position, record: record)).shuffle(buffer, seed=seed)

    def copies(*rows):
      by_shard = dict(zip(read, rows))
      return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(
          lambda *xs: tf.stack(xs), *[by_shard[s] for s in sources_of_copy]))

    return tf.data.Dataset.zip(tuple(shuffled(s) for s in read)).flat_map(
        _plain(copies)).take(local)

  first = start_step * batch
  start_epoch, offset = divmod(first, local)
  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(_plain(epoch))
  return ds.skip(offset), first


def _epochs(config, spec: sources.Spec, decode_small, start_step: int,
            process_index: int, process_count: int) -> tuple[tf.data.Dataset, int]:
  """This process's records, one reshuffled pass over its shard per epoch, from
  `start_step` on, and the local example counter of the first."""
  batch = config.batch_size // process_count
  shard = tfds.even_splits(spec.train_split, n=process_count)[process_index]
  records = sources.read_records(config, shard)
  epoch_size = int(records.cardinality())
  if epoch_size < 1:
    raise sources.error(
        f'Process {process_index}/{process_count} got no {config.dataset} '
        'training examples.', 'use fewer processes or a larger dataset')
  if decode_small is not None:
    records = records.map(_plain(decode_small)).cache()
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
  return ds.skip(offset), first  # Before any decoding: skipped records stay bytes.


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
  per_example = spec.crops[0] == 'inception'  # Variable-size JPEGs.
  # Small images decode into little memory (1,500 digits: ~100 KB; CIFAR-10:
  # 150 MB): decoding them once beats re-decoding (or skipping encoded
  # records) every epoch.
  decode_small = None if per_example else (lambda r: {
      'image': preprocess.decode_small(r['image'], spec.stored_shape),
      'label': r['label']})
  reps = sources.input_value(config, 'repeated_augmentation')
  if reps > 1:
    ds, first = _repeated_epochs(config, spec, decode_small, start_step,
                                 process_index, process_count)
  else:
    ds, first = _epochs(config, spec, decode_small, start_step, process_index,
                        process_count)
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
  # Fewer processes than copies: keep a local batch's copies apart (devices).
  order = spread_copies(batch, reps) if 1 < reps and process_count < reps else None

  def finish_batch(step, examples):
    aug_key, mix_key = tf.unstack(tf.random.experimental.stateless_split(
        _fold(batch_key, step), 2))
    if order is not None:
      examples = tf.nest.map_structure(lambda x: tf.gather(x, order), examples)
    images = examples['image']
    if not per_example:
      images = _augment_digits(config, images, aug_key)
    images, labels = targets(config, examples['label'], spec.num_classes,
                             images=images, seed=mix_key)
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
