"""Dataset sources for the image pipeline: config checks, TFDS preparation.

Knows which datasets exist, validates the config keys the pipeline reads and
makes sure the TFDS data is there (`prepare_dataset`); `images` builds the
tf.data pipelines on top.
"""

import dataclasses
import os
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from sparse_jax.data import digits  # noqa: F401  (registers `sklearn_digits`)
from sparse_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the pipeline needs to know about one supported dataset."""
  num_classes: int
  train_split: str
  eval_split: str
  crops: tuple[str, ...]
  sizes: tuple[int, int]  # (train, eval) sizes, used when TFDS metadata lacks them.
  # (height, width, channels) of the stored PNGs of small datasets, decoded once and
  # cached; None = variable-size JPEGs decoded per example (ImageNet).
  stored_shape: tuple[int, int, int] | None = None


DATASETS = {
    'sklearn_digits': Spec(10, 'train', 'test', ('pad_crop', 'none'),
                            (1500, 297), (8, 8, 1)),
    # The papers' validation datasets, prepared by TFDS in data_dir (no manual files).
    'cifar10': Spec(10, 'train', 'test', ('pad_crop', 'none'), (50_000, 10_000),
                    (32, 32, 3)),
    'mnist': Spec(10, 'train', 'test', ('pad_crop', 'none'), (60_000, 10_000),
                  (28, 28, 1)),
    'imagenet2012': Spec(1000, 'train', 'validation', ('inception',),
                          (1_281_167, 50_000)),
}
_IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
# `crop=None` means the dataset's default, the first entry of Spec.crops.
_INPUT_DEFAULTS = dict(shuffle_buffer=10_000, crop=None, flip=False,
                       randaugment_layers=0, randaugment_magnitude=0,
                       mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
                       eval_resize=256, num_threads=0, randaugment_scale='big_vision',
                       mix_targets='soft', repeated_augmentation=1,
                       crop_sampler='tensorflow')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about the configured dataset, for the model and trainer."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: tuple[int, int, int]  # (image_size, image_size, 3)


def error(problem: str, fix: str) -> ConfigError:
  """A ConfigError stating `problem`, with `Fix: {fix}` as its last line."""
  return ConfigError(f'{problem}\nFix: {fix}')


def input_value(config, key: str) -> Any:
  """config.input.<key>, falling back to a neutral default if it is absent."""
  section = config.get('input') or {}
  return section.get(key, _INPUT_DEFAULTS[key])


_tf_configured = False


def configure_tf() -> None:
  """Keeps TF off the accelerators, which belong to JAX. Idempotent."""
  global _tf_configured
  if not _tf_configured:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # TF devices already initialised; too late to change.
      pass
    _tf_configured = True


def validate(config, process_count: int = 1) -> Spec:
  """Checks the config keys this module reads; returns the dataset's spec."""
  name = config.dataset
  if name not in DATASETS:
    raise error(f'Unknown dataset {name!r}; supported: {sorted(DATASETS)}.',
                f'pass --config.dataset=one of {", ".join(sorted(DATASETS))}')
  spec = DATASETS[name]
  if config.num_classes != spec.num_classes:
    raise error(f'config.num_classes={config.num_classes} but {name} has '
                f'{spec.num_classes} classes.',
                f'pass --config.num_classes={spec.num_classes}')
  if config.image_size < 1:
    raise error(f'config.image_size={config.image_size} must be positive.',
                'pass a positive --config.image_size (16 for digits, 224 for '
                'ImageNet)')
  for key in ('batch_size', 'eval_batch_size'):
    value = config[key]
    if value < process_count or value % process_count:
      raise error(f'config.{key}={value} is not a positive multiple of the '
                  f'{process_count} processes.',
                  f'pass --config.{key}=a multiple of {process_count}')
  crop = input_value(config, 'crop')
  if crop is not None and crop not in spec.crops:
    raise error(f'config.input.crop={crop!r} is not supported for {name}.',
                f'pass --config.input.crop=one of {", ".join(spec.crops)}')
  if not 0.0 <= input_value(config, 'label_smoothing') < 1.0:
    raise error('config.input.label_smoothing must be in [0, 1).',
                'pass e.g. --config.input.label_smoothing=0.1')
  choices = {'randaugment_scale': ('big_vision', 'torchvision'),
             'mix_targets': ('soft', 'hard'),
             'crop_sampler': ('tensorflow', 'torchvision')}
  for key, allowed in choices.items():
    if input_value(config, key) not in allowed:
      raise error(f'config.input.{key}={input_value(config, key)!r} is not one of '
                  f'{", ".join(allowed)}.', f'pass --config.input.{key}={allowed[0]}')
  reps = input_value(config, 'repeated_augmentation')
  if not (isinstance(reps, int) and reps >= 1):
    raise error(f'config.input.repeated_augmentation={reps!r} must be an integer >= 1.',
                'pass --config.input.repeated_augmentation=3 (1 = off)')
  return spec


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The TFDS builder for config.dataset in config.data_dir."""
  return tfds.builder(config.dataset, data_dir=config.get('data_dir'))


def num_examples(builder, split: Any, fallback: int) -> int:
  """Split size from TFDS metadata (mocked/unprepared builders: `fallback`)."""
  try:
    return builder.info.splits[split].num_examples or fallback
  except (KeyError, ValueError, AssertionError):
    return fallback


def _check_imagenet_source(config, builder) -> None:
  """Fails fast (before any slow work) if ImageNet can be neither read nor built."""
  if builder.is_prepared():
    return
  manual_dir = config.get('manual_dir')
  missing = [t for t in _IMAGENET_TARS if not (
      manual_dir and tf.io.gfile.exists(os.path.join(manual_dir, t)))]
  if missing:
    where = (f'manual_dir={manual_dir!r} lacks {", ".join(missing)}'
             if manual_dir else 'config.manual_dir is not set')
    raise error(
        f'imagenet2012 is not prepared under data_dir={config.get("data_dir")!r}'
        f' ({builder.data_dir}) and {where}, so it cannot be built either.',
        'pass --config.manual_dir=/path/with/ILSVRC2012_img_train.tar and '
        'ILSVRC2012_img_val.tar (from image-net.org), or '
        '--config.data_dir=gs://bucket/tfds where imagenet2012 is prepared')


def _check_prepared(config, builder) -> None:
  """cifar10 / mnist are read, never downloaded here (hosts may be offline)."""
  if builder.is_prepared():
    return
  raise error(
      f'{config.dataset} is not prepared under data_dir={config.get("data_dir")!r} '
      f'({builder.data_dir}).',
      f'run `tfds build {config.dataset} --data_dir=DIR` where the internet is '
      f'reachable and pass --config.data_dir=DIR (local or gs://)')


def prepare_dataset(config) -> DatasetInfo:
  """Validates `config` and makes sure the TFDS data exists, building it if not.

  `sklearn_digits` is built on first use (seconds, offline). `imagenet2012`
  is built from `config.manual_dir` if it is not prepared in
  `config.data_dir`; a missing manual dir raises ConfigError before anything
  slow happens.

  Args:
    config: the experiment ConfigDict (see module docstring of the trainer).

  Returns:
    Static facts about the dataset for building the model and schedules.
  """
  configure_tf()
  spec = validate(config)
  builder = get_builder(config)
  if config.dataset == 'imagenet2012':
    _check_imagenet_source(config, builder)
  elif config.dataset in ('cifar10', 'mnist'):
    _check_prepared(config, builder)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=config.get('manual_dir'), try_download_gcs=False))
  size = config.image_size
  return DatasetInfo(
      num_classes=spec.num_classes,
      num_train_examples=num_examples(builder, spec.train_split, spec.sizes[0]),
      num_eval_examples=num_examples(builder, spec.eval_split, spec.sizes[1]),
      image_shape=(size, size, 3))


def read_records(config, split: Any) -> tf.data.Dataset:
  """Encoded records {'image': bytes, 'label': int} of `split`, in file order."""
  # No TFDS autocache: each iterator builds a new dataset, so it would only
  # fill a cache that is thrown away (train caches decoded digits itself).
  ds = get_builder(config).as_dataset(
      split=split, shuffle_files=False,
      decoders={'image': tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(tf.autograph.experimental.do_not_convert(
      lambda ex: {'image': ex['image'], 'label': ex['label']}))


def data_options(config) -> tf.data.Options:
  """Deterministic tf.data options with a bounded thread pool, no autotuning."""
  options = tf.data.Options()
  options.deterministic = True
  # Modest by default: the host also runs the JAX program (small CPU hosts).
  threads = input_value(config, 'num_threads') or max(1, (os.cpu_count() or 2) // 2)
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  # No autotuning: deleting an iterator waits for tf.data's autotune thread, which
  # can miss the wake-up (it re-checks the cancellation before TF marks it done) and
  # sleep out its period, up to 60 s: the 30-40 s a run took to exit after 'Done'
  # (issue 31). AUTOTUNE map parallelism then stays at the pool size above.
  options.autotune.enabled = False
  return options

