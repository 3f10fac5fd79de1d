"""Block-sparse MLP kernels for GPU (Triton backend), reading the block mask in-kernel.

Same meaning as `sparse_mlp_reference`. Pallas' GPU backends have no scalar prefetch
and no data-dependent grids, so each program owns one output tile, loops over the
contraction tiles itself, reads the block mask from a ref and loads and multiplies a
block only under `lax.cond` when it is nonzero: zero blocks cost one mask read.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparse_jax.kernels.tiles import HiddenMap, Tiles

_F32 = jnp.float32
# Selects the Triton backend (Mosaic GPU would stage whole-row blocks in shared memory).
_TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


def _whole(shape):
  """BlockSpec of a whole (small) array, the same in every program."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _loop_nonzero(count, nonzero, block, init):
  """sum of block(t) over t < count with nonzero(t), skipping the rest."""
  def body(t, acc):
    return jax.lax.cond(nonzero(t), lambda a: a + block(t), lambda a: a, acc)
  return jax.lax.fori_loop(0, count, body, init)


def row_sparse_matmul(lhs, rhs, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                      rhs_transposed: bool, out_dtype, interpret=False) -> jax.Array:
  """out[I, J] = sum_{K: mask[I, K]} fn(lhs[I, K]) @ R[K, J]; R = rhs.T if transposed."""
  bm, bk, bn = tiles.tokens, tiles.units, tiles.features
  m, kdim = lhs.shape
  n = rhs.shape[0] if rhs_transposed else rhs.shape[1]
  flags = mask.astype(jnp.int32)

  def kernel(flag_ref, mix_ref, lhs_ref, rhs_ref, out_ref):
    i = pl.program_id(0)

    def block(t):
      units = pl.ds(t * bk, bk)
      h = fn(lhs_ref[:, units], mix_ref[0])
      if rhs_transposed:
        return jax.lax.dot_general(h, rhs_ref[:, units].astype(_F32),
                                   (((1,), (1,)), ((), ())), preferred_element_type=_F32)
      return jnp.dot(h, rhs_ref[units, :].astype(_F32), preferred_element_type=_F32)

    acc = _loop_nonzero(kdim // bk, lambda t: flag_ref[i, t] > 0, block,
                        jnp.zeros((bm, bn), _F32))
    out_ref[...] = acc.astype(out_ref.dtype)

  if rhs_transposed:
    rhs_spec = pl.BlockSpec((bn, kdim), lambda i, j: (j, 0))
  else:
    rhs_spec = pl.BlockSpec((kdim, bn), lambda i, j: (0, j))
  return pl.pallas_call(
      kernel, grid=(m // bm, n // bn),
      in_specs=[_whole(flags.shape), _whole(mixing.shape),
                pl.BlockSpec((bm, kdim), lambda i, j: (i, 0)), rhs_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=_TRITON, interpret=interpret, name="row_sparse_matmul",
  )(flags, mixing, lhs, rhs)


def col_sparse_matmul(lhs, rhs, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                      out_dtype, interpret=False) -> jax.Array:
  """out[K, J] = sum_{I: mask[I, K]} fn(lhs[I, K])^T @ rhs[I, J]."""
  bm, bk, bn = tiles.tokens, tiles.units, tiles.features
  m, kdim = lhs.shape
  n = rhs.shape[1]
  flags = mask.astype(jnp.int32)

  def kernel(flag_ref, mix_ref, lhs_ref, rhs_ref, out_ref):
    k = pl.program_id(0)

    def block(t):
      tokens = pl.ds(t * bm, bm)
      h = fn(lhs_ref[tokens, :], mix_ref[0])
      return jax.lax.dot_general(h, rhs_ref[tokens, :].astype(_F32),
                                 (((0,), (0,)), ((), ())), preferred_element_type=_F32)

    acc = _loop_nonzero(m // bm, lambda t: flag_ref[t, k] > 0, block,
                        jnp.zeros((bk, bn), _F32))
    out_ref[...] = acc.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel, grid=(kdim // bk, n // bn),
      in_specs=[_whole(flags.shape), _whole(mixing.shape),
                pl.BlockSpec((m, bk), lambda k, j: (0, k)),
                pl.BlockSpec((m, bn), lambda k, j: (0, j))],
      out_specs=pl.BlockSpec((bk, bn), lambda k, j: (k, j)),
      out_shape=jax.ShapeDtypeStruct((kdim, n), out_dtype),
      compiler_params=_TRITON, interpret=interpret, name="col_sparse_matmul",
  )(flags, mixing, lhs, rhs)


def masked_grad_matmul(z, dy, w2, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                       out_dtype, interpret=False) -> jax.Array:
  """out[I, K] = mask[I, K] ? fn(z[I, K]) * (dy[I, :] @ w2[K, :]^T) : 0."""
  bm, bk, bn = tiles.tokens, tiles.units, tiles.features
  m, kdim = z.shape
  n = dy.shape[1]
  flags = mask.astype(jnp.int32)

  def kernel(flag_ref, mix_ref, z_ref, dy_ref, w2_ref, out_ref):
    i, k = pl.program_id(0), pl.program_id(1)

    def nonzero_block():
      def body(t, acc):
        features = pl.ds(t * bn, bn)
        return acc + jax.lax.dot_general(
            dy_ref[:, features].astype(_F32), w2_ref[:, features].astype(_F32),
            (((1,), (1,)), ((), ())), preferred_element_type=_F32)
      da = jax.lax.fori_loop(0, n // bn, body, jnp.zeros((bm, bk), _F32))
      return fn(z_ref[...], mix_ref[0]) * da

    grad = jax.lax.cond(flag_ref[i, k] > 0, nonzero_block,
                        lambda: jnp.zeros((bm, bk), _F32))
    out_ref[...] = grad.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel, grid=(m // bm, kdim // bk),
      in_specs=[_whole(flags.shape), _whole(mixing.shape),
                pl.BlockSpec((bm, bk), lambda i, k: (i, k)),
                pl.BlockSpec((bm, n), lambda i, k: (i, 0)),
                pl.BlockSpec((bk, n), lambda i, k: (k, 0))],
      out_specs=pl.BlockSpec((bm, bk), lambda i, k: (i, k)),
      out_shape=jax.ShapeDtypeStruct((m, kdim), out_dtype),
      compiler_params=_TRITON, interpret=interpret, name="masked_grad_matmul",
  )(flags, mixing, z, dy, w2)
