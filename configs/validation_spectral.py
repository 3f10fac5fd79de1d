"""Validation 2 of Peng et al.: spectral concentration of W1 in a residual LayerNorm MLP.

    z = Linear(flatten(image)); 4 x [z <- relu(Linear(LN(z))) + z]; logits = Linear(z)

with LN without scale and bias (sparse_jax/models/residual_mlp.py). The theory bounds
the spread of the nonzero eigenvalues of W1 W1^T (spectral concentration); the
experiment reads, against the width p, the spectral ratio lambda_max / smallest nonzero
lambda of each block's hidden kernel (`train/spectral_ratio/layer_<i>`, `/mean`, with
"nonzero" = lambda > t mean(lambda), t = `metrics.spectral_threshold` = 0.1 here) and the
anisotropy of the gradient noise at each block output (largest / mean eigenvalue of the
covariance over the batch of the per-example dL/d(block output),
`train/gradient_noise_anisotropy/...`).

The argument is the width p (default 64). As officially: SGD, lr 1e-3, batch 32, no
schedule, weight decay 0 by default (official sweep {0, 0.01, 0.1}: pass
--config.optimizer.weight_decay=0.1); the official widths are 16 ... 1024. Here MNIST's
stand-in is the embedded handwritten digits at their native 8 x 8 px (192 inputs: the
grey level in 3 channels), no augmentation, 10,000 steps (213 epochs of 1,500 digits);
statistics on the last logging step's batch. About a minute per run on 2 CPU cores:

  python -m sparse_jax.main --config configs/validation_spectral.py:64 \\
      --workdir /tmp/sparse_jax/spectral_64

On MNIST itself (prepared by tfds in data_dir: `tfds build mnist --data_dir=DIR`):

  python -m sparse_jax.main --config configs/validation_spectral.py:64 \\
      --config.dataset=mnist --config.image_size=28 --config.data_dir=/path/to/tfds \\
      --workdir /path/to/runs/spectral_64
"""
from sparse_jax.config_schema import residual_mlp_config
from sparse_jax.errors import ConfigError


def get_config(arg: str | None = None):
  arg = (arg or "64").strip()
  if not arg.isdigit() or int(arg) <= 0:
    raise ConfigError(f"Unknown config argument {arg!r}: the argument is the width p.\n"
                      "Fix: name a positive integer width, e.g. "
                      "--config configs/validation_spectral.py:64.")
  c = residual_mlp_config()
  c.model.width = int(arg)
  c.image_size = 8
  c.input.update(dict(crop="none", eval_resize=8))
  c.optimizer.update(dict(name="sgd", learning_rate=1e-3, weight_decay=0.0,
                          grad_clip_norm=0.0, schedule="constant", warmup_steps=0))
  # t of "nonzero eigenvalue" lambda > t mean(lambda): the official in-training logger's
  # 0.1. The default (10 min/max side = 10 for these square kernels) counts no
  # eigenvalue of a near-isotropic W1 as nonzero (Marchenko-Pastur: max ~ 4 x mean).
  c.metrics.spectral_threshold = 0.1
  c.batch_size = 32
  c.num_steps = 10_000
  c.log_every = 2000
  c.eval_every = 5000
  c.checkpoint_every = 5000
  return c
