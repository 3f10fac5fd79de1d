"""Plain jnp meaning of the three block-sparse MLP kernels; the kernels are tested to it.

All arrays are padded to tile multiples. `mask` [tokens/bm, units/bk] marks the blocks
of the hidden layer that are not all zero; masked-out blocks contribute nothing.

* row_sparse_matmul:  out[I, J] = sum over K with mask[I, K] of h(lhs[I, K]) @ R[K, J]
  (forward y = f(z) W2; backward dX = dZ W1^T with R = W1^T).
* col_sparse_matmul:  out[K, J] = sum over I with mask[I, K] of h(lhs[I, K])^T @ rhs[I, J]
  (dW2 = f(z)^T dY and dW1^T = dZ^T x).
* masked_grad_matmul: out[I, K] = mask[I, K] ? h'(z[I, K]) * (dy[I, :] @ w2[K, :]^T) : 0
  (dZ = f'(z) * (dY W2^T), computed only in nonzero blocks).
"""
import jax
import jax.numpy as jnp

from sparse_jax.kernels.tiles import HiddenMap, Tiles


def expand_mask(mask: jax.Array, rows: int, cols: int) -> jax.Array:
  """Block mask -> element mask of `rows` x `cols` per block."""
  return jnp.repeat(jnp.repeat(mask, rows, axis=0), cols, axis=1)


def row_sparse_matmul(lhs, rhs, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                      rhs_transposed: bool, out_dtype) -> jax.Array:
  keep = expand_mask(mask, tiles.tokens, tiles.units)
  h = jnp.where(keep, fn(lhs, mixing), 0.0)
  r = rhs.T if rhs_transposed else rhs
  return jnp.dot(h, r.astype(jnp.float32)).astype(out_dtype)


def col_sparse_matmul(lhs, rhs, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                      out_dtype) -> jax.Array:
  keep = expand_mask(mask, tiles.tokens, tiles.units)
  h = jnp.where(keep, fn(lhs, mixing), 0.0)
  return jnp.dot(h.T, rhs.astype(jnp.float32)).astype(out_dtype)


def masked_grad_matmul(z, dy, w2, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                       out_dtype) -> jax.Array:
  keep = expand_mask(mask, tiles.tokens, tiles.units)
  da = jnp.dot(dy.astype(jnp.float32), w2.astype(jnp.float32).T)
  return jnp.where(keep, fn(z, mixing) * da, 0.0).astype(out_dtype)
