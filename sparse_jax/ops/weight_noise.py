"""Weight noise ("MagicSynapse") as pure functions.

For a dense layer y = W x + b, perturbing W by an independent Gaussian per token with
std sigma = rho * ||W||_F / sqrt(W.size) (rho times the RMS of W) adds to each output
token eps * sigma * ||x||_2, eps ~ N(0, I). Computing it on the output is exact in
distribution and costs O(tokens * d_out) instead of a per-token copy of W.
"""
import jax
import jax.numpy as jnp


def noise_scale(kernel: jax.Array, rho: float) -> jax.Array:
  """sigma = rho * rms(W), with no gradient through it."""
  kernel = jax.lax.stop_gradient(kernel).astype(jnp.float32)
  return rho * jnp.sqrt(jnp.mean(jnp.square(kernel)))


def dense_output_noise(y: jax.Array, x: jax.Array, kernel: jax.Array, rho: float,
                       rng: jax.Array | None) -> jax.Array:
  """Adds per-token weight noise to the output `y` [..., d_out] of `x` [..., d_in] @ W.

  `rng=None` (eval, or noise off) returns `y` unchanged. ||x|| carries no gradient, as in
  the official implementation: the noise perturbs the forward value, not the function
  being differentiated.
  """
  if rng is None or rho == 0:
    return y
  x_norm = jnp.linalg.norm(jax.lax.stop_gradient(x).astype(jnp.float32), axis=-1,
                           keepdims=True)
  eps = jax.random.normal(rng, y.shape, jnp.float32)
  return y + (eps * noise_scale(kernel, rho) * x_norm).astype(y.dtype)


def perturb_kernel(kernel: jax.Array, rho: float, rng: jax.Array | None) -> jax.Array:
  """Per-step variant: W + sigma * E, one draw of E for the whole step."""
  if rng is None or rho == 0:
    return kernel
  eps = jax.random.normal(rng, kernel.shape, jnp.float32)
  return kernel + (eps * noise_scale(kernel, rho)).astype(kernel.dtype)
