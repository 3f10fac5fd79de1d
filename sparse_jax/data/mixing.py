"""Batch-level mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019).

Each example is mixed with its mirror in the batch (example i with B-1-i),
which needs no extra randomness and never pairs an example with a copy of
itself (except the middle one of an odd batch). One mixing ratio per batch.
"""

import tensorflow as tf


def _beta(alpha: float, seed: tf.Tensor) -> tf.Tensor:
  """Stateless Beta(alpha, alpha) sample via two Gamma draws."""
  gammas = tf.random.stateless_gamma([2], seed, alpha=alpha)
  return gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-12)


def mixup(images: tf.Tensor, labels: tf.Tensor, alpha: float,
          seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Convex combination of each image/label with the mirrored batch."""
  lam = _beta(alpha, seed)
  return (lam * images + (1.0 - lam) * tf.reverse(images, [0]),
          lam * labels + (1.0 - lam) * tf.reverse(labels, [0]))


def cutmix(images: tf.Tensor, labels: tf.Tensor, alpha: float,
           seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Pastes a random box of the mirrored batch; labels mix by pixel share."""
  lam_seed, y_seed, x_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  height, width = images.shape[1], images.shape[2]
  cut = tf.sqrt(1.0 - _beta(alpha, lam_seed))  # Box side / image side.
  cut_h = tf.cast(tf.round(cut * height), tf.int32)
  cut_w = tf.cast(tf.round(cut * width), tf.int32)
  cy = tf.random.stateless_uniform([], y_seed, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], x_seed, 0, width, tf.int32)
  # The box is centred at (cy, cx) and clipped to the image, as in the paper.
  y0 = tf.maximum(cy - cut_h // 2, 0)
  y1 = tf.minimum(cy + cut_h - cut_h // 2, height)
  x0 = tf.maximum(cx - cut_w // 2, 0)
  x1 = tf.minimum(cx + cut_w - cut_w // 2, width)
  rows, cols = tf.range(height), tf.range(width)
  in_rows = tf.logical_and(rows >= y0, rows < y1)
  in_cols = tf.logical_and(cols >= x0, cols < x1)
  box = tf.logical_and(in_rows[:, None], in_cols[None, :])[None, :, :, None]
  mixed = tf.where(box, tf.reverse(images, [0]), images)
  # Use the clipped box's true area so labels match the pixels exactly.
  lam = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (height * width)
  return mixed, lam * labels + (1.0 - lam) * tf.reverse(labels, [0])


def mix_batch(images: tf.Tensor, labels: tf.Tensor, *, mixup_alpha: float,
              cutmix_alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Applies mixup or CutMix (a fair coin picks one if both are enabled).

  Args:
    images: [B, H, W, C] float images with a static shape.
    labels: [B, K] soft labels.
    mixup_alpha: Beta parameter for mixup; 0 disables it.
    cutmix_alpha: Beta parameter for CutMix; 0 disables it.
    seed: [2] int seed; use one per batch (e.g. from (seed, step)).

  Returns:
    (images, labels) mixed; returned unchanged when both alphas are 0.
  """
  coin_seed, mix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], coin_seed) < 0.5
    return tf.cond(use_cutmix,
                   lambda: cutmix(images, labels, cutmix_alpha, mix_seed),
                   lambda: mixup(images, labels, mixup_alpha, mix_seed))
  if mixup_alpha > 0:
    return mixup(images, labels, mixup_alpha, mix_seed)
  if cutmix_alpha > 0:
    return cutmix(images, labels, cutmix_alpha, mix_seed)
  return images, labels
