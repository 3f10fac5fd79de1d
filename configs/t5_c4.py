"""T5 (v1.0 layout) pretrained with span corruption: sparsified (default) vs vanilla.

`base`: T5-Base on C4 (tfds `c4/en`), the official recipe of Peng et al.: span
corruption at 15% noise and mean span 3 into 512 input / 114 target tokens (documents
concatenated and cut into 568-token chunks), batch 256, 100k steps, AdamW lr 0.01 with
weight decay 0.001 except on parameters named *bias* (zeroth and relative-position
biases), inverse-square-root schedule after 10k warmup steps, clipping 1.0, float32,
dropout 0.1 on the hidden states and on the attention probabilities (HF t5-base), every
document ended by EOS before packing (T5's pipelines, the official collator), T5's public
32k SentencePiece vocabulary (32,100 ids with the sentinels; 32,128 embedding rows).
Vanilla has exactly 222,903,552 parameters. docs/official_recipes.md compares every
setting with the authors' run.

  python -m sparse_jax.main --config configs/t5_c4.py:base,sparsified \\
      --workdir gs://BUCKET/runs/t5_base_sparsified --config.data_dir=gs://BUCKET/tfds

`finetune` (either size): finetuning for sparsity from the vanilla run's checkpoint,
as officially: LoRA r = 192 (scaling 1/r, B = 0) on every dense kernel and on the output
projection, which is untied from the (frozen) input embedding and starts as a copy of it
(`model.tie_embeddings=False`), training only LoRA, the norm scales and every parameter
whose name holds "bias" (zeroth biases and the relative attention bias tables, as
loralib's bias='all'); ReLU mixed into J-SquaredReLU and the
restricted norm uplifted over 3000 steps; 10k steps with 1000 warmup; training-mode
statistics on 16 examples. `tiny,finetune` scales it to 300 steps (mixing and uplift over
100, r = 8) from the tiny vanilla run below (its workdir is the default checkpoint), with
the output still tied as in the runs docs/finetuning.md reports
(--config.model.tie_embeddings=false unties it).

  python -m sparse_jax.main --config configs/t5_c4.py:base,finetune \
      --config.finetune.checkpoint=gs://BUCKET/runs/t5_base_vanilla \
      --workdir gs://BUCKET/runs/t5_base_finetune --config.data_dir=gs://BUCKET/tfds
  python -m sparse_jax.main --config configs/t5_c4.py:tiny,finetune --workdir /tmp/sparse_jax/t5_tiny_finetune

Public checkpoints (docs/finetuning.md): `finetune.checkpoint=hf:<dir>` reads a Hugging
Face T5 directory (config.json, model.safetensors or pytorch_model.bin, spiece.model),
which sets the model keys (layers, widths, vocabulary, gated or not) and the tokenizer;
the activation is mixed from the checkpoint's (ReLU for t5-base, the paper's vanilla
T5-Base v1.0; GELU for T5 v1.1 / Flan-T5) into J-SquaredReLU, and the finetuned model is
written back to <workdir>/export in the same layout. Download the directory elsewhere
(e.g. `huggingface-cli download t5-base --local-dir /data/t5-base`), then:

  python -m sparse_jax.main --config configs/t5_c4.py:base,finetune \
      --config.finetune.checkpoint=hf:/data/t5-base \
      --workdir gs://BUCKET/runs/t5_base_from_hf --config.data_dir=gs://BUCKET/tfds
  python -m sparse_jax.main --config configs/t5_c4.py:base,finetune \
      --config.finetune.checkpoint=hf:/data/flan-t5-base \
      --workdir gs://BUCKET/runs/flan_t5_base_finetune --config.data_dir=gs://BUCKET/tfds

`tiny`: the same code on the embedded Python Language Reference prose (tfds
`python_reference_text`, no download) with a 1,000-piece SentencePiece vocabulary trained
on it on first use: 2 + 2 layers of width 64 (4 heads, MLP 256), 64 input / 14 target
tokens (70-token chunks), batch 32, 600 steps, warmup 60, no dropout and documents
concatenated without EOS (the runs measured in README.md). About 4 minutes on 2 CPU cores.

  python -m sparse_jax.main --config configs/t5_c4.py:tiny,vanilla --workdir /tmp/sparse_jax/t5_tiny_vanilla
"""
from sparse_jax.config_schema import VARIANTS, apply_variant, parse_arguments, t5_config

TINY_VANILLA_WORKDIR = "/tmp/sparse_jax/t5_tiny_vanilla"


def get_config(arg: str | None = None):
  args = parse_arguments(arg, {"size": ("base", "tiny"), "variant": VARIANTS})
  c = t5_config()
  c.optimizer.update(dict(learning_rate=0.01, weight_decay=0.001,
                          weight_decay_exclude="bias", grad_clip_norm=1.0,
                          schedule="inverse_sqrt", warmup_steps=10_000))
  if args["size"] == "base":
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1  # HF T5 drops attention probabilities too.
    c.text.document_separator = "eos"
    c.batch_size = 256
    c.eval_batch_size = 256
    c.metrics_batch_size = 32  # Training-mode statistics on 32 examples, as officially.
    c.num_steps = 100_000
    c.log_every = 1000
    c.eval_every = 10_000
    c.checkpoint_every = 5000
  else:
    c.model.update(dict(vocab_size=1152, d_model=64, num_heads=4, head_dim=16, d_ff=256,
                        num_encoder_layers=2, num_decoder_layers=2, max_len=64))
    c.dataset = "python_reference_text"
    c.text.update(dict(vocabulary_path="", vocabulary_pieces=1000, inputs_length=64,
                       targets_length=14, shuffle_window=1000, eval_max_examples=0))
    c.batch_size = 32
    c.eval_batch_size = 64
    c.optimizer.warmup_steps = 60
    c.num_steps = 600
    c.log_every = 100
    c.eval_every = 300
    c.checkpoint_every = 200
  c = apply_variant(c, args["variant"])
  if args["variant"] == "finetune":
    tiny = args["size"] == "tiny"
    c.finetune.update(dict(
        checkpoint=TINY_VANILLA_WORKDIR if tiny else "", lora_rank=8 if tiny else 192,
        # 'bias' anywhere in the path: zeroth biases and the relative attention bias
        # tables (encoder/relative_attention_bias/embedding), as the official finetune.
        lora_targets=r"kernel$", trainable=r"bias|scale$"))
    # The official LoRA on HF's lm_head gives the output its own (frozen) copy of the
    # embedding plus an adapter: untied, started from the source's embedding. (The tiny
    # finetune stays tied, as measured in docs/finetuning.md.)
    c.model.tie_embeddings = tiny
    steps = 100 if tiny else 3000
    c.sparsity.update(dict(activation_mixing_steps=steps, uplift_steps=steps))
    c.optimizer.warmup_steps = 30 if tiny else 1000
    c.num_steps = 300 if tiny else 10_000
    c.eval_every = 150 if tiny else 5000
    c.checkpoint_every = 150 if tiny else 5000
    if not tiny:
      c.metrics_batch_size = 16  # The official finetune's max_obs_batch_size.
  return c
