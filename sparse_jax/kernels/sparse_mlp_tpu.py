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
# Scalar memory of a TensorCore (v4, v5e, v5p, v6e: 1 MiB). The prefetched block tables
# live there; they are passed flat, since Mosaic pads a 2D SMEM array's rows to 128
# words (a [3152, 24] table of ViT-B/16's 25k tokens per chip in 8-token tiles takes
# 1.6 MB as 2D, 0.3 MB flat). Some of it holds the kernel's own scalars.
SMEM_BYTES = 2**20
_SMEM_RESERVED = 64 * 2**10


def check_block_tables(rows: int, cols: int, tiles: Tiles) -> None:
  """ValueError (with the fix) if the block tables of a [rows, cols] hidden layer in
  `tiles` do not fit in SMEM; checked before compiling."""
  words = (rows // tiles.tokens) * (cols // tiles.units) + max(rows // tiles.tokens,
                                                               cols // tiles.units) + 1
  if 4 * words > SMEM_BYTES - _SMEM_RESERVED:
    raise ValueError(
        f"The MLP kernels' block tables for {rows} tokens x {cols} units in tiles of "
        f"{tiles.tokens} x {tiles.units} take {4 * words / 2**10:,.0f} KiB of the "
        f"{(SMEM_BYTES - _SMEM_RESERVED) // 2**10} KiB of TPU scalar memory (SMEM) they "
        f"may use. Fix: larger token or unit tiles (e.g. --config.mlp_tiles='(256, 256, "
        f"256)'), or fewer tokens per chip.")


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
  steps = grid[2]
  indices, counts = nonzero_block_indices(mask)
  indices = indices.reshape(-1)  # Flat in SMEM: idx[i * steps + s].

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
    rhs_spec = pl.BlockSpec((bn, bk),
                            lambda i, j, s, idx, cnt, mix: (j, idx[i * steps + s]))
  else:
    rhs_spec = pl.BlockSpec((bk, bn),
                            lambda i, j, s, idx, cnt, mix: (idx[i * steps + s], j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=grid,
      in_specs=[pl.BlockSpec((bm, bk),
                             lambda i, j, s, idx, cnt, mix: (i, idx[i * steps + s])),
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
  steps = grid[2]
  indices, counts = nonzero_block_indices(mask.T)
  indices = indices.reshape(-1)  # Flat in SMEM: idx[k * steps + s].

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
      in_specs=[pl.BlockSpec((bm, bk),
                             lambda k, j, s, idx, cnt, mix: (idx[k * steps + s], k)),
                pl.BlockSpec((bm, bn),
                             lambda k, j, s, idx, cnt, mix: (idx[k * steps + s], j))],
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
  units = grid[1]
  flags = mask.astype(jnp.int32).reshape(-1)  # Flat in SMEM: flag[i * units + k].

  # A zero block keeps its dy / W2 block index at column 0: at most one fetch per zero
  # block instead of one per feature tile.
  def dy_index(i, k, j, flag, mix):
    return i, jnp.where(flag[i * units + k] > 0, j, 0)

  def w2_index(i, k, j, flag, mix):
    return k, jnp.where(flag[i * units + k] > 0, j, 0)

  def kernel(flag_ref, mix_ref, z_ref, dy_ref, w2_ref, out_ref, acc_ref):
    i, k, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nonzero = flag_ref[i * units + k] > 0

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
