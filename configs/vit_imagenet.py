"""ViT-B/16 on ImageNet-1k from scratch: the official recipe of Peng et al.

As the authors' run (cdgyp/sparsity, codes/scripts/imagenet1k): 300 epochs of 625 steps
at global batch 2048 (187,500 steps; an epoch is 1,281,167 // 2048 steps of repeated
augmentation x3, so it sees a third of the images three times each), AdamW lr 3e-3,
weight decay 0.3 on every parameter, cosine decay without warmup stepped once per epoch,
label smoothing 0.11 on the hard (argmax) Mixup 0.2 / CutMix 1.0 targets, torchvision's
RandAugment(2, 9) of 30 magnitude bins, torchvision's random-resized crop boxes (224) +
flip, gradient clipping 1.0, bfloat16 activations, torch MultiheadAttention's attention
init, the projections (LN clamp / uplift, zeroth-bias box) before each optimizer update
as the official ViT loop; eval resizes to 256 and center-crops 224.
docs/official_recipes.md lists every setting and what still differs.

  python -m sparse_jax.main --config configs/vit_imagenet.py:sparsified \
      --workdir gs://BUCKET/runs/vit_b16_sparsified --config.data_dir=gs://BUCKET/tfds
  python -m sparse_jax.main --config configs/vit_imagenet.py:vanilla \
      --workdir gs://BUCKET/runs/vit_b16_vanilla --config.data_dir=gs://BUCKET/tfds

`finetune`: the papers' finetuning for sparsity from the vanilla checkpoint: 15 epochs
at lr 3e-3 (cosine per epoch), LoRA r = 192 (scaling 1/r, B = 0) on the MLP, attention
and head kernels, training only LoRA, biases, LayerNorm scales and zeroth biases; ReLU
swapped for J-SquaredReLU at once, as the official script does (the paper's mixing over
5 epochs: --config.sparsity.activation_mixing_steps=3125), the restricted LayerNorm
uplifted over 5 epochs.

  python -m sparse_jax.main --config configs/vit_imagenet.py:finetune \
      --config.finetune.checkpoint=gs://BUCKET/runs/vit_b16_vanilla \
      --workdir gs://BUCKET/runs/vit_b16_finetune --config.data_dir=gs://BUCKET/tfds

Public checkpoints (docs/finetuning.md): `finetune.checkpoint=npz:<file>` reads a
big_vision / vision_transformer ViT `.npz` (ViT-B/16 ImageNet-21k or AugReg), `hf:<dir>` a
Hugging Face ViT directory; the model keys come from the checkpoint, GELU is swapped for
(or, with activation_mixing_steps > 0, mixed into) J-SquaredReLU, a head for another
label set (21k -> 1k) starts at zero, and the finetuned model is written to
<workdir>/export/model.npz. The GELU MLPs need --config.mlp_impl=xla (the default).

  gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz /data/
  python -m sparse_jax.main --config configs/vit_imagenet.py:finetune \
      --config.finetune.checkpoint=npz:/data/ViT-B_16.npz \
      --workdir gs://BUCKET/runs/vit_b16_from_i21k --config.data_dir=gs://BUCKET/tfds

ImageNet comes through tfds `imagenet2012`: either already prepared in `data_dir`, or
prepared on first use from the two tar files in `--config.manual_dir`. Check a config
on a laptop first with `--dry_run`.
"""
from sparse_jax.config_schema import apply_variant, base_config, parse_variant

TRAIN_EXAMPLES = 1_281_167
BATCH = 2048
EPOCH = TRAIN_EXAMPLES // BATCH  # 625 steps, as the official RASampler's epochs.


def get_config(arg: str | None = None):
  variant = parse_variant(arg)
  c = base_config()
  c.model.update(dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                      mlp_dim=3072, dtype="bfloat16", attention_init="torch"))
  c.dataset = "imagenet2012"
  c.image_size = 224
  c.num_classes = 1000
  c.batch_size = BATCH
  c.eval_batch_size = BATCH
  c.input.update(dict(shuffle_buffer=250_000, crop="inception",
                      crop_sampler="torchvision", flip=True,
                      randaugment_layers=2, randaugment_magnitude=9,
                      randaugment_scale="torchvision", mixup_alpha=0.2,
                      cutmix_alpha=1.0, mix_targets="hard", label_smoothing=0.11,
                      repeated_augmentation=3, eval_resize=256))
  c.optimizer.update(dict(learning_rate=3e-3, weight_decay=0.3, weight_decay_exclude="",
                          grad_clip_norm=1.0, schedule="cosine", warmup_steps=0,
                          lr_update_every=EPOCH))
  # As the official loop: LN clamp / uplift and the zeroth-bias box run after the
  # backward, before optimizer.step() (T5's run after it).
  c.sparsity.projection_timing = "before_update"
  c.num_steps = 300 * EPOCH
  c.log_every = 500
  c.eval_every = 10 * EPOCH
  c.checkpoint_every = 2000
  c = apply_variant(c, variant)
  if variant == "finetune":
    c.finetune.update(dict(
        lora_rank=192,
        lora_targets=r"(mlp/w[io]|attention/(query|key|value|out)|head)/kernel$",
        trainable=r"bias$|scale$"))
    # The official script swaps the activation directly (no --mixed-activation).
    c.sparsity.update(dict(activation_mixing_steps=0, uplift_steps=5 * EPOCH))
    c.num_steps = 15 * EPOCH
    c.eval_every = 5 * EPOCH
  return c
