"""Validation 1 of Peng et al.: a shifted S-shaped activation concentrates z in its flat region.

The MLP activation is f(z) = relu(u - w)^2 - relu(-u - w)^2 + s_y with u = z - s_x:
flat (f = s_y, f' = 0) on [s_x - w, s_x + w], w = 1.5. The claim tested: training
drives the pre-activations z into the flat region wherever it is put, because what
training seeks is gradient sparsity (f' = 0), not the value 0. The variants move the
region by (s_x, s_y):

  center (0, 0) (default), pp (+1.6, +1.6), pm (+1.6, -1.6), mp (-1.6, +1.6),
  mm (-1.6, -1.6)

As officially: zeroth bias on the MLP output, unclipped; ordinary LayerNorms (no
restricted norm); no weight noise; AdamW with weight decay 0 and gradient clipping 1.
Read `eval/activation_concentration/mean` (share of z in the flat region) and
`flat_output_share` (share of a within 1e-6 of s_y) in summary.json or TensorBoard;
docs/validation.md has the results and benchmarks/validation_table.py tabulates runs.

`digits` (default size): the default tiny ViT (3 layers, width 48, MLP 192, 16 px, 4 px
patches) on the embedded handwritten digits, batch 64, 2,000 steps (85 epochs), lr 1e-3
(the official 1e-4 barely moves a model this small in 2,000 steps) with 5 warm-up
epochs (117 steps) and cosine decay. About 1.5 minutes on 2 CPU cores:

  python -m sparse_jax.main --config configs/validation_s_shaped.py:pm \\
      --workdir /tmp/sparse_jax/s_shaped_pm

`cifar10`: the official recipe: ViT-B/16 on CIFAR-10 (the 32 px images resized to
224 px, pad-crop + flip), Adam(W) with weight decay 0, clipping 1, lr 1e-4 with 5
warm-up epochs (3,906 steps) then cosine, batch 64, 100 epochs (78,125 steps). CIFAR-10
must be prepared by tfds in data_dir (`tfds build cifar10 --data_dir=DIR` where the
internet is reachable, then copy DIR):

  python -m sparse_jax.main --config configs/validation_s_shaped.py:pm,cifar10 \\
      --config.data_dir=/path/to/tfds --workdir /path/to/runs/s_shaped_pm
"""
from sparse_jax.config_schema import apply_variant, base_config, parse_arguments

SHIFT = 1.6
SHIFTS = {"center": (0.0, 0.0), "pp": (SHIFT, SHIFT), "pm": (SHIFT, -SHIFT),
          "mp": (-SHIFT, SHIFT), "mm": (-SHIFT, -SHIFT)}


def get_config(arg: str | None = None):
  args = parse_arguments(arg, {"shift": tuple(SHIFTS), "size": ("digits", "cifar10")})
  # The sparsified variant's switches, then the validation run's differences.
  c = apply_variant(base_config(), "sparsified")
  shift_x, shift_y = SHIFTS[args["shift"]]
  c.sparsity.update(dict(
      activation="s_shaped", s_shaped_shift_x=shift_x, s_shaped_shift_y=shift_y,
      s_shaped_half_width=1.5, zeroth_bias_position="mlp_output",
      zeroth_bias_clipping=None, restricted_norm=False, weight_noise=0.0))
  c.optimizer.update(dict(weight_decay=0.0, grad_clip_norm=1.0, schedule="cosine"))
  if args["size"] == "digits":
    c.batch_size = 64
    c.num_steps = 2000
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=117))  # 5 x 1,500 / 64.
    c.log_every = 250
    c.eval_every = 1000
    c.checkpoint_every = 1000
  else:
    steps_per_epoch = 50_000 // 64
    c.dataset = "cifar10"
    c.image_size = 224
    c.model.update(dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                        mlp_dim=3072))
    c.input.update(dict(crop="pad_crop", flip=True, eval_resize=224))
    c.batch_size = 64
    c.eval_batch_size = 256
    c.num_steps = 100 * steps_per_epoch
    c.optimizer.update(dict(learning_rate=1e-4, warmup_steps=5 * steps_per_epoch))
    c.log_every = 500
    c.eval_every = 5 * steps_per_epoch
    c.checkpoint_every = 5 * steps_per_epoch
  return c
