"""RandAugment (Cubuk et al., 2020) in TensorFlow with stateless randomness.

Each of `num_layers` rounds picks one op uniformly from `OPS` and applies it at
the fixed `magnitude` (0..10 scale; 10 is the strongest). Signed ops get a
random sign. Ops work on float32 [H, W, 3] images in [0, 255].
"""

import functools
import math
from typing import Callable

import tensorflow as tf

_MAX_MAGNITUDE = 10.0
_FILL = 128.0  # Gray fill for pixels that geometric ops move into view.


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """factor 0 -> other, 1 -> image, >1 extrapolates away from `other`."""
  return tf.clip_by_value(other + factor * (image - other), 0.0, 255.0)


def _gray(image: tf.Tensor) -> tf.Tensor:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
  """Applies a projective transform mapping output (x, y) to input coords."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(matrix)[None], tf.float32),
      output_shape=tf.stack([height, width]), fill_value=_FILL,
      interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def _rotate(image, m, sign):
  angle = sign * m * math.radians(30.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = (width - 1) / 2, (height - 1) / 2
  # Rotation about the image center.
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def _shear(image, shear, axis):
  matrix = [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 'x' else [
      1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0]
  return _transform(image, matrix)


def _translate(image, fraction, axis):
  size = tf.cast(tf.shape(image)[1 if axis == 'x' else 0], tf.float32)
  shift = fraction * size
  matrix = [1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 'x' else [
      1.0, 0.0, 0.0, 0.0, 1.0, shift, 0.0, 0.0]
  return _transform(image, matrix)


def _autocontrast(image, m, sign):
  del m, sign
  lo = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  hi = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.where(hi > lo, scaled, image)  # Flat channels stay as they are.


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """Histogram equalization of one uint8-valued channel (PIL's algorithm)."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(values))
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.float32)
  return tf.where(step > 0, tf.gather(lut, values), channel)


def _equalize(image, m, sign):
  del m, sign
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _posterize(image, m, sign):
  del sign
  shift = tf.cast(tf.round(m * 4.0), tf.int32)  # Keep 8 - shift bits.
  kept = tf.bitwise.left_shift(
      tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift)
  return tf.cast(kept, tf.float32)


def _enhance(target_fn: Callable[[tf.Tensor], tf.Tensor]):
  """PIL ImageEnhance-style op: blend towards/away from `target_fn(image)`."""
  def op(image, m, sign):
    return _blend(image, target_fn(image), 1.0 + sign * m * 0.9)
  return op


def _smooth(image):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'SAME')[0]
  # Like PIL, keep the border pixels unfiltered.
  mask = tf.pad(tf.ones_like(image[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  return mask * blurred + (1.0 - mask) * image


# name -> op(image, magnitude in [0, 1], random sign in {-1, 1}).
OPS: dict[str, Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]] = {
    'identity': lambda image, m, sign: image,
    'autocontrast': _autocontrast,
    'equalize': _equalize,
    'rotate': _rotate,
    'solarize': lambda image, m, sign: tf.where(
        image >= 256.0 - m * 256.0, 255.0 - image, image),
    'color': _enhance(_gray),
    'posterize': _posterize,
    'contrast': _enhance(lambda image: tf.fill(
        tf.shape(image), tf.reduce_mean(tf.image.rgb_to_grayscale(image)))),
    'brightness': _enhance(tf.zeros_like),
    'sharpness': _enhance(_smooth),
    'shear_x': lambda image, m, sign: _shear(image, sign * m * 0.3, 'x'),
    'shear_y': lambda image, m, sign: _shear(image, sign * m * 0.3, 'y'),
    'translate_x': lambda image, m, sign: _translate(image, sign * m * 0.45, 'x'),
    'translate_y': lambda image, m, sign: _translate(image, sign * m * 0.45, 'y'),
}


@tf.function(autograph=False)
def _apply_op(image: tf.Tensor, index: tf.Tensor, m: tf.Tensor,
              sign: tf.Tensor) -> tf.Tensor:
  """Applies OPS[index]. A tf.function so the 14 branches are traced once per
  image shape rather than once per layer (tracing dominates pipeline setup)."""
  out = tf.switch_case(index, [functools.partial(op, image, m, sign)
                               for op in OPS.values()])
  out = tf.clip_by_value(tf.round(out), 0.0, 255.0)
  # The geometric branches lose the static shape; later ops rely on it.
  out.set_shape(image.shape)
  return out


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float,
                seed: tf.Tensor) -> tf.Tensor:
  """Applies `num_layers` random ops at `magnitude` (0..10) to an image.

  Args:
    image: [H, W, 3] image with values in [0, 255] (any real or uint8 dtype).
    num_layers: number of ops applied in sequence.
    magnitude: op strength on RandAugment's 0..10 scale.
    seed: [2] int seed for the stateless op / sign choices.

  Returns:
    The augmented image, float32 [H, W, 3], integer values in [0, 255].
  """
  # Round first so that the integer ops (equalize, posterize) see uint8 values.
  image = tf.round(tf.cast(image, tf.float32))
  m = tf.constant(min(max(magnitude, 0.0), _MAX_MAGNITUDE) / _MAX_MAGNITUDE)
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 2))
    index = tf.random.stateless_uniform(
        [], op_seed, minval=0, maxval=len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    image = _apply_op(image, index, m, sign)
  return image
