"""Post-update projections of the sparsity modules (pure, elementwise).

* zeroth-bias box: |b| <= c * |gamma|, gamma = scale of the LayerNorm before that MLP,
  broadcast over the position axis of b.
* restricted LayerNorm, from scratch: gamma <- max(gamma, 1) (signed).
* restricted LayerNorm, finetuning: |gamma| <- max(|gamma|, min(step / T_up, 1)), sign
  kept, sign(0) = +1, so an uplift never flips a scale and a zero scale grows positive.
"""
import jax
import jax.numpy as jnp


def clip_zeroth_bias(bias: jax.Array, norm_scale: jax.Array,
                     clipping: float | None) -> jax.Array:
  """Projects `bias` [positions, d] onto the box |b| <= clipping * |norm_scale| [d]."""
  if clipping is None:
    return bias
  bound = clipping * jnp.abs(norm_scale).astype(bias.dtype)
  return jnp.clip(bias, -bound, bound)


def clamp_norm_scale(scale: jax.Array, minimum: float = 1.0) -> jax.Array:
  """gamma <- max(gamma, minimum): the from-scratch restricted LayerNorm."""
  return jnp.maximum(scale, jnp.asarray(minimum, scale.dtype))


def uplift_coefficient(step: jax.Array | int, uplift_steps: int) -> jax.Array:
  """min(step / T_up, 1); T_up = 0 means the full bound of 1 from step 0."""
  if uplift_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / uplift_steps, 1.0)


def uplift_norm_scale(scale: jax.Array, step: jax.Array | int,
                      uplift_steps: int) -> jax.Array:
  """|gamma| <- max(|gamma|, min(step / T_up, 1)) keeping the sign (sign(0) = +1)."""
  floor = uplift_coefficient(step, uplift_steps).astype(scale.dtype)
  sign = jnp.where(scale >= 0, 1, -1).astype(scale.dtype)
  return sign * jnp.maximum(jnp.abs(scale), floor)
