"""Block-sparse MLP kernels for TPU (Mosaic), driven by scalar-prefetched block indices.

Same meaning as `sparse_mlp_reference`. The index lists from
`block_mask.nonzero_block_indices` are prefetched into SMEM before the grid runs, so the
BlockSpec index maps send the DMA engine only to nonzero blocks: a row with c of n
nonzero blocks loads c blocks, and its remaining n - c grid steps repeat the last index,
which the pipeline recognises and does not fetch again, and skip the matmul with
`pl.when`. This is the pattern of JAX's "Scalar Prefetch and Block-Sparse Computation"
guide, extended from one matmul to the three the MLP's forward and backward need.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparse_jax.kernels.block_mask import nonzero_block_indices
from sparse_jax.kernels.tiles import HiddenMap, Tiles

_F32 = jnp.float32


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _dense_cost(m: int, k: int, n: int, operands, out_dtype) -> pl.CostEstimate:
  """What XLA is told the kernel costs: the dense [m, k] x [k, n] matmul (an upper
  bound: zero blocks are skipped at run time, which no static count can know), so that
  the compiler's FLOP count and schedule see the MLP (a Pallas call is opaque to it)."""
  read = sum(int(a.size) * a.dtype.itemsize for a in operands)
  return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=read + m * n * jnp.dtype(out_dtype).itemsize)


def _accumulate(acc_ref, step, last, run, value_fn):
  """acc = 0 at step 0; acc += value_fn() where `run`; returns whether this is `last`."""
  @pl.when(step == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(run)
  def _():
    acc_ref[...] += value_fn()

  return step == last


def row_sparse_matmul(lhs, rhs, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                      rhs_transposed: bool, out_dtype, interpret=False) -> jax.Array:
  """out[I, J] = sum_{K: mask[I, K]} fn(lhs[I, K]) @ R[K, J]; R = rhs.T if transposed."""
  bm, bk, bn = tiles.tokens, tiles.units, tiles.features
  m, kdim = lhs.shape
  n = rhs.shape[0] if rhs_transposed else rhs.shape[1]
  grid = (m // bm, n // bn, kdim // bk)
  indices, counts = nonzero_block_indices(mask)

  def kernel(idx_ref, cnt_ref, mix_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
    i, s = pl.program_id(0), pl.program_id(2)

    def block():
      h = fn(lhs_ref[...], mix_ref[0])
      r = rhs_ref[...].astype(_F32)
      dims = (((1,), (1,)), ((), ())) if rhs_transposed else (((1,), (0,)), ((), ()))
      return jax.lax.dot_general(h, r, dims, preferred_element_type=_F32)

    done = _accumulate(acc_ref, s, grid[2] - 1, s < cnt_ref[i], block)

    @pl.when(done)
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  if rhs_transposed:
    rhs_spec = pl.BlockSpec((bn, bk), lambda i, j, s, idx, cnt, mix: (j, idx[i, s]))
  else:
    rhs_spec = pl.BlockSpec((bk, bn), lambda i, j, s, idx, cnt, mix: (idx[i, s], j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, s, idx, cnt, mix: (i, idx[i, s])),
                rhs_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, s, idx, cnt, mix: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), _F32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="row_sparse_matmul",
      cost_estimate=_dense_cost(m, kdim, n, (lhs, rhs), out_dtype),
  )(indices, counts, mixing, lhs, rhs)


def col_sparse_matmul(lhs, rhs, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                      out_dtype, interpret=False) -> jax.Array:
  """out[K, J] = sum_{I: mask[I, K]} fn(lhs[I, K])^T @ rhs[I, J]."""
  bm, bk, bn = tiles.tokens, tiles.units, tiles.features
  m, kdim = lhs.shape
  n = rhs.shape[1]
  grid = (kdim // bk, n // bn, m // bm)
  indices, counts = nonzero_block_indices(mask.T)

  def kernel(idx_ref, cnt_ref, mix_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
    k, s = pl.program_id(0), pl.program_id(2)

    def block():
      h = fn(lhs_ref[...], mix_ref[0])
      return jax.lax.dot_general(h, rhs_ref[...].astype(_F32), (((0,), (0,)), ((), ())),
                                 preferred_element_type=_F32)

    done = _accumulate(acc_ref, s, grid[2] - 1, s < cnt_ref[k], block)

    @pl.when(done)
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[pl.BlockSpec((bm, bk), lambda k, j, s, idx, cnt, mix: (idx[k, s], k)),
                pl.BlockSpec((bm, bn), lambda k, j, s, idx, cnt, mix: (idx[k, s], j))],
      out_specs=pl.BlockSpec((bk, bn), lambda k, j, s, idx, cnt, mix: (k, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), _F32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((kdim, n), out_dtype),
      compiler_params=_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="col_sparse_matmul",
      cost_estimate=_dense_cost(kdim, m, n, (lhs, rhs), out_dtype),
  )(indices, counts, mixing, lhs, rhs)


def masked_grad_matmul(z, dy, w2, mask, mixing, *, fn: HiddenMap, tiles: Tiles,
                       out_dtype, interpret=False) -> jax.Array:
  """out[I, K] = mask[I, K] ? fn(z[I, K]) * (dy[I, :] @ w2[K, :]^T) : 0."""
  bm, bk, bn = tiles.tokens, tiles.units, tiles.features
  m, kdim = z.shape
  n = dy.shape[1]
  grid = (m // bm, kdim // bk, n // bn)
  flags = mask.astype(jnp.int32)

  # A zero block keeps its dy / W2 block index at column 0: at most one fetch per zero
  # block instead of one per feature tile.
  def dy_index(i, k, j, flag, mix):
    return i, jnp.where(flag[i, k] > 0, j, 0)

  def w2_index(i, k, j, flag, mix):
    return k, jnp.where(flag[i, k] > 0, j, 0)

  def kernel(flag_ref, mix_ref, z_ref, dy_ref, w2_ref, out_ref, acc_ref):
    i, k, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nonzero = flag_ref[i, k] > 0

    def block():
      return jax.lax.dot_general(dy_ref[...].astype(_F32), w2_ref[...].astype(_F32),
                                 (((1,), (1,)), ((), ())), preferred_element_type=_F32)

    done = _accumulate(acc_ref, j, grid[2] - 1, nonzero, block)

    @pl.when(done)
    def _():
      grad = fn(z_ref[...], mix_ref[0]) * acc_ref[...]
      out_ref[...] = jnp.where(nonzero, grad, 0.0).astype(out_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid,
      in_specs=[pl.BlockSpec((bm, bk), lambda i, k, j, flag, mix: (i, k)),
                pl.BlockSpec((bm, bn), dy_index),
                pl.BlockSpec((bk, bn), w2_index)],
      out_specs=pl.BlockSpec((bm, bk), lambda i, k, j, flag, mix: (i, k)),
      scratch_shapes=[pltpu.VMEM((bm, bk), _F32)])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((m, kdim), out_dtype),
      compiler_params=_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="masked_grad_matmul",
      cost_estimate=_dense_cost(m, n, kdim, (z, dy, w2), out_dtype),
  )(flags, mixing, z, dy, w2)
