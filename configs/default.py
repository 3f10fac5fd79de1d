"""Tiny ViT on the embedded handwritten digits: sparsified (default), vanilla, finetune.

1,797 real 8x8 digits from scikit-learn (no download), upsampled to 16 px, 4x4 patches
(17 tokens), 3 layers of width 48 with MLP width 192, 2,000 steps at batch 32 with the
ViT recipe's AdamW (lr 3e-3, weight decay 0.3 on every parameter, cosine). About 2.5
minutes on 2 CPU cores.

  python -m sparse_jax.main --config configs/default.py --workdir /tmp/sparse_jax/digits_sparsified
  python -m sparse_jax.main --config configs/default.py:vanilla --workdir /tmp/sparse_jax/digits_vanilla

`finetune`: the papers' second recipe at this size, from the vanilla run above (its
workdir is the default `finetune.checkpoint`): 600 steps of LoRA (r = 8, scaling 1/r)
on the MLP, attention and head kernels, training only the LoRA factors, biases, norm
scales and zeroth biases; ReLU mixed into J-SquaredReLU and the restricted LayerNorm
uplifted over the first 200 steps. About a minute.

  python -m sparse_jax.main --config configs/default.py:finetune --workdir /tmp/sparse_jax/digits_finetune
"""
from sparse_jax.config_schema import apply_variant, base_config, parse_variant

VANILLA_WORKDIR = "/tmp/sparse_jax/digits_vanilla"


def get_config(arg: str | None = None):
  variant = parse_variant(arg)
  c = apply_variant(base_config(), variant)
  if variant == "finetune":
    c.finetune.update(dict(
        checkpoint=VANILLA_WORKDIR, lora_rank=8,
        lora_targets=r"(mlp/w[io]|attention/(query|key|value|out)|head)/kernel$",
        trainable=r"bias$|scale$"))
    c.sparsity.update(dict(activation_mixing_steps=200, uplift_steps=200))
    c.optimizer.warmup_steps = 0
    c.num_steps = 600
    c.log_every = 100
    c.eval_every = 300
    c.checkpoint_every = 300
  return c
