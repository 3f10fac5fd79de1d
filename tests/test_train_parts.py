"""Trainer pieces: schedules, weight-decay mask, projections wired by the config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import config_schema, train
from sparse_jax.errors import ConfigError


def _config(**optimizer):
  c = config_schema.base_config()
  c.num_steps = 100
  c.optimizer.update(optimizer)
  return c


def test_schedules():
  cos = train.learning_rate_schedule(_config(schedule="cosine", warmup_steps=10,
                                             learning_rate=1.0))
  assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
  assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
  inv = train.learning_rate_schedule(_config(schedule="inverse_sqrt", warmup_steps=25,
                                             learning_rate=0.01))
  assert float(inv(5)) == pytest.approx(0.002)
  assert float(inv(100)) == pytest.approx(0.01 * np.sqrt(25 / 100))
  const = train.learning_rate_schedule(_config(schedule="constant", warmup_steps=0,
                                               learning_rate=0.5))
  assert float(const(0)) == 0.5 and float(const(99)) == 0.5


def test_weight_decay_mask_exempts_matching_paths():
  params = {"mlp": {"wi": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}
  c = _config(weight_decay_exclude="bias", learning_rate=1.0, weight_decay=0.5,
              grad_clip_norm=0.0, schedule="constant", warmup_steps=0)
  c.sparsity.restricted_norm = False
  c.sparsity.zeroth_bias_position = "none"
  tx = train.make_optimizer(c)
  # Zero gradients: AdamW's only update is the decay, -lr * wd * param.
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["mlp"]["wi"]["kernel"], -0.5)  # Decayed.
  np.testing.assert_allclose(updates["mlp"]["wi"]["bias"], 0.0)      # Exempt.


def test_projection_rule_follows_variant():
  sparsified = config_schema.apply_variant(config_schema.base_config(), "sparsified")
  rule = train.projection_rule(sparsified)
  assert rule.norm_projection == "clamp" and rule.zeroth_bias_clipping == 0.1
  assert train.projection_rule(
      config_schema.apply_variant(config_schema.base_config(), "vanilla")) is None
  sparsified.sparsity.zeroth_bias_clipping = None
  assert train.projection_rule(sparsified).zeroth_bias_clipping is None


def test_config_validation_messages():
  c = config_schema.base_config()
  c.optimizer.warmup_steps = c.num_steps
  with pytest.raises(ConfigError, match="warmup_steps"):
    config_schema.validate(c)
  with pytest.raises(ConfigError, match="Unknown config argument"):
    config_schema.parse_variant("vanilla,sparsified")
  c = config_schema.base_config()
  c.mlp_impl = "triton"
  with pytest.raises(ConfigError, match="config.mlp_impl='triton'"):
    config_schema.validate(c)
  c.mlp_impl, c.mlp_backend, c.mlp_tiles = "pallas", "tpu", (8, 100, 128)
  with pytest.raises(ConfigError, match=r"not \(8, 128\)-aligned(.|\n)*Fix: pass"):
    config_schema.validate(c)
  c.mlp_tiles = (8, 128)
  with pytest.raises(ConfigError, match="must be 3 integers >= 1, or None"):
    config_schema.validate(c)


def test_finetuning_restricted_norm_keeps_a_frozen_bias_and_uplifts_scale():
  c = config_schema.apply_variant(config_schema.base_config(), "sparsified")
  c.model.num_layers = 1
  c.sparsity.norm_projection = "uplift"
  c.sparsity.uplift_steps = 4
  c.optimizer.warmup_steps = 0
  exp = train.build_experiment(c)
  state = train.init_state(exp)
  params = jax.tree.map(lambda x: x, state.params)
  params["block_0"]["mlp_norm"]["bias"] = jnp.full_like(params["block_0"]["mlp_norm"]["bias"], 0.3)
  params["block_0"]["mlp_norm"]["scale"] = jnp.full_like(params["block_0"]["mlp_norm"]["scale"], 0.1)
  state = train.TrainState(state.step, params, exp.tx.init(params))
  step_fn = train.make_train_step(exp, with_metrics=False)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
           "label": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]}
  state, _ = step_fn(state, train.global_batch(exp, batch))
  state, _ = step_fn(state, train.global_batch(exp, batch))
  norm = jax.device_get(state.params["block_0"]["mlp_norm"])
  np.testing.assert_array_equal(norm["bias"], np.float32(0.3))  # Frozen.
  assert np.all(np.abs(norm["scale"]) >= 0.5 - 1e-6)           # Uplift floor 2/4 after 2 steps.
  other = jax.device_get(state.params["block_0"]["attn_norm"]["bias"])
  assert np.any(other != 0)                                     # Other biases still train.
