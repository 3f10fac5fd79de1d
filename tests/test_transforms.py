"""Projections as an optax wrapper, per-step weight noise, and the metric functions."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_jax import metrics
from sparse_jax.transforms import projections, weight_noise


def _params():
  return {"block_0": {"mlp": {"zeroth_bias": jnp.full((3, 2), 0.5),
                              "wi": {"kernel": jnp.ones((2, 4))}},
                      "mlp_norm": {"scale": jnp.array([0.2, -3.0])}},
          "head": {"kernel": jnp.ones((2, 2))}}


def test_project_clamps_norm_then_boxes_bias():
  rule = projections.ProjectionRule(zeroth_bias_clipping=0.1, norm_projection="clamp")
  out = projections.project(_params(), 0, rule)
  # Signed clamp: -3 -> 1 (gamma >= 1, not |gamma| >= 1).
  np.testing.assert_allclose(out["block_0"]["mlp_norm"]["scale"], [1.0, 1.0])
  # Box uses the projected |gamma| = [1, 1]: 0.5 -> 0.1.
  np.testing.assert_allclose(out["block_0"]["mlp"]["zeroth_bias"], np.full((3, 2), 0.1),
                             rtol=1e-6)
  np.testing.assert_array_equal(out["head"]["kernel"], 1.0)


def test_missing_norm_for_zeroth_bias_is_an_error():
  params = {"mlp": {"zeroth_bias": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="no norm scale"):
    projections.project(params, 0, projections.ProjectionRule())


@pytest.mark.parametrize("make_tx", [lambda: optax.adamw(0.5), lambda: optax.sgd(0.7)])
def test_optax_wrapper_keeps_constraints_after_every_step(make_tx):
  rule = projections.ProjectionRule(zeroth_bias_clipping=0.1, norm_projection="uplift",
                                    uplift_steps=4)
  tx = projections.with_projections(make_tx(), rule)
  params = _params()
  state = tx.init(params)
  loss = lambda p: (jnp.sum(p["block_0"]["mlp_norm"]["scale"] ** 2)
                    - jnp.sum(p["block_0"]["mlp"]["zeroth_bias"]))
  for step in range(1, 7):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    gamma = params["block_0"]["mlp_norm"]["scale"]
    floor = min(step / 4, 1.0)
    assert np.all(np.abs(gamma) >= floor - 1e-6), (step, gamma)
    bias = params["block_0"]["mlp"]["zeroth_bias"]
    assert np.all(np.abs(bias) <= 0.1 * np.abs(gamma) + 1e-6)
  assert int(state.count) == 6
  # The negative scale was pulled toward 0 by the loss but never flipped sign.
  assert float(params["block_0"]["mlp_norm"]["scale"][1]) < 0


def test_wrapper_needs_params():
  tx = projections.with_projections(optax.sgd(0.1), projections.ProjectionRule())
  with pytest.raises(ValueError, match="needs params"):
    tx.update(_params(), tx.init(_params()))


def test_perturb_params_only_touches_selected_kernels():
  params = {"mlp": {"wi": {"kernel": jnp.ones((64, 64)), "bias": jnp.ones(64)}},
            "head": {"kernel": jnp.ones((64, 64))}}
  pred = weight_noise.kernel_path_predicate(r"mlp/")
  noisy = weight_noise.perturb_params(params, jax.random.key(0), 0.1, pred)
  assert abs(float(jnp.std(noisy["mlp"]["wi"]["kernel"] - 1.0)) - 0.1) < 0.01
  np.testing.assert_array_equal(noisy["mlp"]["wi"]["bias"], 1.0)
  np.testing.assert_array_equal(noisy["head"]["kernel"], 1.0)
  assert weight_noise.perturb_params(params, None, 0.1, pred) is params


def test_noisy_apply_is_identity_without_rng():
  apply_fn = lambda variables, x: x @ variables["params"]["mlp"]["kernel"]
  noisy_fn = weight_noise.noisy_apply(apply_fn, 0.1, weight_noise.kernel_path_predicate("mlp"))
  variables = {"params": {"mlp": {"kernel": jnp.eye(4)}}}
  x = jnp.ones((2, 4))
  np.testing.assert_array_equal(noisy_fn(variables, x), x)
  assert not np.allclose(noisy_fn(variables, x, rng=jax.random.key(0)), x)


def test_activation_and_gradient_metrics():
  a = jnp.array([[[0.0, 1.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 5e-7]]])  # [B=2, T=1, F=4]
  z = jnp.array([[[-1.0, 1.0, 0.0, 2.0]], [[-1.0, -2.0, -3.0, 1.0]]])
  inter = {"block_10": {"mlp": {"a": (a,), "z": (z,)}},
           "block_2": {"mlp": {"a": (a * 0,), "z": (z,)}}}
  out = metrics.activation_metrics(inter)
  # Natural order: block_2 is layer_0.
  assert float(out["activation_density/layer_0"]) == 0.0
  assert float(out["activation_density/layer_1"]) == pytest.approx(2 / 8)
  assert float(out["activation_density/mean"]) == pytest.approx(1 / 8)
  assert float(out["derivative_sparsity/layer_1"]) == pytest.approx(5 / 8)
  masked = metrics.activation_metrics(inter, mask=jnp.array([1.0, 0.0]))
  assert float(masked["activation_density/layer_1"]) == pytest.approx(0.5)
  grads = {"block_0": {"mlp": {"z": (jnp.array([[[1e-8, 1.0]]]),),
                               "y": (jnp.array([[[3.0, 4.0]]]),)}}}
  g = metrics.gradient_metrics(grads)
  assert float(g["gradient_sparsity_1e-06/layer_0"]) == 0.5
  assert float(g["gradient_sparsity_1e-09/layer_0"]) == 0.0
  assert float(g["output_gradient_norm/layer_0"]) == pytest.approx(5.0)


def test_parameter_and_classification_metrics():
  p = metrics.parameter_metrics(_params())
  assert float(p["zeroth_bias_abs/layer_0"]) == pytest.approx(0.5)
  assert float(p["norm_scale_abs/mean"]) == pytest.approx(1.6)
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
  c = metrics.classification_metrics(logits, jnp.array([0, 0, 1]), jnp.array([1.0, 1.0, 0.0]))
  assert float(c["accuracy"]) == pytest.approx(0.5)
  soft = metrics.classification_metrics(logits, jax.nn.one_hot(jnp.array([0, 0, 1]), 2))
  assert float(soft["accuracy"]) == pytest.approx(1 / 3)


def test_projection_before_update_lets_the_update_through_unprojected():
  rule = projections.ProjectionRule(zeroth_bias_clipping=None, norm_projection="clamp")
  params = {"mlp_norm": {"scale": jnp.array([0.5, 2.0])}}
  grads = {"mlp_norm": {"scale": jnp.array([1.0, 1.0])}}
  after = projections.with_projections(optax.sgd(0.25), rule)
  before = projections.with_projections(optax.sgd(0.25), rule, before_update=True)
  up_after, _ = after.update(grads, after.init(params), params)
  up_before, _ = before.update(grads, before.init(params), params)
  # After: clamp(p - 0.25) = [1, 1.75]. Before: clamp(p) - 0.25 = [0.75, 1.75].
  np.testing.assert_allclose(optax.apply_updates(params, up_after)["mlp_norm"]["scale"],
                             [1.0, 1.75])
  np.testing.assert_allclose(optax.apply_updates(params, up_before)["mlp_norm"]["scale"],
                             [0.75, 1.75])
