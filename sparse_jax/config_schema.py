"""Every config key the trainer reads, with its default and meaning.

Experiment files in `configs/` start from `base_config()`, set what differs, and pick a
variant with `apply_variant`. The returned ConfigDict is locked, so a misspelled key on
the command line (`--config.nonexistent_key=1`) is rejected instead of ignored.
"""
import dataclasses
import json
import math
import re
from typing import Any, Callable

import ml_collections
import numpy as np
from ml_collections import config_dict

from sparse_jax.errors import ConfigError

VARIANTS = ("sparsified", "vanilla", "finetune")
MODELS = ("vit", "t5", "residual_mlp")
# The datasets each kind of experiment reads (tfds names; the pipelines in
# sparse_jax/data define them, and a test checks the two agree).
IMAGE_DATASETS = ("sklearn_digits", "cifar10", "mnist", "imagenet2012")
TEXT_DATASETS = ("c4/en", "python_reference_text")


def _common_config() -> ml_collections.ConfigDict:
  """Keys every experiment has: seed, sparsity modules, optimizer, loop, parallelism."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.variant = "sparsified"  # Informational: which variant apply_variant() applied.

  # The sparsity modules of Peng et al.; apply_variant() sets them as a group.
  c.sparsity = ml_collections.ConfigDict(dict(
      activation="jsrelu",               # 'relu' | 'jsrelu' | 'mixed' | 's_shaped' | 'gelu' | 'gelu_tanh'
      activation_mixing_steps=0,         # T_mix for 'mixed' (0 = direct swap).
      # What 'mixed' mixes into J-SquaredReLU: 'relu' | 'gelu' (erf) | 'gelu_tanh' |
      # 'jsrelu'; '' = the finetune source's activation (ReLU without a source).
      mixing_source="",
      zeroth_bias_position="mlp_output",  # 'none' | 'mlp_output' (official code) | 'mlp_input' (paper)
      zeroth_bias_clipping=config_dict.placeholder(float),  # c of |b| <= c|gamma|; None = unclipped
      restricted_norm=True,              # Restrict the pre-MLP LayerNorm (projected scale):
      norm_projection="clamp",           # 'clamp': no bias, gamma >= 1 (from scratch);
                                         # 'uplift': bias kept but frozen, |gamma| uplifted (finetune)
      uplift_steps=0,                    # T_up of the uplift.
      projection_timing="after_update",  # 'after_update' (paper) | 'before_update' (official ViT code)
      weight_noise=0.0,                  # rho of per-token weight noise (ViT: both MLP denses; T5: wi).
      # 's_shaped': f(z) = relu(u - w)^2 - relu(-u - w)^2 + shift_y, u = z - shift_x,
      # flat on [shift_x - w, shift_x + w] (w = half_width); see ops.activations.SShaped.
      s_shaped_shift_x=0.0,
      s_shaped_shift_y=0.0,
      s_shaped_half_width=1.5,
  ))
  c.sparsity.zeroth_bias_clipping = 0.1

  # Finetuning for sparsity (variant 'finetune'): start from another run's checkpoint.
  c.finetune = ml_collections.ConfigDict(dict(
      checkpoint="",     # Workdir (local or gs://) of the run to start from; '' = from scratch.
      checkpoint_step=-1,  # Its checkpoint to load (-1 = the latest).
      lora_rank=0,       # r of LoRA on the kernels `lora_targets` matches (0 = no LoRA).
      lora_targets="",   # Regex on '/'-joined kernel paths that get LoRA adapters.
      # Regex on param paths that train besides the LoRA factors ('' with LoRA: only
      # the factors; without LoRA every param trains).
      trainable="",
  ))

  c.data_dir = config_dict.placeholder(str)    # tfds data_dir (None = tfds default)
  c.batch_size = 32                  # Global train batch over all devices and hosts.
  c.eval_batch_size = 256            # Global eval batch.
  # Training-mode sparsity statistics (logging steps only) use the first this many
  # examples of the batch (0 = all): a cost cap, as in the official T5 code (32).
  c.metrics_batch_size = 0
  # The theory's quantities on logging steps (flatness, activation gradients, spectra of
  # W1; see sparse_jax/metrics.py). spectral_threshold = t of "nonzero eigenvalue"
  # lambda > t * mean(lambda); None = 10 min(d_model, d_ff) / max(d_model, d_ff), the
  # official t = 10 restated for the min-side spectrum (2.5 for ViT-B/16, T5-Base).
  c.metrics = ml_collections.ConfigDict(dict(
      theory=True, spectral_threshold=config_dict.placeholder(float)))

  # Optimization (AdamW).
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, weight_decay=0.3,
      weight_decay_exclude="",   # Regex on '/'-joined param paths exempt from decay ('' = none).
      name="adamw",              # 'adamw' | 'sgd' (plain SGD; weight decay as L2 in the gradient)
      b1=0.9, b2=0.999, grad_clip_norm=1.0,
      schedule="cosine",         # 'cosine' | 'constant' | 'inverse_sqrt'
      warmup_steps=50,
      # The learning rate changes every this many steps (an int in [1, num_steps]), held
      # at the block's first step's value: 1 = every step; 625 = once per epoch of the
      # official ViT run (torch's CosineAnnealingLR stepped per epoch).
      lr_update_every=1))
  c.num_steps = 2000

  # Loop.
  c.log_every = 250      # Train metrics (incl. sparsity) every this many steps.
  c.eval_every = 1000    # Also evaluated at the end.
  c.checkpoint_every = 500
  c.keep_checkpoints = 3

  # Parallelism: mesh over ('data', 'fsdp', 'tensor'); -1 = all remaining devices.
  c.mesh_shape = (-1, 1, 1)

  # How the MLP runs: 'xla' (plain jnp) or 'pallas' (block-sparse kernels that skip
  # all-zero blocks of the activations, forward and backward; see sparse_jax/ops/mlp.py).
  c.mlp_impl = "xla"
  c.mlp_backend = "auto"  # 'auto' (platform; CPU interprets the TPU kernels) | 'tpu' | 'gpu'
  # (tokens, units, features) tile of the kernels; None = the backend's default
  # (TPU (128, 128, 256), GPU (64, 64, 128)). TPU tiles must be (8, 128)-aligned.
  c.mlp_tiles = config_dict.placeholder(tuple)
  return c


def base_config() -> ml_collections.ConfigDict:
  """Defaults of image experiments (a tiny sparsified ViT on the digits set)."""
  c = _common_config()
  c.model = ml_collections.ConfigDict(dict(
      name="vit", patch_size=4, hidden_size=48, num_layers=3, num_heads=4, mlp_dim=192,
      dtype="float32",  # Activation dtype; parameters stay float32.
      # Attention kernels: 'xavier' (uniform on each [d, d] projection) | 'torch'
      # (torch MultiheadAttention's, the official ViT: Xavier over the stacked [3d, d]
      # q/k/v, out projection U(+-1/sqrt(d))).
      attention_init="xavier",
      # 'token' (class token) | 'gap' (mean of the patch tokens, no class token) |
      # 'map' (attention pooling of the patch tokens, big_vision's MAP head).
      classifier="token",
      norm_epsilon=1e-6,  # LayerNorm epsilon (HF ViT checkpoints: 1e-12).
      representation_size=0))  # > 0: tanh 'pre_logits' layer before the head (i21k).
  # 'sklearn_digits' (embedded) | 'cifar10' | 'mnist' | 'imagenet2012' (tfds, data_dir)
  c.dataset = "sklearn_digits"
  c.manual_dir = config_dict.placeholder(str)  # ImageNet manual download dir
  c.image_size = 16
  c.num_classes = 10
  c.input = ml_collections.ConfigDict(dict(
      shuffle_buffer=2048, crop="pad_crop", flip=False, randaugment_layers=0,
      randaugment_magnitude=0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
      eval_resize=16,
      # RandAugment's magnitude scale: 'big_vision' (of 10, as big_vision / timm) |
      # 'torchvision' (of 30: RandAugment(num_magnitude_bins=31), the official ViT run).
      randaugment_scale="big_vision",
      # Mixup / CutMix targets: 'soft' (mixed one-hot) | 'hard' (one-hot of the mixed
      # target's argmax, as the official ViT run); label smoothing applies after.
      mix_targets="soft",
      # Repeated augmentation (an int >= 1; 1 = off, 3 = the official RASampler): each
      # epoch of examples // batch_size steps sees 1/r of the images, each r times.
      repeated_augmentation=1,
      # How crop='inception' draws its box: 'tensorflow' (sample_distorted_bounding_box,
      # big_vision's) | 'torchvision' (RandomResizedCrop's, the official ViT run: larger
      # boxes on average).
      crop_sampler="tensorflow"))
  return c


def residual_mlp_config() -> ml_collections.ConfigDict:
  """Defaults of the residual LayerNorm MLP (the papers' spectral-concentration model)
  on the digits: image experiments' keys with `model` = its width and block count."""
  c = base_config()
  c.model = ml_collections.ConfigDict(dict(
      name="residual_mlp", width=64, num_blocks=4, dtype="float32"))
  apply_variant(c, "vanilla")  # Plain ReLU blocks: none of the sparsity modules.
  return c


def t5_config() -> ml_collections.ConfigDict:
  """Defaults of text experiments: T5-Base v1.0 on C4 with span corruption."""
  c = _common_config()
  c.model = ml_collections.ConfigDict(dict(
      name="t5", vocab_size=32128, d_model=768, num_heads=12, head_dim=64, d_ff=3072,
      num_encoder_layers=12, num_decoder_layers=12, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, dropout_rate=0.0,
      attention_dropout_rate=0.0,  # In [0, 1): dropout on attention probabilities (HF T5: 0.1).
      max_len=512,       # Rows of each zeroth bias table (>= inputs and targets length).
      # False: the output projection is its own kernel (lm_head/kernel), not the input
      # embedding; a finetune from a tied run starts it as a copy of the embedding (the
      # official finetune: LoRA on HF's lm_head).
      tie_embeddings=True,
      # Decoder output x 1/sqrt(d_model) before the output projection (v1.0; HF T5 iff
      # tie_word_embeddings); False for T5 v1.1 / Flan-T5's untied head.
      output_rescale=True,
      gated_mlp=False,   # T5 v1.1 / Flan-T5: a = f(x wi) * (x wi_linear).
      dtype="float32"))
  c.dataset = "c4/en"   # 'c4/en' (tfds) | 'python_reference_text' (embedded)
  c.text = ml_collections.ConfigDict(dict(
      # SentencePiece model (local or gs://); '' trains one on the dataset (embedded only).
      vocabulary_path="gs://t5-data/vocabs/cc_all.32000/sentencepiece.model",
      vocabulary_pieces=1000,            # Pieces of a trained vocabulary.
      inputs_length=512, targets_length=114,  # Span corruption at 15% noise, mean span 3.
      noise_density=0.15, mean_noise_span_length=3.0,
      shuffle_window=10_000,             # Documents shuffled together.
      # Between packed documents: 'eos' (EOS ends each document, as T5's pipelines and
      # the official collator) | 'none' (concatenated with no separator).
      document_separator="none",
      eval_max_examples=10_240))         # Eval examples per evaluation (0 = all; embedded only).
  return c


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict (e.g. a config.json) as {'model.mlp_dim': 192, ...}; tuples
  become lists, as JSON has them."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def changed_keys(saved: dict, c: ml_collections.ConfigDict) -> list[str]:
  """Flattened keys where a saved config (a run's config.json) and `c` differ; keys the
  schema gained after that run was saved are fine at their defaults."""
  old = flatten(saved)
  new = flatten(_json_like(c))
  defaults = flatten(_json_like(defaults_for(c)))
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not (
      k not in old and k in defaults and new.get(k) == defaults[k]))


def _json_like(c: ml_collections.ConfigDict) -> dict:
  """`c` as its config.json holds it (a JSON round trip: tuples become lists)."""
  return json.loads(json.dumps(c.to_dict(), default=list))


def defaults_for(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The schema's defaults for the kind of model `c` configures."""
  if c.model.name == "residual_mlp":
    return residual_mlp_config()
  return t5_config() if c.model.name == "t5" else base_config()


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets the sparsity switches for 'sparsified' (JSReLU + zeroth bias + restricted LN),
  'vanilla' (plain ReLU MLP, ordinary LayerNorm) or 'finetune' (from a vanilla
  checkpoint: ReLU mixed into JSReLU, zeroth bias, restricted LN uplifted, LoRA; the
  config sets the step counts, the rank and what trains)."""
  if variant not in VARIANTS:
    raise ConfigError(f"Unknown variant {variant!r}.\n"
                      f"Fix: use one of {', '.join(VARIANTS)}, e.g. "
                      f"--config configs/default.py:{VARIANTS[0]}")
  c.variant = variant
  s = c.sparsity
  if variant == "vanilla":
    s.activation, s.zeroth_bias_position, s.restricted_norm = "relu", "none", False
  elif variant == "finetune":
    s.activation, s.zeroth_bias_position, s.restricted_norm = "mixed", "mlp_output", True
    s.norm_projection = "uplift"
  else:
    s.activation, s.zeroth_bias_position, s.restricted_norm = "jsrelu", "mlp_output", True
  return c


def parse_variant(arg: str | None, known: tuple[str, ...] = VARIANTS) -> str:
  """The one variant named by a config argument ('' = the first of `known`)."""
  return parse_arguments(arg, {"variant": known})["variant"]


def parse_arguments(arg: str | None, groups: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """One choice per group from a config argument like 'tiny,vanilla' (any order).

  Each group's first entry is its default, e.g. groups={'size': ('base', 'tiny'),
  'variant': VARIANTS}.
  """
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  chosen = {}
  for word in words:
    group = next((g for g, options in groups.items() if word in options), None)
    if group is None or group in chosen:
      options = "; ".join(f"{g}: {', '.join(o)}" for g, o in groups.items())
      example = ",".join(o[-1] for o in groups.values())
      raise ConfigError(f"Unknown config argument {arg!r} ({word!r} is "
                        f"{'repeated' if group else 'not an option'}).\n"
                        f"Fix: name at most one of each ({options}), e.g. :{example}.")
    chosen[group] = word
  return {g: chosen.get(g, options[0]) for g, options in groups.items()}


def validate(c: ml_collections.ConfigDict) -> None:
  """Static checks that need no devices or data; raises ConfigError naming the fix.

  First every key against its valid values (`RANGES`), then the rules that tie keys
  together (divisibility, lengths against tables, modules a model has).
  """
  check_ranges(c)
  m = c.model
  _validate_mlp_kernel(c)
  _validate_s_shaped(c)
  if m.name == "vit":
    _validate_vit(c)
  elif m.name == "residual_mlp":
    _validate_residual_mlp(c)
  else:
    _validate_t5(c)
  _validate_finetune(c)
  _validate_recipe(c)
  o = c.optimizer
  if not o.warmup_steps < c.num_steps:
    raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must be in [0, num_steps="
                      f"{c.num_steps}).\nFix: pass --config.optimizer.warmup_steps="
                      f"{c.num_steps // 10}.")


def _validate_mlp_kernel(c: ml_collections.ConfigDict) -> None:
  tiles = c.mlp_tiles
  if tiles is None:
    return
  tpu = c.mlp_backend == "tpu" or (c.mlp_backend == "auto" and
                                   c.mlp_impl == "pallas" and _on_tpu())
  if tpu and (tiles[0] % 8 or tiles[1] % 128 or tiles[2] % 128):
    raise ConfigError(f"config.mlp_tiles={tiles!r} is not (8, 128)-aligned, which TPU "
                      "kernels need (tokens % 8, units % 128, features % 128).\nFix: pass "
                      "e.g. --config.mlp_tiles='(128, 128, 256)'.")


def _validate_s_shaped(c: ml_collections.ConfigDict) -> None:
  if c.sparsity.activation == "s_shaped" and c.mlp_impl != "xla":
    raise ConfigError("sparsity.activation='s_shaped' runs only with mlp_impl='xla' (the "
                      "Pallas kernels skip blocks where z < 0, which is not its flat "
                      f"region), but mlp_impl={c.mlp_impl!r}.\n"
                      "Fix: pass --config.mlp_impl=xla.")
  s = c.sparsity
  gelu = s.activation in ("gelu", "gelu_tanh") or (
      s.activation == "mixed" and s.get("mixing_source") in ("gelu", "gelu_tanh"))
  if gelu and c.mlp_impl != "xla":
    raise ConfigError(f"sparsity.activation={s.activation!r} (from "
                      f"{s.get('mixing_source') or s.activation!r}) is not zero for z < 0, "
                      "which the Pallas kernels' block skipping needs, but "
                      f"mlp_impl={c.mlp_impl!r}.\nFix: pass --config.mlp_impl=xla.")
  if c.model.get("gated_mlp") and c.mlp_impl != "xla":
    raise ConfigError("model.gated_mlp=True (T5 v1.1) runs only with mlp_impl='xla', but "
                      f"mlp_impl={c.mlp_impl!r}.\nFix: pass --config.mlp_impl=xla.")


def _on_tpu() -> bool:
  import jax  # Deferred: validating a config should not start a backend otherwise.
  return jax.default_backend() == "tpu"


def _validate_finetune(c: ml_collections.ConfigDict) -> None:
  f = c.finetune
  if f.lora_rank > 0 and not f.lora_targets:
    raise ConfigError("finetune.lora_rank > 0 but finetune.lora_targets is empty, so no "
                      "kernel would get an adapter.\nFix: pass e.g. "
                      "--config.finetune.lora_targets='mlp/w[io]/kernel'.")


def _validate_vit(c: ml_collections.ConfigDict) -> None:
  m = c.model
  if c.image_size % m.patch_size:
    raise ConfigError(f"image_size={c.image_size} is not a multiple of "
                      f"model.patch_size={m.patch_size}.\n"
                      "Fix: choose an image_size divisible by the patch size.")
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                      f"model.num_heads={m.num_heads}.\nFix: change one of them.")


def _validate_residual_mlp(c: ml_collections.ConfigDict) -> None:
  s = c.sparsity
  modules = {"sparsity.activation": (s.activation, "relu"),
             "sparsity.zeroth_bias_position": (s.zeroth_bias_position, "none"),
             "sparsity.restricted_norm": (s.restricted_norm, False),
             "sparsity.weight_noise": (s.weight_noise, 0.0)}
  for key, (value, plain) in modules.items():
    if value != plain:
      raise ConfigError(f"model.name='residual_mlp' has plain ReLU blocks without the "
                        f"sparsity modules, but config.{key}={value!r}.\n"
                        f"Fix: pass --config.{key}={plain} (or use model.name='vit').")


def _validate_t5(c: ml_collections.ConfigDict) -> None:
  m, t = c.model, c.text
  longest = max(t.inputs_length, t.targets_length)
  if c.sparsity.zeroth_bias_position != "none" and longest > m.max_len:
    raise ConfigError(
        f"Sequences of {longest} tokens (text.inputs_length={t.inputs_length}, "
        f"text.targets_length={t.targets_length}) are longer than the zeroth bias table "
        f"(model.max_len={m.max_len} rows).\n"
        f"Fix: pass --config.model.max_len={longest}, or shorten the sequences.")


# ------------------------------------------------------------------------ valid values
@dataclasses.dataclass(frozen=True)
class Valid:
  """The values one config key may take: `text` says it (in errors and docs/configs.md),
  `accepts` checks it, `counterexample` is a value a command line can pass that it
  rejects (None where the flag's type already rules out every bad value)."""
  text: str
  accepts: Callable[[Any], bool]
  counterexample: Any = None


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


def _bounds_text(low, high, low_open, high_open) -> str:
  parts = []
  if low is not None:
    parts.append(f"{'>' if low_open else '>='} {low}")
  if high is not None:
    parts.append(f"{'<' if high_open else '<='} {high}")
  return " and ".join(parts)


def _within(v, low, high, low_open, high_open) -> bool:
  return ((low is None or (v > low if low_open else v >= low)) and
          (high is None or (v < high if high_open else v <= high)))


def integer(low: int | None = None, high: int | None = None) -> Valid:
  """An int (not a bool) in [low, high]."""
  bounds = _bounds_text(low, high, False, False)
  return Valid(f"an integer{' ' + bounds if bounds else ''}",
               lambda v: _is_int(v) and _within(v, low, high, False, False),
               low - 1 if low is not None else high + 1)


def number(low: float | None = None, high: float | None = None, *, low_open=False,
           high_open=False, optional=False) -> Valid:
  """A finite int or float within the bounds (NaN and inf never are); None if optional."""
  bounds = _bounds_text(low, high, low_open, high_open)
  text = f"a finite number{' ' + bounds if bounds else ''}"
  bad = float("nan") if low is None else (low if low_open else low - 0.5)
  return Valid(text + (", or None (unset)" if optional else ""),
               lambda v: (optional and v is None) or (
                   _is_number(v) and _within(v, low, high, low_open, high_open)), bad)


def one_of(*options) -> Valid:
  """Exactly one of `options`."""
  return Valid(f"one of {', '.join(map(repr, options))}",
               lambda v: any(v == o and type(v) is type(o) for o in options), "bogus")


def boolean() -> Valid:
  return Valid("True or False", lambda v: isinstance(v, (bool, np.bool_)))


def string(*, optional=False, nonempty=False) -> Valid:
  """A str ('' allowed unless nonempty); None too if optional."""
  text = "a non-empty string" if nonempty else "a string"
  return Valid(text + (", or None (unset)" if optional else ""),
               lambda v: (optional and v is None) or (
                   isinstance(v, str) and (bool(v) or not nonempty)),
               "" if nonempty else None)


def _compiles(v) -> bool:
  try:
    re.compile(v)
    return True
  except (re.error, TypeError):
    return False


def regex() -> Valid:
  """A Python regular expression ('' matches every path)."""
  return Valid("a Python regex", lambda v: isinstance(v, str) and _compiles(v), "(")


def int_tuple(length: int, *, low: int = 1, minus_one: bool = False,
              optional=False) -> Valid:
  """A tuple (or list) of `length` ints >= low; with minus_one, at most one -1 too."""
  text = f"{length} integers >= {low}"
  if minus_one:
    text += " with at most one -1 (= the remaining devices)"
  def accepts(v):
    if optional and v is None:
      return True
    if not isinstance(v, (tuple, list)) or len(v) != length or not all(map(_is_int, v)):
      return False
    free = [x for x in v if minus_one and x == -1]
    return len(free) <= 1 and all(x >= low for x in v if not (minus_one and x == -1))
  return Valid(text + (", or None (unset)" if optional else ""), accepts,
               (low,) * (length - 1))


_POSITIVE = integer(1)
_COUNT = integer(0)
_PROBABILITY = number(0, 1, high_open=True)

# Every key of every schema above, with the values it may take. validate() checks the
# keys a config has; tests/test_config_ranges.py checks that each key of each schema
# and of each configs/*.py file is listed here, and runs each check through the CLI.
RANGES: dict[str, Valid] = {
    # Common keys.
    "seed": integer(0, 2**31 - 1),
    "variant": one_of(*VARIANTS),
    "sparsity.activation": one_of("relu", "jsrelu", "mixed", "s_shaped", "gelu",
                                  "gelu_tanh"),
    "sparsity.activation_mixing_steps": _COUNT,
    "sparsity.mixing_source": one_of("", "relu", "gelu", "gelu_tanh", "jsrelu"),
    "sparsity.zeroth_bias_position": one_of("none", "mlp_output", "mlp_input"),
    "sparsity.zeroth_bias_clipping": number(0, low_open=True, optional=True),
    "sparsity.restricted_norm": boolean(),
    "sparsity.norm_projection": one_of("clamp", "uplift"),
    "sparsity.uplift_steps": _COUNT,
    "sparsity.projection_timing": one_of("after_update", "before_update"),
    "sparsity.weight_noise": number(0),
    "sparsity.s_shaped_shift_x": number(),
    "sparsity.s_shaped_shift_y": number(),
    "sparsity.s_shaped_half_width": number(0, low_open=True),
    "finetune.checkpoint": string(),
    "finetune.checkpoint_step": integer(-1),
    "finetune.lora_rank": _COUNT,
    "finetune.lora_targets": regex(),
    "finetune.trainable": regex(),
    "data_dir": string(optional=True, nonempty=True),
    "batch_size": _POSITIVE,
    "eval_batch_size": _POSITIVE,
    "metrics_batch_size": _COUNT,
    "metrics.theory": boolean(),
    "metrics.spectral_threshold": number(0, low_open=True, optional=True),
    "optimizer.learning_rate": number(0, low_open=True),
    "optimizer.weight_decay": number(0),
    "optimizer.weight_decay_exclude": regex(),
    "optimizer.name": one_of("adamw", "sgd"),
    "optimizer.b1": _PROBABILITY,
    "optimizer.b2": _PROBABILITY,
    "optimizer.grad_clip_norm": number(0),  # 0 = no clipping.
    "optimizer.schedule": one_of("cosine", "constant", "inverse_sqrt"),
    "optimizer.warmup_steps": _COUNT,
    "optimizer.lr_update_every": _POSITIVE,  # And <= num_steps (_validate_recipe).
    "num_steps": _POSITIVE,
    "log_every": _POSITIVE,
    "eval_every": _POSITIVE,
    "checkpoint_every": _POSITIVE,
    "keep_checkpoints": _POSITIVE,
    "mesh_shape": int_tuple(3, minus_one=True),
    "mlp_impl": one_of("xla", "pallas"),
    "mlp_backend": one_of("auto", "tpu", "gpu"),
    "mlp_tiles": int_tuple(3, optional=True),
    "model.name": one_of(*MODELS),
    "model.dtype": one_of("float32", "bfloat16"),
    # Image experiments.
    "model.patch_size": _POSITIVE,
    "model.hidden_size": _POSITIVE,
    "model.num_layers": _POSITIVE,
    "model.num_heads": _POSITIVE,
    "model.mlp_dim": _POSITIVE,
    "model.attention_init": one_of("xavier", "torch"),
    "model.classifier": one_of("token", "gap", "map"),
    "model.norm_epsilon": number(0, low_open=True),
    "model.representation_size": _COUNT,
    "dataset": one_of(*IMAGE_DATASETS, *TEXT_DATASETS),
    "manual_dir": string(optional=True, nonempty=True),
    "image_size": _POSITIVE,
    "num_classes": integer(2),
    "input.shuffle_buffer": _POSITIVE,
    "input.crop": one_of("pad_crop", "none", "inception"),
    "input.flip": boolean(),
    "input.randaugment_layers": _COUNT,
    "input.randaugment_magnitude": _COUNT,
    "input.mixup_alpha": number(0),
    "input.cutmix_alpha": number(0),
    "input.label_smoothing": _PROBABILITY,
    "input.eval_resize": _POSITIVE,
    "input.randaugment_scale": one_of("big_vision", "torchvision"),
    "input.mix_targets": one_of("soft", "hard"),
    "input.repeated_augmentation": _POSITIVE,
    "input.crop_sampler": one_of("tensorflow", "torchvision"),
    # The residual MLP.
    "model.width": _POSITIVE,
    "model.num_blocks": _POSITIVE,
    # Text experiments.
    "model.vocab_size": _POSITIVE,
    "model.d_model": _POSITIVE,
    "model.head_dim": _POSITIVE,
    "model.d_ff": _POSITIVE,
    "model.num_encoder_layers": _POSITIVE,
    "model.num_decoder_layers": _POSITIVE,
    "model.relative_attention_num_buckets": integer(2),
    "model.relative_attention_max_distance": _POSITIVE,
    "model.dropout_rate": _PROBABILITY,
    "model.attention_dropout_rate": _PROBABILITY,
    "model.max_len": _POSITIVE,
    "model.tie_embeddings": boolean(),
    "model.output_rescale": boolean(),
    "model.gated_mlp": boolean(),
    "text.vocabulary_path": string(),
    "text.vocabulary_pieces": _POSITIVE,
    "text.inputs_length": _POSITIVE,
    "text.targets_length": _POSITIVE,
    "text.noise_density": number(0, 1, low_open=True, high_open=True),
    "text.mean_noise_span_length": number(1),
    "text.shuffle_window": _POSITIVE,
    "text.eval_max_examples": _COUNT,
    "text.document_separator": one_of("eos", "none"),
}


def check_ranges(c: ml_collections.ConfigDict) -> None:
  """Every key of `c` that RANGES lists against its valid values; ConfigError for the
  first that is not, naming the key, the value, what it may be, and the default."""
  values = flatten(c.to_dict())
  defaults = flatten(defaults_for(c).to_dict()) if _valid_model(c) else {}
  for key, value in values.items():
    valid = RANGES.get(key)
    if valid is None or valid.accepts(value):
      continue
    shown = tuple(value) if isinstance(value, list) else value
    default = defaults.get(key)
    example = (f", e.g. --config.{key}={_flag_text(default)} (the schema's default)"
               if default is not None and valid.accepts(default) else "")
    raise ConfigError(f"config.{key}={shown!r} is not valid: it must be {valid.text}.\n"
                      f"Fix: set it to {valid.text}{example}.")


def _valid_model(c: ml_collections.ConfigDict) -> bool:
  return c.model.get("name") in MODELS


def _flag_text(value) -> str:
  """`value` as a --config.key= override would spell it."""
  if isinstance(value, (list, tuple)):
    return "'(" + ", ".join(map(str, value)) + ")'"
  return str(value)


def _validate_recipe(c: ml_collections.ConfigDict) -> None:
  """The recipe keys' rule that ties them to another key (their own ranges are in
  RANGES): the learning rate must change at least once in the run."""
  every = c.optimizer.get("lr_update_every", 1)
  if every > c.num_steps:
    raise ConfigError(f"config.optimizer.lr_update_every={every} is not valid: it must be "
                      f"an integer in [1, num_steps={c.num_steps}].\n"
                      "Fix: pass --config.optimizer.lr_update_every=1 (every step), or "
                      "the steps of an epoch.")
