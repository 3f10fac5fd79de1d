"""RandAugment (Cubuk et al., 2020) in TensorFlow with stateless randomness.

Each of `num_layers` rounds picks one op uniformly from `OPS` and applies it at
the fixed `magnitude`; signed ops get a random sign. Ops work on float32
[H, W, 3] images in [0, 255]. How a magnitude maps to each op's strength is a
`Scale` (`SCALES`):

* 'big_vision': magnitude of 10 (big_vision / timm): 9 is 9/10 of each op's
  range, e.g. rotation up to 27 degrees; gray (128) fill.
* 'torchvision': magnitude of 30, as torchvision's
  `RandAugment(num_magnitude_bins=31)` (the official ViT recipe of Peng et
  al.): 9 is 9/30 of each range, e.g. rotation up to 9 degrees, solarize
  threshold 178.5, enhance factors 1 +- 0.27, translation by whole pixels up
  to 150/331 of the side; black (0) fill, as torchvision's default.
"""

import dataclasses
import functools
import math
from typing import Callable

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Scale:
  """How RandAugment's magnitude maps to op strengths.

  Attributes:
    max_magnitude: the magnitude of full strength (m = magnitude / max_magnitude).
    translate: largest translation, as a fraction of the image side.
    whole_pixel_translate: round translations toward zero to whole pixels.
    solarize_top: solarize inverts pixels >= solarize_top * (1 - m).
    fill: value of the pixels that geometric ops move into view.
  """
  max_magnitude: float
  translate: float
  whole_pixel_translate: bool
  solarize_top: float
  fill: float


SCALES = {
    'big_vision': Scale(10.0, 0.45, False, 256.0, 128.0),
    # torchvision.transforms.RandAugment: linspace(0, max, 31)[magnitude] per op.
    'torchvision': Scale(30.0, 150.0 / 331.0, True, 255.0, 0.0),
}
_DEFAULT = SCALES['big_vision']


def _blend(image: tf.Tensor, other: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """factor 0 -> other, 1 -> image, >1 extrapolates away from `other`."""
  return tf.clip_by_value(other + factor * (image - other), 0.0, 255.0)


def _gray(image: tf.Tensor) -> tf.Tensor:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _transform(image: tf.Tensor, matrix: list, fill: float) -> tf.Tensor:
  """Applies a projective transform mapping output (x, y) to input coords."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(matrix)[None], tf.float32),
      output_shape=tf.stack([height, width]), fill_value=fill,
      interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def _rotate(image, m, sign, scale=_DEFAULT):
  angle = sign * m * math.radians(30.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = (width - 1) / 2, (height - 1) / 2
  # Rotation about the image center.
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0], scale.fill)


def _shear(axis):
  def op(image, m, sign, scale=_DEFAULT):
    shear = sign * m * 0.3
    matrix = [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 'x' else [
        1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0]
    return _transform(image, matrix, scale.fill)
  return op


def _translate(axis):
  def op(image, m, sign, scale=_DEFAULT):
    size = tf.cast(tf.shape(image)[1 if axis == 'x' else 0], tf.float32)
    shift = m * scale.translate * size
    if scale.whole_pixel_translate:  # torchvision passes int(shift) pixels.
      shift = tf.floor(shift)
    shift = sign * shift
    matrix = [1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 'x' else [
        1.0, 0.0, 0.0, 0.0, 1.0, shift, 0.0, 0.0]
    return _transform(image, matrix, scale.fill)
  return op


def _solarize(image, m, sign, scale=_DEFAULT):
  del sign
  return tf.where(image >= scale.solarize_top * (1.0 - m), 255.0 - image, image)


def _autocontrast(image, m, sign, scale=_DEFAULT):
  del m, sign, scale
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


def _equalize(image, m, sign, scale=_DEFAULT):
  del m, sign, scale
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _posterize(image, m, sign, scale=_DEFAULT):
  del sign, scale
  shift = tf.cast(tf.round(m * 4.0), tf.int32)  # Keep 8 - shift bits.
  kept = tf.bitwise.left_shift(
      tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift)
  return tf.cast(kept, tf.float32)


def _enhance(target_fn: Callable[[tf.Tensor], tf.Tensor]):
  """PIL ImageEnhance-style op: blend towards/away from `target_fn(image)`."""
  def op(image, m, sign, scale=_DEFAULT):
    del scale
    return _blend(image, target_fn(image), 1.0 + sign * m * 0.9)
  return op


def _smooth(image):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'SAME')[0]
  # Like PIL, keep the border pixels unfiltered.
  mask = tf.pad(tf.ones_like(image[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  return mask * blurred + (1.0 - mask) * image


# name -> op(image, m = magnitude / scale.max_magnitude in [0, 1], random sign in
# {-1, 1}, scale = SCALES['big_vision']).
OPS: dict[str, Callable[..., tf.Tensor]] = {
    'identity': lambda image, m, sign, scale=_DEFAULT: image,
    'autocontrast': _autocontrast,
    'equalize': _equalize,
    'rotate': _rotate,
    'solarize': _solarize,
    'color': _enhance(_gray),
    'posterize': _posterize,
    'contrast': _enhance(lambda image: tf.fill(
        tf.shape(image), tf.reduce_mean(tf.image.rgb_to_grayscale(image)))),
    'brightness': _enhance(tf.zeros_like),
    'sharpness': _enhance(_smooth),
    'shear_x': _shear('x'),
    'shear_y': _shear('y'),
    'translate_x': _translate('x'),
    'translate_y': _translate('y'),
}


def apply_op(image: tf.Tensor, name: str, magnitude: float, sign: float = 1.0,
             scale: str = 'big_vision') -> tf.Tensor:
  """OPS[name] at RandAugment `magnitude` on `scale` (a key of SCALES) and `sign`,
  rounded to integers in [0, 255] as `randaugment` leaves it."""
  s = SCALES[scale]
  m = tf.constant(min(max(magnitude, 0.0), s.max_magnitude) / s.max_magnitude)
  out = OPS[name](tf.round(tf.cast(image, tf.float32)), m, tf.constant(sign), s)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


@functools.lru_cache(maxsize=None)
def _op_switch(scale: str):
  """A tf.function applying OPS[index] on `scale`: the 14 branches are traced once
  per image shape rather than once per layer (tracing dominates pipeline setup)."""

  @tf.function(autograph=False)
  def apply(image: tf.Tensor, index: tf.Tensor, m: tf.Tensor,
            sign: tf.Tensor) -> tf.Tensor:
    return _switch(image, index, m, sign, SCALES[scale])

  return apply


def _switch(image, index, m, sign, scale: Scale) -> tf.Tensor:
  out = tf.switch_case(index, [functools.partial(op, image, m, sign, scale)
                               for op in OPS.values()])
  out = tf.clip_by_value(tf.round(out), 0.0, 255.0)
  # The geometric branches lose the static shape; later ops rely on it.
  out.set_shape(image.shape)
  return out


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float,
                seed: tf.Tensor, scale: str = 'big_vision') -> tf.Tensor:
  """Applies `num_layers` random ops at `magnitude` to an image.

  Args:
    image: [H, W, 3] image with values in [0, 255] (any real or uint8 dtype).
    num_layers: number of ops applied in sequence.
    magnitude: op strength, 0..10 on the 'big_vision' scale, 0..30 on the
      'torchvision' one.
    seed: [2] int seed for the stateless op / sign choices.
    scale: a key of SCALES: how magnitudes map to op strengths.

  Returns:
    The augmented image, float32 [H, W, 3], integer values in [0, 255].
  """
  # Round first so that the integer ops (equalize, posterize) see uint8 values.
  image = tf.round(tf.cast(image, tf.float32))
  s = SCALES[scale]
  m = tf.constant(min(max(magnitude, 0.0), s.max_magnitude) / s.max_magnitude)
  apply = _op_switch(scale)
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, num_layers)):
    op_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 2))
    index = tf.random.stateless_uniform(
        [], op_seed, minval=0, maxval=len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    image = apply(image, index, m, sign)
  return image
