"""The T5 model: exact T5-Base size, masks, relative positions, sparsity modules."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sparse_jax import metrics, tasks
from sparse_jax.config_schema import apply_variant
from sparse_jax.models import build_model
from sparse_jax.models import t5 as t5_lib
from sparse_jax.models.t5 import T5, T5Config, relative_position_buckets

TINY = T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                num_encoder_layers=2, num_decoder_layers=2, max_len=12)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


class Jitted:
  """A T5 whose init/apply are jitted: eager Linen on CPU is op-by-op and slow."""

  def __init__(self, cfg: T5Config):
    self.module = T5(cfg)
    self.apply = jax.jit(self.module.apply, static_argnames=("train", "mutable"))


@functools.lru_cache(maxsize=None)  # Tests share compiled models and params.
def init(cfg: T5Config, enc_len=12, dec_len=6):
  model = Jitted(cfg)
  params = jax.jit(model.module.init, static_argnames="train")(
      jax.random.key(0), jnp.ones((2, enc_len), jnp.int32),
      jnp.ones((2, dec_len), jnp.int32), train=False)["params"]
  return model, nn.unbox(params)


def tokens(seed, shape, vocab=64):
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


def test_t5_base_has_the_published_parameter_count():
  from configs import t5_c4
  for variant, expected in (("vanilla", 222_903_552),
                            # + one [512, 768] zeroth bias in each of 24 MLP blocks.
                            ("sparsified", 222_903_552 + 24 * 512 * 768)):
    config = t5_c4.get_config(f"base,{variant}")
    model = build_model(config)
    shapes = jax.eval_shape(lambda m=model: m.init(
        jax.random.key(0), jnp.ones((1, 512), jnp.int32), jnp.ones((1, 114), jnp.int32),
        train=False))
    assert count(shapes["params"]) == expected, variant


def test_relative_position_buckets_match_t5():
  bidirectional = relative_position_buckets(1, 300, bidirectional=True, num_buckets=32,
                                            max_distance=128)[0]
  # Keys after the query use buckets 16..31; exact up to distance 7, then logarithmic.
  assert list(bidirectional[:9]) == [0, 17, 18, 19, 20, 21, 22, 23, 24]
  # Distance 20: 8 + int(log(20 / 8) / log(128 / 8) * 8) = 10, on the "after" side.
  assert bidirectional[20] == 16 + 10
  assert bidirectional[299] == 31  # Beyond max_distance: the last bucket.
  causal = relative_position_buckets(300, 1, bidirectional=False, num_buckets=32,
                                     max_distance=128)[:, 0]
  assert list(causal[:17]) == list(range(16)) + [16]
  assert causal[20] == 16 + int(np.log(20 / 16) / np.log(128 / 16) * 16)
  assert causal[299] == 31
  future = relative_position_buckets(1, 5, bidirectional=False, num_buckets=32,
                                     max_distance=128)[0]
  assert list(future) == [0] * 5  # Future keys all share bucket 0 (they are masked).


def test_decoder_is_causal():
  model, params = init(TINY)
  enc, dec = tokens(1, (2, 12)), tokens(2, (2, 6))
  logits = model.apply({"params": params}, enc, dec, train=False)
  changed = dec.at[:, 4].set((dec[:, 4] + 7) % 63 + 1)
  logits2 = model.apply({"params": params}, enc, changed, train=False)
  np.testing.assert_allclose(logits[:, :4], logits2[:, :4], atol=1e-5)
  assert not np.allclose(logits[:, 4:], logits2[:, 4:], atol=1e-3)


def test_encoder_padding_is_masked():
  model, params = init(TINY)
  enc, dec = tokens(3, (2, 12)), tokens(4, (2, 6))
  padded = enc.at[:, 8:].set(0)
  logits = model.apply({"params": params}, padded, dec, train=False)
  # The decoder sees nothing of the padded positions...
  trimmed = model.apply({"params": params}, padded[:, :8], dec, train=False)
  np.testing.assert_allclose(logits, trimmed, atol=1e-4)
  # ...and real tokens do matter.
  other = model.apply({"params": params}, padded.at[:, 3].set(5), dec, train=False)
  assert not np.allclose(logits, other, atol=1e-3)


def test_sparsified_t5_has_the_sparsity_modules_in_every_mlp():
  cfg = T5Config(**{**TINY.__dict__, "activation": "jsrelu",
                    "zeroth_bias_position": "mlp_output", "weight_noise": 0.1})
  model, params = init(cfg)
  flat = traverse_util.flatten_dict(params)
  biases = sorted("/".join(p) for p in flat if p[-1] == "zeroth_bias")
  assert biases == [f"{s}/layer_{i}/mlp/zeroth_bias" for s in ("decoder", "encoder")
                    for i in range(2)]
  assert all(flat[tuple(b.split("/"))].shape == (12, 32) for b in biases)
  # Weight noise on the first dense only (T5).
  assert t5_lib._mlp(cfg).weight_noise == (0.1, 0.0)  # pylint: disable=protected-access
  # No biases anywhere but the zeroth biases and relative positions; norms are RMS.
  assert not [p for p in flat if p[-1] == "bias"]
  # The decoder (6 tokens) uses the first rows of its 12-row table only.
  enc, dec = tokens(5, (2, 12)), tokens(6, (2, 6))

  def loss(p):
    return jnp.sum(model.apply({"params": p}, enc, dec, train=False) ** 2)

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
  g = grads[("decoder", "layer_1", "mlp", "zeroth_bias")]
  assert np.abs(g[:6]).sum() > 0 and np.abs(g[6:]).sum() == 0
  assert np.abs(grads[("encoder", "layer_1", "mlp", "zeroth_bias")]).min(axis=1).max() > 0


def test_weight_noise_and_dropout_only_in_training_with_rngs():
  cfg = T5Config(**{**TINY.__dict__, "weight_noise": 0.5, "dropout_rate": 0.1})
  model, params = init(cfg)
  enc, dec = tokens(7, (2, 12)), tokens(8, (2, 6))
  clean = model.apply({"params": params}, enc, dec, train=False)
  rngs = {"weight_noise": jax.random.key(1), "dropout": jax.random.key(2)}
  noisy = model.apply({"params": params}, enc, dec, train=True, rngs=rngs)
  again = model.apply({"params": params}, enc, dec, train=True, rngs=rngs)
  assert not np.allclose(clean, noisy, atol=1e-3)
  np.testing.assert_array_equal(noisy, again)  # Deterministic given the rngs.
  with pytest.raises(Exception, match="dropout"):  # Dropout needs its rng in training.
    model.apply({"params": params}, enc, dec, train=True)


def test_span_corruption_task_metrics_per_stack_over_real_tokens():
  cfg = T5Config(**{**TINY.__dict__, "activation": "jsrelu"})
  model, params = init(cfg)
  enc = tokens(9, (2, 12)).at[1, 6:].set(0)
  targets = tokens(10, (2, 6)).at[1, 4:].set(0)
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
           "decoder_input_tokens": jnp.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(jnp.float32)}
  task = tasks.SpanCorruption()
  logits, state = model.apply({"params": params}, *task.inputs(batch), train=False,
                              mutable=("intermediates",))
  out = metrics.activation_metrics(state["intermediates"], task.sparsity_masks(batch))
  expected = {f"activation_density/{s}/layer_{i}" for s in ("encoder", "decoder")
              for i in range(2)}
  expected |= {"activation_density/encoder/mean", "activation_density/decoder/mean",
               "activation_density/mean"}
  assert expected <= set(out)
  # The encoder density counts the 18 real tokens only.
  a = state["intermediates"]["encoder"]["layer_0"]["mlp"]["a"][0]
  real = np.concatenate([np.asarray(a[0]), np.asarray(a[1, :6])])
  np.testing.assert_allclose(out["activation_density/encoder/layer_0"],
                             np.mean(np.abs(real) > 1e-6), rtol=1e-6)
  layers = [out[f"activation_density/{s}/layer_{i}"] for s in ("encoder", "decoder")
            for i in range(2)]
  np.testing.assert_allclose(out["activation_density/mean"], np.mean(layers), rtol=1e-6)
  # Token cross-entropy ignores padded targets.
  ce = -jax.nn.log_softmax(logits)[..., :][
      jnp.arange(2)[:, None], jnp.arange(6)[None], targets]
  weights = np.asarray(batch["decoder_loss_weights"])
  np.testing.assert_allclose(task.loss(logits, batch),
                             np.sum(ce * weights) / weights.sum(), rtol=1e-5)


def test_build_model_reads_the_t5_config():
  from configs import t5_c4
  config = t5_c4.get_config("tiny,sparsified")
  model = build_model(config)
  assert isinstance(model, T5)
  assert model.cfg.activation == "jsrelu"
  assert model.cfg.zeroth_bias_position == "mlp_output"
  assert model.cfg.max_len == max(config.text.inputs_length, config.text.targets_length)
  vanilla = build_model(apply_variant(t5_c4.get_config("tiny"), "vanilla"))
  assert vanilla.cfg.activation == "relu" and vanilla.cfg.zeroth_bias_position is None


def test_t5_config_validation_names_the_fix():
  from configs import t5_c4
  from sparse_jax import config_schema
  from sparse_jax.errors import ConfigError
  config = t5_c4.get_config("tiny")
  config.model.d_model = 0
  with pytest.raises(ConfigError, match="config.model.d_model=0 is not valid: it must be an integer >= 1"):
    config_schema.validate(config)
  config = t5_c4.get_config("tiny")
  config.text.inputs_length = 100
  with pytest.raises(ConfigError, match="--config.model.max_len=100"):
    config_schema.validate(config)
  config.sparsity.zeroth_bias_position = "none"  # No table, no limit.
  config_schema.validate(config)
  with pytest.raises(ConfigError, match="'tiny' is repeated"):
    t5_c4.get_config("tiny,tiny")
