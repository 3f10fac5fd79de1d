"""Trainer pieces: schedules, weight-decay mask, projections wired by the config."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
