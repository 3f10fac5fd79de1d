"""Tiny ViT on the embedded handwritten digits: sparsified (default) vs vanilla.

1,797 real 8x8 digits from scikit-learn (no download), upsampled to 16 px, 4x4 patches
(17 tokens), 3 layers of width 48 with MLP width 192, 2,000 steps at batch 32 with the
ViT recipe's AdamW (lr 3e-3, weight decay 0.3 on every parameter, cosine). About 2.5
minutes on 2 CPU cores.

  python -m sparse_jax.main --config configs/default.py --workdir /tmp/sparse_jax/digits_sparsified
  python -m sparse_jax.main --config configs/default.py:vanilla --workdir /tmp/sparse_jax/digits_vanilla
"""
from sparse_jax.config_schema import apply_variant, base_config, parse_variant


def get_config(arg: str | None = None):
  variant = parse_variant(arg)
  return apply_variant(base_config(), variant)
