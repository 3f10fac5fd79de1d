"""Math of the sparsity modules: activations, mixing, projections, weight noise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.ops import activations as act
from sparse_jax.ops import projections as proj
from sparse_jax.ops import weight_noise


def test_jsrelu_values_and_derivative_around_zero():
  z = jnp.array([-2.0, -1e-3, 0.0, 1e-3, 2.0])
  np.testing.assert_allclose(act.jsrelu(z), [0, 0, 0, 1e-3 + 0.5e-6, 4.0], rtol=1e-6)
  grad = jax.vmap(jax.grad(act.jsrelu))(z)
  # f'(z) = (z + 1) 1[z >= 0]: 0 below zero, exactly 1 at zero (the jump), z + 1 above.
  np.testing.assert_allclose(grad, [0, 0, 1.0, 1.001, 3.0], rtol=1e-6)


def test_relu_derivative_is_zero_at_zero():
  assert float(jax.grad(act.relu)(0.0)) == 0.0
  assert float(jax.grad(act.relu)(0.5)) == 1.0


def test_mixing_schedule_and_mixture():
  assert float(act.mixing_coefficient(0, 100)) == 0.0
  assert float(act.mixing_coefficient(50, 100)) == 0.5
  assert float(act.mixing_coefficient(500, 100)) == 1.0
  assert float(act.mixing_coefficient(0, 0)) == 1.0  # T_mix = 0: direct swap.
  z = jnp.linspace(-2, 2, 9)
  np.testing.assert_allclose(act.mixed_activation(z, 0.0), act.relu(z))
  np.testing.assert_allclose(act.mixed_activation(z, 1.0), act.jsrelu(z))
  np.testing.assert_allclose(act.mixed_activation(z, 0.25),
                             0.75 * act.relu(z) + 0.25 * act.jsrelu(z), rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown activation"):
    act.apply_activation("swish", z)


def test_box_projection_is_relative_to_norm_scale():
  bias = jnp.array([[0.5, -0.5, 0.01], [-0.03, 0.2, -0.2]])
  gamma = jnp.array([1.0, -2.0, 0.5])  # |gamma| counts, not its sign.
  out = proj.clip_zeroth_bias(bias, gamma, 0.1)
  np.testing.assert_allclose(out, [[0.1, -0.2, 0.01], [-0.03, 0.2, -0.05]], rtol=1e-6)
  assert proj.clip_zeroth_bias(bias, gamma, None) is bias


def test_clamp_is_signed():
  gamma = jnp.array([-3.0, 0.0, 0.5, 1.0, 2.5])
  np.testing.assert_array_equal(proj.clamp_norm_scale(gamma), [1.0, 1.0, 1.0, 1.0, 2.5])


def test_uplift_keeps_sign_and_grows_linearly():
  gamma = jnp.array([-0.1, 0.0, 0.2, -2.0, 0.9])
  # step 50 of T_up = 100: floor 0.5 on |gamma|, sign kept, sign(0) = +1.
  np.testing.assert_allclose(proj.uplift_norm_scale(gamma, 50, 100),
                             [-0.5, 0.5, 0.5, -2.0, 0.9], rtol=1e-6)
  np.testing.assert_allclose(proj.uplift_norm_scale(gamma, 1000, 100),
                             [-1.0, 1.0, 1.0, -2.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(proj.uplift_norm_scale(gamma, 0, 100), gamma)


def test_weight_noise_std_matches_rho_rms_w_times_input_norm():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=(32, 16)) * 0.3, jnp.float32)
  x = jnp.asarray(rng.normal(size=(4096, 32)), jnp.float32)
  x = x * jnp.linspace(0.5, 3.0, 4096)[:, None]  # Tokens of very different norms.
  y = x @ kernel
  rho = 0.1
  noisy = weight_noise.dense_output_noise(y, x, kernel, rho, jax.random.key(1))
  added = noisy - y
  expected_std = rho * float(jnp.sqrt(jnp.mean(kernel ** 2))) * jnp.linalg.norm(x, axis=-1)
  standardized = added / expected_std[:, None]
  assert abs(float(jnp.std(standardized)) - 1.0) < 0.02
  assert abs(float(jnp.mean(standardized))) < 0.02
  # Off at eval (no rng) and with rho = 0.
  assert weight_noise.dense_output_noise(y, x, kernel, rho, None) is y
  assert weight_noise.dense_output_noise(y, x, kernel, 0.0, jax.random.key(1)) is y


def test_weight_noise_has_no_gradient_through_sigma_or_input_norm():
  kernel = jnp.ones((3, 2))
  x = jnp.ones((5, 3))

  def f(kernel, x):
    y = x @ kernel
    return jnp.sum(weight_noise.dense_output_noise(y, x, kernel, 0.5, jax.random.key(0)))

  g_kernel, g_x = jax.grad(f, argnums=(0, 1))(kernel, x)
  # Same gradients as the noise-free layer: the noise only shifts the forward value.
  clean_k, clean_x = jax.grad(lambda k, x: jnp.sum(x @ k), argnums=(0, 1))(kernel, x)
  np.testing.assert_allclose(g_kernel, clean_k)
  np.testing.assert_allclose(g_x, clean_x)


def test_per_step_kernel_noise_scale():
  kernel = jnp.full((256, 256), 2.0)
  noisy = weight_noise.perturb_kernel(kernel, 0.05, jax.random.key(0))
  assert abs(float(jnp.std(noisy - kernel)) - 0.05 * 2.0) < 0.005
  assert weight_noise.perturb_kernel(kernel, 0.05, None) is kernel
