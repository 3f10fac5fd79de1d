"""Tests of the input pipeline (sparse_jax.data), CPU only."""

import collections
import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from sparse_jax.data import images
from sparse_jax.data import mixing
from sparse_jax.data import preprocess
from sparse_jax.data import randaugment
from sparse_jax.errors import ConfigError


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """A digits config like the trainer's; `input_<key>` overrides input.<key>."""
  config = ml_collections.ConfigDict(dict(
      dataset='sklearn_digits', data_dir=str(data_dir), manual_dir=None,
      image_size=16, num_classes=10, batch_size=128, eval_batch_size=100,
      seed=0, input=dict(
          shuffle_buffer=1500, crop='pad_crop', flip=False,
          randaugment_layers=0, randaugment_magnitude=0, mixup_alpha=0.0,
          cutmix_alpha=0.0, label_smoothing=0.1, eval_resize=16)))
  for key, value in overrides.items():
    if key.startswith('input_'):
      config.input[key[len('input_'):]] = value
    else:
      config[key] = value
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def fingerprints(batches):
  """Multiset of (image bytes, label) over the real (mask 1) eval examples."""
  return collections.Counter(
      (np.round(image, 4).tobytes(), int(label))
      for batch in batches
      for image, label, mask in zip(batch['image'], batch['label'],
                                    batch['mask']) if mask == 1.0)


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  info = images.prepare_dataset(make_config(path))
  assert info == images.DatasetInfo(10, 1500, 297, (16, 16, 3))
  return path


@pytest.fixture(scope='module')
def digits_split(digits_dir):
  """{split: (uint8 images [N, 8, 8], labels [N])} read straight from TFDS."""
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  out = {}
  for split in ('train', 'test'):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    out[split] = (np.stack([e['image'][..., 0] for e in examples]),
                  np.array([e['label'] for e in examples]))
  return out


def test_digits_builder_fixed_disjoint_split(digits_dir, digits_split):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('sklearn_digits', data_dir=str(digits_dir))
  assert builder.info.splits['train'].num_examples == 1500
  assert builder.info.splits['test'].num_examples == 297
  train_x, train_y = digits_split['train']
  test_x, test_y = digits_split['test']
  assert train_x.shape == (1500, 8, 8) and test_x.shape == (297, 8, 8)
  assert train_x.dtype == np.uint8 and train_x.min() == 0
  assert train_x.max() == 255  # 16 maps to 255.
  assert set(train_y) == set(test_y) == set(range(10))
  # The split is the documented permutation: compare as multisets.
  digits = datasets.load_digits()
  raw = np.round(digits.images * 255 / 16).astype(np.uint8)
  order = np.random.RandomState(0).permutation(1797)
  key = lambda xs, ys: collections.Counter(
      (x.tobytes(), int(y)) for x, y in zip(xs, ys))
  assert key(test_x, test_y) == key(raw[order[:297]], digits.target[order[:297]])
  assert key(train_x, train_y) == key(raw[order[297:]],
                                      digits.target[order[297:]])


def test_train_batches_shapes_ranges_and_label_smoothing(digits_dir):
  batch = next(images.train_iterator(make_config(digits_dir)))
  assert batch['image'].shape == (128, 16, 16, 3)
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['image'].min() == -1.0 and batch['image'].max() > 0.9
  labels = batch['label']
  assert labels.shape == (128, 10) and labels.dtype == np.float32
  np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(labels.max(-1), 0.9 + 0.01, rtol=1e-6)
  assert np.all((np.isclose(labels, 0.01)) | np.isclose(labels, 0.91))
  assert np.all((labels > 0.5).sum(-1) == 1)


@pytest.fixture(scope='module')
def plain_batch(digits_dir):
  """First batch without augmentation or label smoothing."""
  config = make_config(digits_dir, input_crop='none', input_label_smoothing=0.0)
  return next(images.train_iterator(config))


def test_train_images_are_the_labelled_digits(plain_batch, digits_split):
  train_x, train_y = digits_split['train']
  expected = preprocess.resize(
      tf.constant(train_x[..., None], tf.float32), 16).numpy()
  expected = expected[..., 0] * (2 / 255) - 1
  for image, label in zip(plain_batch['image'], plain_batch['label']):
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    distance = np.abs(expected - image[None, ..., 0]).max(axis=(1, 2))
    assert distance.min() < 1e-5
    assert train_y[distance < 1e-5][0] == label.argmax()


def augmented_config(digits_dir, **overrides):
  return make_config(digits_dir, input_flip=True, input_mixup_alpha=0.2,
                     input_cutmix_alpha=1.0, **overrides)


@pytest.fixture(scope='module')
def augmented_run(digits_dir):
  """First 13 batches of an uninterrupted run; crosses an epoch (1500 / 128)."""
  return take(images.train_iterator(augmented_config(digits_dir)), 13)


def test_train_applies_both_mixup_and_cutmix(augmented_run):
  kinds = set()
  for batch in augmented_run:
    np.testing.assert_allclose(batch['label'].sum(-1), 1.0, rtol=1e-5)
    top = (batch['label'].max(-1) - 0.01) / 0.9  # max(lam, 1 - lam), 0.1 LS.
    mixed = top[top < 1 - 1e-4]
    if mixed.size:
      # CutMix's lam is a pixel count / 256; mixup's is continuous.
      pixels = mixed[0] * 256
      kinds.add('cutmix' if abs(pixels - round(pixels)) < 1e-3 else 'mixup')
  assert kinds == {'cutmix', 'mixup'}


def test_train_is_deterministic_and_seed_dependent(digits_dir, augmented_run):
  again = take(images.train_iterator(augmented_config(digits_dir)), 2)
  other = take(images.train_iterator(augmented_config(digits_dir, seed=1)), 2)
  for x, y, z in zip(augmented_run, again, other):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
    assert not np.array_equal(x['image'], z['image'])
  assert not np.array_equal(augmented_run[0]['image'],
                            augmented_run[1]['image'])


def test_resume_matches_uninterrupted_run(digits_dir, augmented_run):
  # Step 12 starts 36 examples into the second epoch: exercises both the free
  # whole-epoch skip and the in-epoch record skip.
  resumed = next(images.train_iterator(augmented_config(digits_dir),
                                       start_step=12))
  np.testing.assert_array_equal(resumed['image'], augmented_run[12]['image'])
  np.testing.assert_array_equal(resumed['label'], augmented_run[12]['label'])


def test_randaugment_in_digits_pipeline(digits_dir, plain_batch):
  config = make_config(digits_dir, batch_size=16, input_crop='none',
                       input_label_smoothing=0.0, input_randaugment_layers=2,
                       input_randaugment_magnitude=9)
  batch = next(images.train_iterator(config))
  assert batch['image'].shape == (16, 16, 16, 3)
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  # The example order does not depend on the batch size: same digits as the
  # first 16 of the un-augmented batch, mostly changed by RandAugment. (Its
  # seeds come from the same per-batch key as the crops, whose determinism
  # and resumability the tests above check.)
  np.testing.assert_array_equal(batch['label'], plain_batch['label'][:16])
  changed = np.abs(batch['image'] - plain_batch['image'][:16]).max((1, 2, 3))
  assert np.mean(changed > 0.01) > 0.5


def test_train_process_shards(digits_dir):
  config = make_config(digits_dir, input_crop='none')
  shards = [next(images.train_iterator(config, process_index=i,
                                       process_count=2)) for i in range(2)]
  for shard in shards:
    assert shard['image'].shape == (64, 16, 16, 3)
  # Different halves of the data, not the same examples twice.
  flat = [s['image'].reshape(64, -1) for s in shards]
  assert not np.any(np.all(flat[0][:, None] == flat[1][None], axis=-1))


@pytest.fixture(scope='module')
def eval_batches(digits_dir):
  return list(images.eval_iterator(make_config(digits_dir)))


def test_eval_covers_test_split_once(digits_dir, eval_batches, digits_split):
  assert len(eval_batches) == 3
  for batch in eval_batches:
    assert batch['image'].shape == (100, 16, 16, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in eval_batches])
  np.testing.assert_array_equal(mask, [1.0] * 297 + [0.0] * 3)
  assert np.all(eval_batches[-1]['image'][97:] == 0)
  test_x, test_y = digits_split['test']
  expected = preprocess.resize(
      tf.constant(test_x[..., None], tf.float32), 16).numpy()
  expected = np.repeat(expected * (2 / 255) - 1, 3, axis=-1)
  assert fingerprints(eval_batches) == fingerprints(
      [{'image': expected, 'label': test_y, 'mask': np.ones(297)}])
  # Deterministic order.
  again = next(images.eval_iterator(make_config(digits_dir)))
  np.testing.assert_array_equal(again['image'], eval_batches[0]['image'])
  np.testing.assert_array_equal(again['label'], eval_batches[0]['label'])


def test_eval_process_shards_are_disjoint_and_cover(digits_dir, eval_batches):
  config = make_config(digits_dir)
  whole = fingerprints(eval_batches)
  shards = [list(images.eval_iterator(config, process_index=i,
                                      process_count=2)) for i in range(2)]
  # Same number of full-size batches on every process.
  assert [len(s) for s in shards] == [3, 3]
  assert all(b['image'].shape[0] == 50 for s in shards for b in s)
  masks = [np.concatenate([b['mask'] for b in s]) for s in shards]
  np.testing.assert_array_equal(masks[0], [1.0] * 149 + [0.0])
  np.testing.assert_array_equal(masks[1], [1.0] * 148 + [0.0] * 2)
  parts = [fingerprints(s) for s in shards]
  assert parts[0] + parts[1] == whole
  assert sum(whole.values()) == 297


def test_config_errors(digits_dir, tmp_path):
  with pytest.raises(ConfigError, match='svhn'):
    images.prepare_dataset(make_config(digits_dir, dataset='svhn'))
  with pytest.raises(ConfigError, match='num_classes'):
    images.prepare_dataset(make_config(digits_dir, num_classes=1000))
  with pytest.raises(ConfigError, match='batch_size'):
    next(images.train_iterator(make_config(digits_dir, batch_size=3),
                               process_count=2))
  for manual_dir in (None, str(tmp_path / 'nothing_here')):
    config = make_config(tmp_path / 'empty', dataset='imagenet2012',
                         num_classes=1000, image_size=224,
                         manual_dir=manual_dir, input_crop='inception')
    with pytest.raises(ConfigError) as error:
      images.prepare_dataset(config)
    lines = str(error.value).splitlines()
    assert len(lines) >= 2 and lines[-1].startswith('Fix:')
    assert 'ILSVRC2012_img_train.tar' in lines[-1]


@pytest.mark.parametrize('official', [False, True])
def test_imagenet_pipeline_on_mock_data(tmp_path, official):
  """The JPEG path, also with the official ViT recipe's inputs (torchvision RandAugment
  scale and crop boxes, repeated augmentation x3, hard mixed targets smoothed by 0.11)."""
  recipe = dict(input_randaugment_scale='torchvision', input_repeated_augmentation=3,
                input_mix_targets='hard', input_label_smoothing=0.11,
                input_crop_sampler='torchvision') if official else {}
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  for name in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'):
    (manual_dir / name).touch()
  config = make_config(
      tmp_path / 'tfds', dataset='imagenet2012', num_classes=1000,
      image_size=224, batch_size=4, eval_batch_size=4,
      manual_dir=str(manual_dir), input_crop='inception', input_flip=True,
      input_randaugment_layers=2, input_randaugment_magnitude=9,
      input_mixup_alpha=0.2, input_cutmix_alpha=1.0, input_eval_resize=256,
      input_shuffle_buffer=16, **recipe)
  # With SkipDecoding, mock_data serves real (random) JPEGs of 5..50 px.
  with tfds.testing.mock_data(num_examples=6):
    info = images.prepare_dataset(config)
    assert info.num_classes == 1000 and info.image_shape == (224, 224, 3)
    train = take(images.train_iterator(config), 2)
    evals = list(images.eval_iterator(config))
  for batch in train:
    assert batch['image'].shape == (4, 224, 224, 3)
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['label'].shape == (4, 1000)
    np.testing.assert_allclose(batch['label'].sum(-1), 1.0, rtol=1e-5)
    if official:  # One class per example, smoothed.
      np.testing.assert_allclose(batch['label'].max(-1), 0.89 + 0.11 / 1000, rtol=1e-5)
  assert len(evals) == 2
  assert evals[0]['image'].shape == (4, 224, 224, 3)
  np.testing.assert_array_equal(
      np.concatenate([b['mask'] for b in evals]), [1] * 6 + [0] * 2)
  assert np.all(evals[-1]['image'][2:] == 0)


def _jpeg(image: np.ndarray) -> tf.Tensor:
  return tf.io.encode_jpeg(tf.constant(image, tf.uint8), quality=100)


def test_decode_and_center_crop_picks_the_center():
  # 100 x 160 black image with a white 50 x 50 square in the middle.
  image = np.zeros((100, 160, 3), np.uint8)
  image[25:75, 55:105] = 255
  # Shorter side 100 -> 200, center 100 of that = the middle 50 x 50 source.
  out = preprocess.decode_and_center_crop(_jpeg(image), 100, 200).numpy()
  assert out.shape == (100, 100, 3) and out.dtype == np.float32
  assert out[5:-5, 5:-5].min() > 240
  # 224-of-256 crop of the whole image: white middle, black border.
  out = preprocess.decode_and_center_crop(_jpeg(image), 64, 73).numpy()
  assert out[24:40, 24:40].min() > 240 and out[:, :4].max() < 15


def test_decode_and_random_crop():
  image = np.random.RandomState(0).randint(0, 256, (60, 80, 3)).astype(np.uint8)
  crops = [preprocess.decode_and_random_crop(
      _jpeg(image), 32, tf.constant([s, 0])).numpy() for s in range(4)]
  for crop in crops:
    assert crop.shape == (32, 32, 3) and crop.dtype == np.float32
    assert crop.min() >= 0 and crop.max() <= 255
  again = preprocess.decode_and_random_crop(_jpeg(image), 32, tf.constant([0, 0]))
  np.testing.assert_array_equal(crops[0], again.numpy())
  assert not np.array_equal(crops[0], crops[1])


def _crop_boxes(sampler, height, width, n=20_000):
  """[n, 4] (top, left, height, width) boxes that `sampler` draws for n seeds."""
  shape = tf.constant([height, width, 3], tf.int32)
  box = lambda i: tf.concat(sampler(shape, tf.stack([i, tf.constant(7, tf.int64)])), 0)
  return next(iter(tf.data.Dataset.range(n).map(box).batch(n))).numpy()


def _torchvision_crop_moments(height, width, grid=1500):
  """E[box area / image area] and E[log(w / h)] of torchvision's RandomResizedCrop
  (scale (0.08, 1), ratio (3/4, 4/3), 10 tries, then the centre fallback), integrated
  on a grid of (area, log ratio), ignoring the rounding of w and h."""
  area = np.linspace(0.08, 1, 2 * grid + 1)[1::2]
  log_ratio = np.linspace(np.log(3 / 4), np.log(4 / 3), 2 * grid + 1)[1::2]
  area, log_ratio = np.meshgrid(area, log_ratio)
  pixels = height * width * area
  fits = ((np.sqrt(pixels * np.exp(log_ratio)) <= width) &
          (np.sqrt(pixels / np.exp(log_ratio)) <= height))
  none_fit = (1 - fits.mean())**10
  w = round(height * 4 / 3) if width / height > 4 / 3 else width
  h = round(width * 4 / 3) if width / height < 3 / 4 else height
  mean = lambda x: (1 - none_fit) * x[fits].mean()
  return (mean(area) + none_fit * w * h / (height * width),
          mean(log_ratio) + none_fit * np.log(w / h))


@pytest.mark.parametrize('height,width', [(375, 500), (256, 341), (500, 333)])
def test_torchvision_crop_box_has_torchvision_distribution(height, width):
  """20,000 boxes: mean area and mean log aspect ratio as the formula (standard errors
  0.0015 and 0.0012); TF's sampler's boxes are smaller (0.32-0.37 of the image vs
  0.39-0.43) and, on portrait images, of the wrong mean ratio."""
  boxes = _crop_boxes(preprocess.torchvision_crop_box, height, width)
  top, left, h, w = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
  assert np.all((top + h <= height) & (left + w <= width))
  area, log_ratio = _torchvision_crop_moments(height, width)
  assert abs(np.mean(h * w) / (height * width) - area) < 0.006
  assert abs(np.mean(np.log(w / h)) - log_ratio) < 0.005
  assert np.all(np.abs(np.log(w / h)) <= np.log(4 / 3) + 0.02)  # Up to rounding.
  # The corner is uniform where the box fits: on average in the middle.
  free = h < height
  assert abs(np.mean(top[free] / (height - h[free])) - 0.5) < 0.02
  old = _crop_boxes(preprocess.tensorflow_crop_box, height, width)
  assert np.mean(old[:, 2] * old[:, 3]) / (height * width) < area - 0.05


def test_torchvision_crop_box_falls_back_to_the_centre():
  """No box of >= 8% of a 10 x 1000 strip has h <= 10 within the ratios: the centre
  crop of ratio 4/3 (torchvision's fallback), and its transpose for a tall strip."""
  np.testing.assert_array_equal(
      np.unique(_crop_boxes(preprocess.torchvision_crop_box, 10, 1000, 50), axis=0),
      [[0, 493, 10, 13]])
  np.testing.assert_array_equal(
      np.unique(_crop_boxes(preprocess.torchvision_crop_box, 1000, 10, 50), axis=0),
      [[493, 0, 13, 10]])


def test_imagenet_crop_sampler_key(monkeypatch):
  """input.crop_sampler picks the box sampler of the JPEG path."""
  image = np.random.RandomState(0).randint(0, 256, (60, 80, 3)).astype(np.uint8)
  used = []

  def spy(name):
    sampler = preprocess.CROP_SAMPLERS[name]

    def box(*args):
      used.append(name)
      return sampler(*args)
    return box

  for name in ('tensorflow', 'torchvision'):
    monkeypatch.setitem(preprocess.CROP_SAMPLERS, name, spy(name))
  config = make_config('', image_size=32, input_crop='inception')
  for name in ('tensorflow', 'torchvision'):
    config.input.crop_sampler = name
    crop = images._augment_example(config, None, tf.constant([0, 1], tf.int64),
                                   _jpeg(image))
    assert crop.shape == (32, 32, 3)
  assert used == ['tensorflow', 'torchvision']


def _test_image() -> tf.Tensor:
  """Colourful, textured, not full-range: every op must change it."""
  rng = np.random.RandomState(0)
  y, x = np.mgrid[0:32, 0:32]
  base = np.stack([40 + 4 * x, 40 + 4 * y, 100 + 2 * (x - y)], -1)
  return tf.constant(np.clip(base + rng.randint(-9, 10, base.shape), 40, 200),
                     tf.float32)


@pytest.mark.parametrize('name', sorted(set(randaugment.OPS) - {'identity'}))
def test_randaugment_op_changes_image(name):
  image = _test_image()
  for sign in (-1.0, 1.0):
    out = randaugment.OPS[name](image, tf.constant(0.9), tf.constant(sign))
    assert out.shape == image.shape and out.dtype == tf.float32
    assert tf.reduce_min(out) >= 0 and tf.reduce_max(out) <= 255
    assert tf.reduce_max(tf.abs(out - image)) > 1.0, (name, sign)


def test_randaugment_keeps_shape_dtype_range_and_changes_image():
  image = tf.cast(_test_image(), tf.uint8)
  outs = [randaugment.randaugment(image, 2, 9, tf.constant([s, 1]))
          for s in range(6)]
  for out in outs:
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    assert tf.reduce_min(out) >= 0 and tf.reduce_max(out) <= 255
    np.testing.assert_array_equal(out, tf.round(out))
  assert sum(not np.array_equal(o, tf.cast(image, tf.float32)) for o in outs) >= 5
  unchanged = randaugment.randaugment(image, 2, 0, tf.constant([0, 1]))
  assert tf.reduce_max(tf.abs(unchanged - tf.cast(image, tf.float32))) <= 1


def _two_class_batch():
  images_ = tf.constant([-1.0, -1.0, 1.0, 1.0])[:, None, None, None] * tf.ones(
      (4, 8, 8, 3))
  return images_, tf.one_hot([0, 1, 2, 3], 4)


def test_mixup_mixes_images_and_labels():
  images_, labels = _two_class_batch()
  out, out_labels = mixing.mix_batch(images_, labels, mixup_alpha=1.0,
                                     cutmix_alpha=0.0, seed=tf.constant([0, 3]))
  np.testing.assert_allclose(tf.reduce_sum(out_labels, -1), 1.0, rtol=1e-6)
  value = out[0, 0, 0, 0].numpy()  # lam * (-1) + (1 - lam) * 1.
  assert -1.0 < value < 1.0
  np.testing.assert_allclose(out[0], value, rtol=1e-6)
  lam = (1 - value) / 2
  np.testing.assert_allclose(out_labels[0], [lam, 0, 0, 1 - lam], atol=1e-6)


def test_cutmix_labels_match_pasted_area():
  images_, labels = _two_class_batch()
  mixed_any = False
  for seed in range(8):
    out, out_labels = mixing.mix_batch(
        images_, labels, mixup_alpha=0.0, cutmix_alpha=1.0,
        seed=tf.constant([seed, 0]))
    np.testing.assert_allclose(tf.reduce_sum(out_labels, -1), 1.0, rtol=1e-6)
    own = float(tf.reduce_mean(tf.cast(out[0] == -1.0, tf.float32)))
    np.testing.assert_allclose(out_labels[0, 0], own, atol=1e-6)
    np.testing.assert_allclose(out_labels[0, 3], 1 - own, atol=1e-6)
    mixed_any |= 0 < own < 1
  assert mixed_any


@pytest.mark.parametrize('name,channels', [('cifar10', 3), ('mnist', 1)])
def test_validation_datasets_on_mock_data(tmp_path, monkeypatch, name, channels):
  """cifar10 / mnist: read from a prepared data_dir, never downloaded; small-image path
  (decoded once, pad-crop + flip per batch, grey -> 3 channels)."""
  config = make_config(tmp_path / 'tfds', dataset=name, image_size=32,
                       batch_size=4, eval_batch_size=4, input_flip=True,
                       input_shuffle_buffer=16, input_label_smoothing=0.0)
  with pytest.raises(ConfigError) as error:  # Not prepared there: no download.
    images.prepare_dataset(config)
  assert f'tfds build {name}' in str(error.value).splitlines()[-1]
  # As if `tfds build` had run in data_dir; mock_data serves random PNGs of the real
  # shapes (32 x 32 x 3, 28 x 28 x 1).
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(num_examples=6):
    info = images.prepare_dataset(config)
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    train = take(images.train_iterator(config), 3)
    evals = list(images.eval_iterator(config))
  for batch in train:
    assert batch['image'].shape == (4, 32, 32, 3)
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    np.testing.assert_allclose(batch['label'].sum(-1), 1.0, rtol=1e-5)
    if channels == 1:  # Grey: the three channels are equal.
      np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
    else:
      assert np.any(batch['image'][..., 0] != batch['image'][..., 2])
  assert len(evals) == 2 and evals[0]['image'].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(
      np.concatenate([b['mask'] for b in evals]), [1] * 6 + [0] * 2)


# ------------------------------------------- official ViT recipe (issue 19) --

def _pil_reference_image():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  y, x = np.mgrid[0:64, 0:64]
  image = np.stack([40 + 3 * x, 40 + 3 * y, 100 + 2 * (x - y)], -1)
  image = np.clip(image + rng.randint(-9, 10, image.shape), 0, 255).astype(np.uint8)
  return image, Image.fromarray(image)


def test_torchvision_scale_matches_pil_ops_at_magnitude_9():
  """torchvision's RandAugment(magnitude=9, num_magnitude_bins=31) runs PIL ops at
  9/30 of each range; the 'torchvision' scale must produce the same images."""
  from PIL import Image, ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top
  image, pil = _pil_reference_image()

  def ours(name, sign=1.0, scale='torchvision'):
    return randaugment.apply_op(tf.constant(image), name, 9, sign, scale).numpy()

  inner = (slice(16, 48), slice(16, 48))  # Rotations differ at the filled corners.

  def rotation_error(out, degrees):
    ref = np.asarray(pil.rotate(degrees, resample=Image.BILINEAR), np.float32)
    return np.abs(out[inner] - ref[inner]).mean()

  # Rotation by +-9 degrees (big_vision's magnitude 9 of 10: 27 degrees).
  assert rotation_error(ours('rotate'), 9) < 1.5
  assert rotation_error(ours('rotate', -1.0), -9) < 1.5
  assert rotation_error(ours('rotate'), 27) > 5
  assert rotation_error(ours('rotate', scale='big_vision'), 27) < 1.5
  np.testing.assert_array_equal(ours('rotate')[0, 0], [0, 0, 0])  # Black fill.
  # Solarize above 178.5, posterize to 7 bits: exactly PIL's.
  np.testing.assert_array_equal(ours('solarize'), ImageOps.solarize(pil, 178.5))
  np.testing.assert_array_equal(ours('posterize'), ImageOps.posterize(pil, 7))
  # Enhance factors 1 +- 0.27 (up to rounding).
  for name, enhancer in (('brightness', ImageEnhance.Brightness),
                         ('color', ImageEnhance.Color)):
    for sign in (1.0, -1.0):
      ref = np.asarray(enhancer(pil).enhance(1 + 0.27 * sign), np.float32)
      assert np.abs(ours(name, sign) - ref).max() <= 1, (name, sign)
  # Translation by int(0.3 * 150/331 * 64) = 8 whole pixels.
  ref = pil.transform(pil.size, Image.AFFINE, (1, 0, 8, 0, 1, 0), resample=Image.BILINEAR)
  np.testing.assert_array_equal(ours('translate_x'), ref)


def test_torchvision_scale_in_pipeline(digits_dir, plain_batch):
  config = make_config(digits_dir, batch_size=16, input_crop='none',
                       input_label_smoothing=0.0, input_randaugment_layers=2,
                       input_randaugment_magnitude=9,
                       input_randaugment_scale='torchvision')
  batch = next(images.train_iterator(config))
  big_vision = next(images.train_iterator(make_config(
      digits_dir, batch_size=16, input_crop='none', input_label_smoothing=0.0,
      input_randaugment_layers=2, input_randaugment_magnitude=9)))
  np.testing.assert_array_equal(batch['label'], plain_batch['label'][:16])
  # Same op choices, a third of the strength: mostly changed, but less.
  change = lambda b: np.abs(b['image'] - plain_batch['image'][:16]).mean()
  assert 0 < change(batch) < change(big_vision)


def mixed_config(digits_dir, mix_targets):
  return make_config(digits_dir, batch_size=64, input_crop='none',
                     input_mixup_alpha=0.2, input_cutmix_alpha=1.0,
                     input_label_smoothing=0.11, input_mix_targets=mix_targets)


def test_hard_mix_targets_are_one_hot_before_smoothing(digits_dir):
  hard = take(images.train_iterator(mixed_config(digits_dir, 'hard')), 4)
  soft = take(images.train_iterator(mixed_config(digits_dir, 'soft')), 4)
  plain = take(images.train_iterator(make_config(
      digits_dir, batch_size=64, input_crop='none')), 4)
  low, high = 0.11 / 10, 1 - 0.11 + 0.11 / 10
  for h, s, p in zip(hard, soft, plain):
    np.testing.assert_array_equal(h['image'], s['image'])  # The same mixing.
    labels = h['label']
    assert np.all(np.isclose(labels, low) | np.isclose(labels, high))
    assert np.all(np.isclose(labels, high).sum(-1) == 1)
    # The class with the larger share of the mixed (soft) target.
    np.testing.assert_array_equal(labels.argmax(-1), s['label'].argmax(-1))
  # The images are mixed, and the soft targets hold two classes where they are.
  assert any(np.abs(h['image'] - p['image']).max() > 0.1 for h, p in zip(hard, plain))
  two_classes = [(s['label'] > 0.05).sum(-1) == 2 for s in soft]
  assert np.mean(np.concatenate(two_classes)) > 0.3


def repeated_config(digits_dir, **overrides):
  return make_config(digits_dir, batch_size=96, eval_batch_size=96,
                     input_repeated_augmentation=3,
                     input_label_smoothing=0.0, **overrides)


def _epochs(config, process_count, epochs=1):
  """[{process: batches}] of the first `epochs` repeated-augmentation epochs (15
  steps each)."""
  runs = {p: take(images.train_iterator(config, process_index=p,
                                        process_count=process_count), 15 * epochs)
          for p in range(process_count)}
  return [{p: batches[15 * e:15 * (e + 1)] for p, batches in runs.items()}
          for e in range(epochs)]


def _positions(epoch):
  """{image bytes: [(process, step, index in the local batch)]}."""
  seen = collections.defaultdict(list)
  for p, batches in epoch.items():
    for step, batch in enumerate(batches):
      for i, image in enumerate(batch['image']):
        seen[image.tobytes()].append((p, step, i))
  return seen


@pytest.mark.parametrize('process_count', [1, 3])
def test_repeated_augmentation_epoch(digits_dir, process_count):
  """An epoch of 1500 // 96 = 15 steps reads 480 digits, 3 times each: on 3
  processes each copy on its own process; on one, >= 96 / 3 positions apart, so on
  different devices of a batch split over 3 or more."""
  plain, second = _epochs(repeated_config(digits_dir, input_crop='none'),
                          process_count, epochs=2)
  seen = _positions(plain)
  assert len(seen) == 15 * 96 // 3
  assert all(len(where) == 3 for where in seen.values())
  local = 96 // process_count
  for where in seen.values():
    if process_count == 3:
      assert len({p for p, _, _ in where}) == 3
    elif len({step for _, step, _ in where}) == 1:
      devices = {i // (local // 3) for _, _, i in where}
      assert len(devices) == 3
  # Each copy has its own augmentation: same positions with crops and flips on.
  augmented, = _epochs(repeated_config(digits_dir, input_flip=True), process_count)
  distinct = 0
  for where in seen.values():
    copies = {augmented[p][s]['image'][i].tobytes() for p, s, i in where}
    distinct += len(copies) > 1
  assert distinct > 0.9 * len(seen)
  # The next epoch draws another third of the images.
  assert len(_positions(second).keys() - seen.keys()) > 200


def _drawn_indices(epoch, train_images):
  """{train index: copies} of one epoch of 8 x 8 digits (image_size 8, no crop: the
  pipeline's image is the stored digit, scaled to [-1, 1])."""
  index = {}
  for i, image in enumerate(train_images):
    index.setdefault(image.tobytes(), i)  # A duplicate digit counts as its first.
  counts = collections.Counter()
  for key, where in _positions(epoch).items():
    image = np.frombuffer(key, np.float32).reshape(8, 8, 3)[..., 0]
    digit = np.round((image + 1) * 127.5).astype(np.uint8)
    counts[index[digit.tobytes()]] += len(where)
  return counts


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_repeated_augmentation_draws_from_the_whole_split(digits_dir, digits_split,
                                                          process_count):
  """A shuffle buffer of 16 for a split of 1500 (ImageNet: 250,000 for 1,281,167):
  each epoch still draws a random third of the whole split, a new one every epoch, so
  six epochs cover 1 - (2/3)^6 = 91% of it, evenly; a buffer alone would only ever
  reach the first ~500 records of each shard."""
  config = repeated_config(digits_dir, image_size=8, input_crop='none',
                           input_shuffle_buffer=16)
  train_images = digits_split['train'][0]
  epochs = [_drawn_indices(e, train_images)
            for e in _epochs(config, process_count, epochs=6)]
  total = collections.Counter()
  for epoch in epochs:
    assert sum(epoch.values()) == 15 * 96  # 480 images, 3 copies each.
    assert set(epoch.values()) <= {3, 6}  # 6: a digit that is stored twice.
    # From the whole split, not a prefix: drawn indices reach its end and average
    # to its middle.
    assert max(epoch) > 1400 and abs(np.mean(list(epoch)) - 750) < 75
    total.update(epoch)
  # A new draw each epoch: two epochs share about a third of their images.
  assert len(epochs[0].keys() & epochs[1].keys()) < 240
  covered = len(total) / len({image.tobytes() for image in train_images})
  assert covered > 0.85
  # Evenly: each tenth of the split gets a tenth of the 6 * 1440 copies.
  per_tenth = np.bincount(np.array(list(total.elements())) // 150, minlength=10)
  assert np.all(np.abs(per_tenth - 864) < 150), per_tenth
  # The copies of an image land on different processes, or on different devices of
  # a batch split over 3 (local positions >= a third of the batch apart).
  for epoch in _epochs(config, process_count):
    for where in _positions(epoch).values():
      if len(where) != 3:
        continue  # A duplicate digit.
      if process_count >= 3:
        assert len({p for p, _, _ in where}) == 3
      by_process = collections.defaultdict(list)
      for p, step, i in where:
        by_process[p, step].append(i // (96 // process_count // 3))
      assert all(len(set(groups)) == len(groups) for groups in by_process.values())


def test_repeated_augmentation_resumes_exactly(digits_dir):
  config = repeated_config(digits_dir, input_flip=True, input_mixup_alpha=0.2)
  run = take(images.train_iterator(config, process_index=1, process_count=2), 18)
  for step in (7, 16):  # Inside the first epoch; inside the second.
    resumed = next(images.train_iterator(config, start_step=step, process_index=1,
                                         process_count=2))
    np.testing.assert_array_equal(resumed['image'], run[step]['image'])
    np.testing.assert_array_equal(resumed['label'], run[step]['label'])


def test_spread_copies_is_a_strided_permutation():
  order = images.spread_copies(10, 3).numpy()
  np.testing.assert_array_equal(order, [0, 3, 6, 9, 1, 4, 7, 2, 5, 8])


def test_repeated_augmentation_needs_one_batch_per_epoch(digits_dir):
  config = make_config(digits_dir, batch_size=1536, input_repeated_augmentation=3)
  with pytest.raises(ConfigError) as error:
    images.train_iterator(config)
  lines = str(error.value).splitlines()
  assert len(lines) == 2 and '1500 training examples' in lines[0]
  assert lines[1].startswith('Fix:')
