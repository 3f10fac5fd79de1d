"""Block masks of an MLP's hidden activations, and the index lists kernels iterate over.

The hidden layer a = f(z) of a token tile x unit tile block is all zero, and so is its
derivative f'(z), exactly when no z in the block is "active": z > 0 for ReLU, z >= 0 for
J-SquaredReLU and the mixture (whose derivative is nonzero at z = 0). Such a block can
be skipped in the forward second matmul and in four of the five backward matmuls.

Plain jnp: the kernels, the benchmarks and the tests share these definitions.
"""
import jax
import jax.numpy as jnp

# A value below every activation's threshold: padding and dropped units are set to it.
INACTIVE = -1.0


def is_active(z: jax.Array, activation: str) -> jax.Array:
  """Where f(z) or f'(z) can be nonzero: z > 0 for 'relu', z >= 0 for 'jsrelu'/'mixed'."""
  if activation == "relu":
    return z > 0
  return z >= 0


def block_mask(active: jax.Array, block_rows: int, block_cols: int) -> jax.Array:
  """[rows, cols] bool -> [ceil(rows / br), ceil(cols / bc)] bool: any active per block.

  Partial edge blocks count only their real entries (padding is inactive).
  """
  rows, cols = active.shape
  pad_r, pad_c = -rows % block_rows, -cols % block_cols
  active = jnp.pad(active, ((0, pad_r), (0, pad_c)))
  r, c = active.shape[0] // block_rows, active.shape[1] // block_cols
  return active.reshape(r, block_rows, c, block_cols).any(axis=(1, 3))


def nonzero_block_indices(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each row of a block mask, the columns of its nonzero blocks, in order.

  Returns (indices [rows, cols] int32, counts [rows] int32). Row r's first counts[r]
  indices are its nonzero columns ascending; the rest repeat the last of them (0 when
  the row has none), so a kernel whose block index map reads them fetches nothing new
  on the steps it skips.
  """
  rows, cols = mask.shape
  order = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)
  counts = jnp.sum(mask, axis=1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[:, None], axis=1)
  last = jnp.where(counts[:, None] > 0, last, 0)
  steps = jnp.arange(cols, dtype=jnp.int32)[None, :]
  return jnp.where(steps < counts[:, None], order, last), counts


def nonzero_block_fraction(mask: jax.Array) -> jax.Array:
  """Share of blocks that are not all zero (the share of skippable work kept)."""
  return jnp.mean(mask.astype(jnp.float32))
