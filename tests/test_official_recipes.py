"""The official recipes of Peng et al. in configs/vit_imagenet.py and configs/t5_c4.py
(issues 19, 24): the per-epoch learning rate, the ViT finetune's direct swap, T5's
attention dropout and finetune trainables, the ViT attention init, every value of each
config against docs/official_recipes.md, and the keys that choose them. The input
pipeline's parts (RandAugment scale, hard mixed targets, repeated augmentation, crop
boxes, EOS per document) are tested in test_data.py and test_text_data.py; the untied
T5 output in test_finetune.py."""
import ast
import importlib
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO
from sparse_jax import config_schema, models, train
from sparse_jax.errors import ConfigError
from sparse_jax.models.t5 import T5, T5Config
from sparse_jax.nn.attention import MultiHeadAttention
from sparse_jax.ops.activations import mixing_coefficient
from sparse_jax.transforms import lora


def config(name: str, arg: str | None = None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_vit_imagenet_counts_epochs_and_steps_as_the_official_run():
  c = config("vit_imagenet")
  config_schema.validate(c)
  # 1,281,167 // 2048 = 625 steps per epoch (the RASampler's epoch), 300 epochs.
  assert c.num_steps == 300 * 625 and c.eval_every == 10 * 625
  assert c.optimizer.lr_update_every == 625 and c.optimizer.warmup_steps == 0
  assert (c.input.randaugment_scale, c.input.randaugment_magnitude) == ("torchvision", 9)
  assert c.input.mix_targets == "hard" and c.input.label_smoothing == 0.11
  assert c.input.repeated_augmentation == 3


def test_per_epoch_cosine_is_torch_cosine_annealing_stepped_per_epoch():
  c = config("vit_imagenet")
  schedule = train.learning_rate_schedule(c)
  lr = c.optimizer.learning_rate
  for epoch in (0, 1, 150, 299):
    # torch CosineAnnealingLR(T_max=300), .step() after each epoch: lr of epoch e.
    expected = lr * (1 + math.cos(math.pi * epoch / 300)) / 2
    for step in (625 * epoch, 625 * epoch + 311, 625 * epoch + 624):
      np.testing.assert_allclose(float(schedule(jnp.asarray(step))), expected, rtol=1e-5,
                                 atol=lr * 1e-6)
  # Per step (the key's default), the rate falls within the epoch.
  c.optimizer.lr_update_every = 1
  per_step = train.learning_rate_schedule(c)
  assert float(per_step(jnp.asarray(625 + 624))) < float(per_step(jnp.asarray(625)))


def test_vit_finetune_swaps_the_activation_directly():
  c = config("vit_imagenet", "finetune")
  config_schema.validate(c)
  # As the official script (no --mixed-activation): J-SquaredReLU from step 0.
  assert c.sparsity.activation_mixing_steps == 0
  assert float(mixing_coefficient(0, c.sparsity.activation_mixing_steps)) == 1.0
  # The restricted LayerNorm is still uplifted over 5 epochs; 15 epochs, cosine per epoch.
  assert c.sparsity.uplift_steps == 5 * 625 and c.num_steps == 15 * 625
  assert c.optimizer.lr_update_every == 625
  # The paper's mixing stays a key away.
  c.sparsity.activation_mixing_steps = 5 * 625
  config_schema.validate(c)
  assert float(mixing_coefficient(0, c.sparsity.activation_mixing_steps)) == 0.0


def test_t5_base_has_attention_dropout_and_eos_per_document():
  c = config("t5_c4", "base,sparsified")
  assert c.model.dropout_rate == c.model.attention_dropout_rate == 0.1
  assert c.text.document_separator == "eos"
  tiny = config("t5_c4", "tiny,sparsified")  # The measured tiny runs, unchanged.
  assert tiny.model.attention_dropout_rate == 0.0 and tiny.text.document_separator == "none"


TINY = T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                num_encoder_layers=1, num_decoder_layers=1, max_len=12)


def test_attention_dropout_only_in_training():
  """Attention-probability dropout changes the outputs in train mode only (its own rng);
  at eval the model is the one without it."""
  with_dropout = T5(T5Config(**{**TINY.__dict__, "attention_dropout_rate": 0.5}))
  without = T5(TINY)
  enc = jax.random.randint(jax.random.key(1), (2, 12), 1, 64)
  dec = jax.random.randint(jax.random.key(2), (2, 6), 1, 64)
  params = jax.jit(without.init, static_argnames="train")(
      jax.random.key(0), enc, dec, train=False)["params"]
  variables = {"params": nn.unbox(params)}  # Attention dropout adds no params.
  jitted = {m: jax.jit(m.apply, static_argnames="train") for m in (with_dropout, without)}
  apply = lambda model, train, rng=0: jitted[model](
      variables, enc, dec, train=train, rngs={"dropout": jax.random.key(rng)})
  clean = apply(without, False)  # TINY has no other dropout (dropout_rate 0).
  np.testing.assert_array_equal(apply(with_dropout, False), clean)
  dropped = apply(with_dropout, True)
  assert not np.allclose(dropped, clean, atol=1e-3)
  np.testing.assert_array_equal(apply(with_dropout, True), dropped)  # Same rng.
  assert not np.allclose(apply(with_dropout, True, rng=1), dropped, atol=1e-3)


def test_attention_dropout_zeroes_probabilities():
  """With rate 0.5 and values that are one-hot per key, each output is a key's
  probability / 0.5 or 0: whole probabilities are dropped and the rest rescaled."""
  layer = MultiHeadAttention(1, 4, use_bias=False, dropout_rate=0.5,
                             kernel_init=nn.initializers.zeros_init())
  x = jnp.ones((1, 4, 4))
  variables = layer.init(jax.random.key(0), x)
  params = traverse_util.flatten_dict(nn.unbox(variables["params"]), sep="/")
  params["value/kernel"] = jnp.eye(4).reshape(4, 1, 4)
  params["out/kernel"] = jnp.eye(4).reshape(1, 4, 4)
  variables = {"params": traverse_util.unflatten_dict(params, sep="/")}
  keys = jnp.eye(4)[None]  # Token k's value is e_k: output j = probability of key j.
  probabilities = layer.apply(variables, keys)
  np.testing.assert_allclose(probabilities, 0.25, rtol=1e-6)  # Zero queries: uniform.
  dropped = layer.apply(variables, keys, deterministic=False,
                        rngs={"dropout": jax.random.key(3)})
  assert set(np.unique(np.round(np.asarray(dropped), 6))) == {0.0, 0.5}


@pytest.mark.parametrize("size", ["base", "tiny"])
def test_t5_finetune_trains_every_param_named_bias(size):
  """As the official finetune (loralib's bias='all'): the relative attention bias tables
  and zeroth biases train with LoRA and the norm scales; kernels stay frozen."""
  c = config("t5_c4", f"{size},finetune")
  cfg = T5Config(**{**TINY.__dict__, "zeroth_bias_position": "mlp_output"})
  shapes = jax.eval_shape(lambda: T5(cfg).init(
      jax.random.key(0), jnp.ones((1, 12), jnp.int32), jnp.ones((1, 6), jnp.int32),
      train=False))["params"]
  labels = traverse_util.flatten_dict(
      lora.trainable_labels(nn.unbox(shapes), c.finetune.trainable), sep="/")
  trained = {k for k, v in labels.items() if v == "train"}
  assert {"encoder/relative_attention_bias/embedding",
          "decoder/relative_attention_bias/embedding",
          "encoder/layer_0/mlp/zeroth_bias", "decoder/layer_0/mlp/zeroth_bias",
          "encoder/layer_0/mlp_norm/scale", "decoder/final_norm/scale"} <= trained
  assert not any(k.endswith("kernel") or k.startswith("token_embedder") for k in trained)


@pytest.mark.parametrize("key,value", [
    ("optimizer.lr_update_every", 0), ("optimizer.lr_update_every", 10**9),
    ("input.randaugment_scale", "timm10"), ("input.mix_targets", "argmax"),
    ("input.repeated_augmentation", 0), ("model.attention_dropout_rate", 1.0),
    ("text.document_separator", "newline")])
def test_recipe_keys_are_validated(key, value):
  c = config("t5_c4", "tiny") if key.split(".")[0] in ("model", "text") else config(
      "default")
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError) as error:
    config_schema.validate(c)
  lines = str(error.value).splitlines()
  assert len(lines) == 2 and key in lines[0] and lines[1].startswith("Fix:")


def test_tiny_configs_have_the_recipe_keys_at_their_measured_defaults():
  """The tiny configs run as before unless a key is passed (their README numbers stay
  reproducible); the keys reach them."""
  digits, t5_tiny = config("default"), config("t5_c4", "tiny")
  assert (digits.input.randaugment_scale, digits.input.mix_targets,
          digits.input.repeated_augmentation) == ("big_vision", "soft", 1)
  assert digits.optimizer.lr_update_every == t5_tiny.optimizer.lr_update_every == 1
  for c in (digits, t5_tiny):
    c.optimizer.lr_update_every = 100
    config_schema.validate(c)


@pytest.mark.parametrize("attention_init,q_std,q_bound,out_std,out_bound", [
    # torch MultiheadAttention at width 768: Xavier uniform over the stacked [2304, 768]
    # q/k/v matrix, bound sqrt(6 / 3072); out projection U(+-1/sqrt(768)).
    ("torch", math.sqrt(2 / 3072), math.sqrt(6 / 3072), 1 / math.sqrt(3 * 768),
     1 / math.sqrt(768)),
    # Xavier uniform on each [768, 768] projection.
    ("xavier", math.sqrt(1 / 768), math.sqrt(3 / 768), math.sqrt(1 / 768),
     math.sqrt(3 / 768))])
def test_vit_attention_init(attention_init, q_std, q_bound, out_std, out_bound):
  """ViT-B's attention kernels at init, measured on a one-block ViT of width 768 (the
  official model: std 0.0255 for q/k/v, 0.0208 for the output; ours before: 0.0361)."""
  c = config("vit_imagenet")
  assert c.model.attention_init == "torch"  # The official recipe's.
  c.model.update(dict(num_layers=1, mlp_dim=64, attention_init=attention_init,
                      dtype="float32"))
  c.image_size = 32
  params = jax.jit(lambda: models.build_model(c).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))()["params"]
  attention = nn.unbox(params)["block_0"]["attention"]
  for name in ("query", "key", "value", "out"):
    kernel = np.asarray(attention[name]["kernel"])
    std, bound = (out_std, out_bound) if name == "out" else (q_std, q_bound)
    assert kernel.size == 768 * 768
    np.testing.assert_allclose(kernel.std(), std, rtol=0.01)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    np.testing.assert_array_equal(attention[name]["bias"], 0.0)


# ------------------------------------------------------ every value of the official table
# docs/official_recipes.md, value by value: a config that drifts from its table fails here.
VIT_IMAGENET = {
    "dataset": "imagenet2012", "num_classes": 1000, "image_size": 224,
    "model.patch_size": 16, "model.hidden_size": 768, "model.num_layers": 12,
    "model.num_heads": 12, "model.mlp_dim": 3072, "model.attention_init": "torch",
    "model.dtype": "bfloat16",
    "batch_size": 2048, "num_steps": 300 * 625,
    "optimizer.name": "adamw", "optimizer.learning_rate": 3e-3, "optimizer.b1": 0.9,
    "optimizer.b2": 0.999, "optimizer.weight_decay": 0.3,
    "optimizer.weight_decay_exclude": "", "optimizer.grad_clip_norm": 1.0,
    "optimizer.schedule": "cosine", "optimizer.warmup_steps": 0,
    "optimizer.lr_update_every": 625,
    "input.crop": "inception", "input.crop_sampler": "torchvision", "input.flip": True,
    "input.randaugment_layers": 2, "input.randaugment_magnitude": 9,
    "input.randaugment_scale": "torchvision", "input.mixup_alpha": 0.2,
    "input.cutmix_alpha": 1.0, "input.mix_targets": "hard", "input.label_smoothing": 0.11,
    "input.repeated_augmentation": 3, "input.eval_resize": 256,
    "sparsity.projection_timing": "before_update", "sparsity.zeroth_bias_clipping": 0.1,
    "sparsity.weight_noise": 0.0, "finetune.lora_rank": 0,
}
VIT_VARIANTS = {
    "sparsified": {"sparsity.activation": "jsrelu",
                   "sparsity.zeroth_bias_position": "mlp_output",
                   "sparsity.restricted_norm": True, "sparsity.norm_projection": "clamp"},
    "vanilla": {"sparsity.activation": "relu", "sparsity.zeroth_bias_position": "none",
                "sparsity.restricted_norm": False},
    "finetune": {"sparsity.activation": "mixed", "sparsity.activation_mixing_steps": 0,
                 "sparsity.zeroth_bias_position": "mlp_output",
                 "sparsity.restricted_norm": True, "sparsity.norm_projection": "uplift",
                 "sparsity.uplift_steps": 5 * 625, "num_steps": 15 * 625,
                 "finetune.lora_rank": 192},
}
T5_BASE = {
    "dataset": "c4/en", "model.vocab_size": 32128, "model.d_model": 768,
    "model.num_heads": 12, "model.head_dim": 64, "model.d_ff": 3072,
    "model.num_encoder_layers": 12, "model.num_decoder_layers": 12,
    "model.relative_attention_num_buckets": 32,
    "model.relative_attention_max_distance": 128, "model.dropout_rate": 0.1,
    "model.attention_dropout_rate": 0.1, "model.dtype": "float32",
    "model.tie_embeddings": True,
    "batch_size": 256, "num_steps": 100_000, "metrics_batch_size": 32,
    "optimizer.name": "adamw", "optimizer.learning_rate": 0.01, "optimizer.b1": 0.9,
    "optimizer.b2": 0.999, "optimizer.weight_decay": 0.001,
    "optimizer.weight_decay_exclude": "bias", "optimizer.grad_clip_norm": 1.0,
    "optimizer.schedule": "inverse_sqrt", "optimizer.warmup_steps": 10_000,
    "optimizer.lr_update_every": 1,
    "text.inputs_length": 512, "text.targets_length": 114, "text.noise_density": 0.15,
    "text.mean_noise_span_length": 3.0, "text.document_separator": "eos",
    "sparsity.projection_timing": "after_update", "sparsity.zeroth_bias_clipping": 0.1,
    "sparsity.weight_noise": 0.0, "sparsity.activation": "jsrelu",
    "sparsity.zeroth_bias_position": "mlp_output", "sparsity.restricted_norm": True,
    "sparsity.norm_projection": "clamp", "finetune.lora_rank": 0,
}
T5_FINETUNE = {
    **T5_BASE, "model.tie_embeddings": False, "num_steps": 10_000,
    "optimizer.warmup_steps": 1000, "metrics_batch_size": 16,
    "sparsity.activation": "mixed", "sparsity.activation_mixing_steps": 3000,
    "sparsity.norm_projection": "uplift", "sparsity.uplift_steps": 3000,
    "finetune.lora_rank": 192,
}


def _pinned(c, expected):
  flat = config_schema.flatten(c.to_dict())
  return {key: flat[key] for key in expected}


def _param_paths(c, **model):
  """'/'-joined param paths of `c`'s model at tiny widths (the same names)."""
  c.model.update(model)  # c is a fresh config: changing it changes no other test.
  if c.model.name == "vit":
    c.image_size = 8
    inputs = (jnp.zeros((1, 8, 8, 3)),)
  else:
    inputs = (jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  shapes = jax.eval_shape(lambda: models.build_model(c).init(
      jax.random.key(0), *inputs, train=False))["params"]
  return ["/".join(p) for p in traverse_util.flatten_dict(nn.unbox(shapes))]


def _trained_and_adapted(c, paths):
  params = {p: np.zeros(1) for p in paths}
  tree = traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in params.items()})
  labels = traverse_util.flatten_dict(lora.trainable_labels(tree, c.finetune.trainable),
                                      sep="/")
  adapted = {p for p in paths if lora.path_predicate(c.finetune.lora_targets)(
      tuple(p.split("/")), ())}
  return {p for p, v in labels.items() if v == "train"}, adapted


VIT_TINY = dict(patch_size=4, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16)
T5_TINY = dict(vocab_size=32, d_model=8, num_heads=2, head_dim=4, d_ff=16,
               num_encoder_layers=1, num_decoder_layers=1, max_len=8)


@pytest.mark.parametrize("variant", ["sparsified", "vanilla", "finetune"])
def test_vit_imagenet_is_the_official_table(variant):
  """configs/vit_imagenet.py (no argument = sparsified), each variant, against
  docs/official_recipes.md's ViT table: every value, weight decay on every parameter,
  the finetune's LoRA on every dense kernel and what trains."""
  c = config("vit_imagenet", None if variant == "sparsified" else variant)
  config_schema.validate(c)
  expected = {**VIT_IMAGENET, **VIT_VARIANTS[variant]}
  assert _pinned(c, expected) == expected
  paths = _param_paths(c, **VIT_TINY)
  assert not any(re.search(c.optimizer.weight_decay_exclude, p) for p in paths
                 if c.optimizer.weight_decay_exclude)  # Decay on every parameter.
  if variant == "finetune":
    trained, adapted = _trained_and_adapted(c, paths)
    # Official: loralib on every Linear (MLP, head) and on the attention's in/out
    # projections; the patch embedding (a conv) has none.
    assert adapted == {p for p in paths if p.endswith("/kernel")}
    assert "embedding_kernel" in paths and "embedding_kernel" not in adapted
    # Trained: every bias (loralib's bias='all'), the LayerNorm scales, zeroth biases.
    assert trained == {p for p in paths if p.endswith(("bias", "scale"))}
    assert "block_0/mlp/zeroth_bias" in trained and "embedding_bias" in trained


def test_vit_imagenet_sparsified_default_is_the_sparsified_variant():
  assert config("vit_imagenet").to_dict() == config("vit_imagenet", "sparsified").to_dict()


@pytest.mark.parametrize("variant", ["sparsified", "vanilla"])
def test_t5_base_is_the_official_table(variant):
  """configs/t5_c4.py:base against the T5 table: every value, and the decay exemption
  (every parameter whose name holds 'bias': zeroth biases, relative attention bias
  tables; the norm scales are decayed)."""
  c = config("t5_c4", f"base,{variant}")
  config_schema.validate(c)
  expected = dict(T5_BASE)
  if variant == "vanilla":
    expected.update({"sparsity.activation": "relu", "sparsity.zeroth_bias_position": "none",
                     "sparsity.restricted_norm": False})
  assert _pinned(c, expected) == expected
  paths = _param_paths(c, **T5_TINY)
  exempt = {p for p in paths if re.search(c.optimizer.weight_decay_exclude, p)}
  assert exempt == {p for p in paths if "bias" in p}
  assert "encoder/relative_attention_bias/embedding" in exempt
  assert "encoder/layer_0/mlp_norm/scale" not in exempt
  if variant == "sparsified":
    assert "encoder/layer_0/mlp/zeroth_bias" in exempt


def test_t5_base_finetune_is_the_official_table():
  """configs/t5_c4.py:base,finetune against the T5 finetune row: LoRA r 192 on every
  dense kernel and on the untied output, training LoRA, norm scales and every '*bias*'
  parameter; mixing and uplift over 3000 of 10,000 steps after 1000 warmup."""
  c = config("t5_c4", "base,finetune")
  config_schema.validate(c)
  assert _pinned(c, T5_FINETUNE) == T5_FINETUNE
  paths = _param_paths(c, **T5_TINY)
  trained, adapted = _trained_and_adapted(c, paths)
  assert adapted == {p for p in paths if p.endswith("/kernel")}
  assert "lm_head/kernel" in adapted
  assert trained == {p for p in paths if "bias" in p or p.endswith("scale")}
  assert "token_embedder/embedding" not in trained | adapted


def test_t5_official_vocabulary_size_is_a_key_away():
  """The official run's embedding has len(tokenizer) = 32,100 rows; the config keeps
  HF t5-base's padded 32,128 (its published parameter count), and 32,100 builds with
  28 * 768 fewer parameters."""
  count = lambda c: sum(np.prod(s.shape) for s in jax.tree.leaves(jax.eval_shape(
      lambda: models.build_model(c).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                         jnp.ones((1, 4), jnp.int32), train=False)
  )["params"]))
  padded = config("t5_c4", "base,vanilla")
  official = config("t5_c4", "base,vanilla")
  official.model.vocab_size = 32_100
  config_schema.validate(official)
  assert count(padded) == 222_903_552
  assert count(padded) - count(official) == 28 * 768


def _keys_table():
  """(key, official value, config file, argument) per row of docs/official_recipes.md's
  table of the keys that choose."""
  with open(os.path.join(REPO, "docs", "official_recipes.md")) as f:
    doc = f.read()
  table = doc.split("## The keys that choose")[1].split("\n\n")[2]
  rows = []
  for line in table.splitlines()[2:]:
    cells = [c.strip().replace("\0", "|")
             for c in line.replace("\\|", "\0").strip("|").split(" | ")]
    key, _, official, where = cells
    value = ast.literal_eval(re.search(r"`([^`]*)`", official).group(1))
    name, _, arg = re.search(r"`([^`]*)`", where).group(1).partition(":")
    rows.append((key.strip("`"), value, name.removesuffix(".py"), arg or None))
  return rows


def test_the_keys_table_is_what_the_configs_set():
  """Every row of the keys table: the config it names has the official value."""
  rows = _keys_table()
  assert len(rows) >= 15
  assert {k for k, *_ in rows} >= {"input.repeated_augmentation", "input.crop_sampler",
                                   "model.attention_init", "model.tie_embeddings",
                                   "sparsity.projection_timing"}
  for key, value, name, arg in rows:
    flat = config_schema.flatten(config(name, arg).to_dict())
    assert flat[key] == value, (key, name, arg)
