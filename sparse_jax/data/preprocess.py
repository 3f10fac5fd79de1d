"""Decode / crop / resize ops (TensorFlow, stateless randomness).

Images stay float32 in [0, 255] until `normalize`, so the geometric ops can be
chained freely and rounding happens at most once (before RandAugment).
Every random op takes an explicit `seed` ([2] int tensor) so that a pipeline
is reproducible and resumable regardless of tf.data scheduling.
"""

import math

import tensorflow as tf

_INCEPTION_SCALE = (0.08, 1.0)
_INCEPTION_RATIO = (3 / 4, 4 / 3)


def resize(image: tf.Tensor, size: int, antialias: bool = False) -> tf.Tensor:
  """Bilinear resize of [..., H, W, C] images to [..., size, size, C] float32."""
  # Antialiasing is off by default, as in the standard ImageNet recipes: it
  # costs several times the plain resize on CPU.
  return tf.image.resize(image, (size, size), method='bilinear',
                         antialias=antialias)


def tensorflow_crop_box(shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """TF's Inception crop box: `stateless_sample_distorted_bounding_box` with area in
  [8%, 100%] and aspect ratio in [3/4, 4/3], 10 attempts, then the whole image.

  Its boxes are smaller on average than torchvision's (mean area 0.36 vs 0.43 of a
  375 x 500 image): it samples the area and ratio differently and fits what does not
  fit by shrinking rather than redrawing.

  Returns:
    (begin [top, left], size [height, width]) int32 of the crop.
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=whole_image, seed=seed, min_object_covered=0.0,
      aspect_ratio_range=_INCEPTION_RATIO, area_range=_INCEPTION_SCALE,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def torchvision_crop_box(shape: tf.Tensor, seed: tf.Tensor,
                         attempts: int = 10) -> tuple[tf.Tensor, tf.Tensor]:
  """torchvision's `RandomResizedCrop.get_params` box (scale (0.08, 1), ratio (3/4, 4/3)).

  Each attempt draws an area uniformly in [8%, 100%] of the image and a log-uniform
  aspect ratio w / h in [3/4, 4/3], rounds w and h to integers, and is kept if the box
  fits; its corner is then uniform over the positions where it fits. The first attempt
  that fits wins; if none of `attempts` does, the centre crop of the largest box with a
  ratio in [3/4, 4/3] (the whole image if its own ratio is in range). All attempts are
  drawn at once, as tensors, so the op has no data-dependent loop.

  Args:
    shape: [height, width, ...] int of the image.
    seed: [2] int seed.

  Returns:
    (begin [top, left], size [height, width]) int32 of the crop.
  """
  # float64, as torchvision computes the box in Python floats.
  height = tf.cast(shape[0], tf.float64)
  width = tf.cast(shape[1], tf.float64)
  area_u, ratio_u, top_u, left_u = tf.unstack(tf.random.stateless_uniform(
      [4, attempts], seed, dtype=tf.float64))
  low, high = _INCEPTION_SCALE
  area = height * width * (low + (high - low) * area_u)
  log_low, log_high = math.log(_INCEPTION_RATIO[0]), math.log(_INCEPTION_RATIO[1])
  ratio = tf.exp(log_low + (log_high - log_low) * ratio_u)
  # tf.round rounds half to even, as Python's round.
  w = tf.round(tf.sqrt(area * ratio))
  h = tf.round(tf.sqrt(area / ratio))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))  # 0 when none fits (then unused).
  # torch.randint(0, n - size + 1): uniform over the corners where the box fits.
  top = tf.floor(top_u * tf.maximum(height - h + 1, 1.0))
  left = tf.floor(left_u * tf.maximum(width - w + 1, 1.0))
  drawn = tf.stack([top[first], left[first], h[first], w[first]])
  # The fallback: the whole image, narrowed to the nearest ratio in range.
  image_ratio = width / height
  fallback_w = tf.where(image_ratio > _INCEPTION_RATIO[1],
                        tf.round(height * _INCEPTION_RATIO[1]), width)
  fallback_h = tf.where(image_ratio < _INCEPTION_RATIO[0],
                        tf.round(width / _INCEPTION_RATIO[0]), height)
  fallback = tf.stack([tf.floor((height - fallback_h) / 2),
                       tf.floor((width - fallback_w) / 2), fallback_h, fallback_w])
  box = tf.cast(tf.where(tf.reduce_any(fits), drawn, fallback), tf.int32)
  return box[:2], box[2:]


CROP_SAMPLERS = {'tensorflow': tensorflow_crop_box, 'torchvision': torchvision_crop_box}


def decode_and_random_crop(image_bytes: tf.Tensor, image_size: int,
                           seed: tf.Tensor, sampler: str = 'tensorflow') -> tf.Tensor:
  """Random-resized crop of a JPEG, decoding only the crop.

  Samples a box covering 8%..100% of the image area with aspect ratio in
  [3/4, 4/3] from the shape in the JPEG header (`sampler`: 'tensorflow' =
  `tensorflow_crop_box`, 'torchvision' = `torchvision_crop_box`), decodes just
  that window and resizes it to [image_size, image_size, 3] float32 in [0, 255].
  """
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, size = CROP_SAMPLERS[sampler](shape, seed)
  window = tf.concat([begin, size], axis=0)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  return resize(image, image_size)


def decode_and_center_crop(image_bytes: tf.Tensor, image_size: int,
                           resize_size: int) -> tf.Tensor:
  """Standard ImageNet eval crop: shorter side -> resize_size, center image_size.

  Implemented as "decode the central square of side
  min(h, w) * image_size / resize_size, then resize it to image_size", which is
  the same crop but decodes and resizes far fewer pixels.
  """
  shape = tf.image.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  side = tf.cast(
      tf.round(tf.cast(tf.minimum(height, width), tf.float32) * image_size /
               resize_size), tf.int32)
  side = tf.clip_by_value(side, 1, tf.minimum(height, width))
  top = (height - side + 1) // 2
  left = (width - side + 1) // 2
  window = tf.stack([top, left, side, side])
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  return resize(image, image_size)


def decode_digit(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes an 8x8x1 PNG digit to uint8 [8, 8, 1]."""
  return tf.ensure_shape(tf.io.decode_png(image_bytes, channels=1), (8, 8, 1))


def decode_small(image_bytes: tf.Tensor,
                 shape: tuple[int, int, int]) -> tf.Tensor:
  """Decodes a small fixed-size PNG (digits, CIFAR-10, MNIST) to uint8 `shape`."""
  return tf.ensure_shape(tf.io.decode_png(image_bytes, channels=shape[2]), shape)


def batch_crop_flip(images: tf.Tensor, pad: int, flip: bool,
                    seed: tf.Tensor) -> tf.Tensor:
  """Per-image random shift (zero pad + crop) and left-right flip of a batch.

  Both are row/column selections, done as products with one-hot matrices:
  out[b] = R[b] @ x[b] @ C[b]^T. Out-of-range indices give all-zero one-hot
  rows, which is exactly zero padding. Vectorised because per-example tf.data
  maps cost more than the whole augmentation of a tiny digit.

  Args:
    images: float [B, H, W, C] batch with a static shape.
    pad: maximum shift in pixels; the uncovered border is zero.
    flip: whether to also flip each image with probability 1/2.
    seed: [2] int seed for this batch.

  Returns:
    The augmented batch, same shape and dtype.
  """
  batch, height, width, _ = images.shape
  shift_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  shifts = tf.random.stateless_uniform(
      [batch, 2], shift_seed, minval=-pad, maxval=pad + 1, dtype=tf.int32)
  cols = tf.range(width)[None]
  if flip:  # Flipping is reading the columns backwards.
    flips = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
    cols = tf.where(flips, width - 1 - cols, cols)
  rows = tf.one_hot(shifts[:, :1] + tf.range(height)[None], height,
                    dtype=images.dtype)[:, None]  # [B, 1, H, H]
  cols = tf.one_hot(shifts[:, 1:] + cols, width,
                    dtype=images.dtype)[:, None]  # [B, 1, W, W]
  channels_first = tf.transpose(images, [0, 3, 1, 2])
  out = tf.matmul(tf.matmul(rows, channels_first), cols, transpose_b=True)
  return tf.transpose(out, [0, 2, 3, 1])


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Random horizontal flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """Maps [0, 255] to float32 [-1, 1]."""
  return tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0
