"""Activation-sparse MLP for decoding: a few tokens, only the active rows of W2 read.

The MLP is y = f(x W1 + b1) W2 + b2 with W1 [d_model, d_ff] and W2 [d_ff, d_model]. At
decode time the batch is small (1-8 tokens, as in T5 decoding), so both matmuls are
matrix-vector products bound by reading the weights, not by arithmetic. A dense step
reads W1 and W2 once each: 2 d_model d_ff weights. The hidden layer a = f(z) is zero
wherever no token of the batch is "active" (`block_mask.is_active`), and a zero entry
of a multiplies a whole row of W2, so only the rows of the union of the batch's active
units are needed. With p the share of units active for some token of the batch,
`mlp_decode` reads W1 fully (z must be computed to know which units are active) and p of
W2: (1 + p) d_model d_ff weights, so its speedup over the dense op is bounded by

    2 / (1 + p)        (1.98 at p = 1%, 1.82 at p = 10%, 1.33 at p = 50%).

Shapes must be static under jit, so the number of active units picks one of a few
static capacities with `jax.lax.switch`: the smallest capacity that holds them gathers
exactly that many rows of W2 (a row of the row-major W2 is contiguous), padded with an
inactive unit, whose a is exactly 0 for every activation, so padding adds exactly 0.
When more units are active than the largest capacity holds, a dense branch computes
a W2 as the plain MLP does. The result equals the dense MLP up to float summation
order, whatever the input.

Where the bound is not reached (measured on XLA:CPU, `benchmarks/mlp_decode.py`): the
active units are found by a prefix count and a scatter over all d_ff units, a few
tens of microseconds; for 1-2 tokens a fused kernel per token reads the rows once
(`_grouped_row_matvec`), but for more tokens they are gathered into a copy before the
dot (which is why their default capacities stop at GATHER_MAX_SHARE); and XLA:CPU's
small-batch matmul x W1 ([b, d_model] x [d_model, d_ff]) runs slower than a W2
([b, d_ff] x [d_ff, d_model]) for 2-8 tokens, so W1, which this op keeps, weighs more
than half of the dense op.
"""
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.kernels.block_mask import is_active
from sparse_jax.ops.activations import ActivationName, apply_activation

# Default capacities, as shares of d_ff: the branches `mlp_decode` switches between,
# 1/64 to 1/2 in steps of 2^(1/3), so padding adds at most ~26% to the rows gathered
# while each of the 16 branches adds to the compile time.
DEFAULT_CAPACITY_SHARES: tuple[float, ...] = tuple(2.0 ** (k / 3 - 6) for k in range(16))
# Capacities are rounded up to a multiple of this (vector width friendly).
CAPACITY_MULTIPLE = 8
# Rows of W2 one output row of the single-token kernel sums (see _grouped_row_matvec).
ROW_GROUP = 8
# Units per block of the prefix count (see exclusive_counts).
PREFIX_BLOCK = 32
# Up to this many tokens, each token reads the rows in a fused loop
# (_grouped_row_matvec); more tokens gather the rows into a copy, then dot.
FUSED_MAX_TOKENS = 2
# The copy stops paying near 40% of d_ff on XLA:CPU (768 x 3072, 4 tokens: 1.12x the
# dense op's speed at 25% union density, 0.87x at 50%), so for more than
# FUSED_MAX_TOKENS tokens the default capacities stop there and the dense branch runs
# past it.
GATHER_MAX_SHARE = 0.4


def default_capacities(d_ff: int, shares: Sequence[float] = DEFAULT_CAPACITY_SHARES,
                       multiple: int = CAPACITY_MULTIPLE, max_share: float = 1.0
                       ) -> tuple[int, ...]:
  """The static capacities for a hidden size `d_ff`: shares of it, rounded up.

  Capacities that reach d_ff are dropped (the dense branch covers them), and so are
  duplicates, so a tiny d_ff gets fewer branches.

  Args:
    d_ff: hidden size of the MLP.
    shares: capacities as shares of d_ff, ascending.
    multiple: each capacity is rounded up to a multiple of this.
    max_share: shares above this are dropped.

  Returns:
    Strictly increasing capacities, each in [1, d_ff).
  """
  caps = []
  for share in (s for s in shares if s <= max_share):
    cap = max(math.ceil(share * d_ff / multiple) * multiple, 1)
    if cap < d_ff and (not caps or cap > caps[-1]):
      caps.append(cap)
  return tuple(caps)


def capacities_for(d_ff: int, tokens: int) -> tuple[int, ...]:
  """The capacities `mlp_decode` uses when none are given, for `tokens` tokens.

  All of `default_capacities(d_ff)` for up to FUSED_MAX_TOKENS tokens; for more, those
  up to GATHER_MAX_SHARE of d_ff, past which the gather costs more than it saves.
  """
  max_share = 1.0 if tokens <= FUSED_MAX_TOKENS else GATHER_MAX_SHARE
  return default_capacities(d_ff, max_share=max_share)


def _check_capacities(capacities: Sequence[int], d_ff: int) -> tuple[int, ...]:
  caps = tuple(int(c) for c in capacities)
  if any(c < 1 or c >= d_ff for c in caps):
    raise ValueError(f"Capacities must lie in [1, d_ff={d_ff}); got {caps}.")
  if any(b <= a for a, b in itertools.pairwise(caps)):
    raise ValueError(f"Capacities must be strictly increasing; got {caps}.")
  return caps


def capacity_branch(num_active: jax.Array | int, capacities: Sequence[int]
                    ) -> jax.Array:
  """Index of the branch `mlp_decode` runs for `num_active` active units.

  Branch i < len(capacities) gathers capacities[i] rows: the smallest capacity holding
  `num_active`. Branch len(capacities) is the dense fallback.
  """
  caps = jnp.asarray(capacities, jnp.int32)
  return jnp.sum(caps < jnp.asarray(num_active, jnp.int32), dtype=jnp.int32)


def _strict_upper(n: int) -> np.ndarray:
  """[n, n] f32 with ones where row < column: v @ it sums the entries before each.

  A numpy constant, so that XLA embeds it instead of building it at every call.
  """
  return np.triu(np.ones((n, n), np.float32), 1)


_F32_INT_BIAS = 2 ** 23


def exclusive_counts(active: jax.Array) -> jax.Array:
  """[d_ff] bool -> [d_ff] int32: how many units before each one are active.

  `jnp.cumsum` lowers to a reduce-window, quadratic in d_ff on CPU; two small matmuls
  with a triangular matrix are cheaper: counts within blocks of PREFIX_BLOCK units,
  then the blocks' running totals. In f32 with HIGHEST precision the counts of 0/1
  entries are exact (below 2^24).
  """
  d_ff = active.shape[0]
  blocks = -(-d_ff // PREFIX_BLOCK)
  m = jnp.pad(active, (0, blocks * PREFIX_BLOCK - d_ff))
  # A select, not a convert: XLA:CPU's bool -> float convert is scalar code.
  m = jnp.where(m, np.float32(1), np.float32(0)).reshape(blocks, PREFIX_BLOCK)
  hi = jax.lax.Precision.HIGHEST
  within = jnp.dot(m, _strict_upper(PREFIX_BLOCK), precision=hi)
  totals = within[:, -1] + m[:, -1]
  offsets = jnp.dot(totals, _strict_upper(blocks), precision=hi)
  counts = (within + offsets[:, None]).reshape(-1)[:d_ff]
  if d_ff >= _F32_INT_BIAS:
    return counts.astype(jnp.int32)
  # XLA:CPU's saturating float -> int convert is scalar code; for integers in
  # [0, 2^23), adding 2^23 puts the value in the mantissa bits, read by a bitcast.
  biased = jax.lax.bitcast_convert_type(counts + _F32_INT_BIAS, jnp.int32)
  return biased - np.int32(np.float32(_F32_INT_BIAS).view(np.int32))


def _scatter_active(active: jax.Array, rank: jax.Array, capacity: int) -> jax.Array:
  """[capacity + 1] int32: an inactive unit, then the first `capacity` active units.

  Active units are scattered to 1 + rank, inactive ones all to the spare slot 0, so
  whichever lands there is an inactive unit to pad with, found without a search.
  Active units past the capacity fall out of range and are dropped. Slots past the
  active units hold unit 0; `_pad` replaces them.
  """
  targets = jnp.where(active, rank + 1, 0)
  units = np.arange(active.shape[0], dtype=np.int32)
  return jnp.zeros((capacity + 1,), jnp.int32).at[targets].set(units, mode="drop")


def _list_active(active: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """(`_scatter_active`'s slots for `capacity`, the number of active units)."""
  rank = exclusive_counts(active)
  count = rank[-1] + active[-1].astype(jnp.int32)
  return _scatter_active(active, rank, capacity), count


def _pad(slots: jax.Array, count: jax.Array, capacity: int) -> jax.Array:
  """The first `capacity` active units from `_scatter_active`, padded from its spare."""
  return jnp.where(np.arange(capacity) < count, slots[1:capacity + 1], slots[0])


def active_indices(active: jax.Array, capacity: int) -> jax.Array:
  """The first `capacity` active units, ascending, padded with an inactive unit.

  A scatter of each active unit to its rank (`exclusive_counts`), with no sort: XLA's
  CPU sort and top_k cost more than the rest of the op at a few thousand units.
  Padding is whichever inactive unit the scatter left in a spare slot.

  Args:
    active: [d_ff] bool, the units active for some token.
    capacity: how many indices to return.

  Returns:
    [capacity] int32. The first min(count, capacity) entries are the active units in
    ascending order; when fewer than `capacity` units are active, the rest are one
    inactive unit, whose activation is 0 for every token.
  """
  slots, count = _list_active(active, capacity)
  return _pad(slots, count, capacity)


def _grouped_row_matvec(a_sel: jax.Array, w2: jax.Array, idx: jax.Array,
                        interleave: bool = False) -> jax.Array:
  """a_sel @ w2[idx] for one token ([capacity] -> [d_model]), reading the rows once.

  `interleave` picks the other of two groupings of the rows, for a second token.

  XLA:CPU does not fuse a gather into a dot, so `a_sel @ w2[idx]` first copies the
  rows (a read and a write) and the dot reads them again: three passes over p of W2,
  which on a bandwidth-bound CPU cost more than the rows' share of the dense op. XLA
  does fuse gathers into elementwise consumers, so this sums ROW_GROUP gathered rows,
  scaled by their activations, per output row in one loop: one pass over the rows,
  writing a ROW_GROUP times smaller [capacity / ROW_GROUP, d_model] that a small dot
  with ones then sums. The barriers keep XLA from fusing that dot's input, or the
  activations' gather, into the loop, which would recompute them per element.
  """
  rows = a_sel.shape[0] // ROW_GROUP
  if interleave:  # Output row k sums entries k, k + rows, ...: the same sum, but
    # other gathers, which XLA cannot merge with another token's (merged, they would
    # be materialised: a gather feeding two loops is not fused into either).
    groups = idx.reshape(ROW_GROUP, rows).T
    a_groups = a_sel.reshape(ROW_GROUP, rows).T
  else:
    groups = idx.reshape(rows, ROW_GROUP)
    a_groups = a_sel.reshape(rows, ROW_GROUP)
  a_groups = jax.lax.optimization_barrier(a_groups)
  acc = None
  for t in range(ROW_GROUP):
    w_rows = w2.at[groups[:, t]].get(mode="promise_in_bounds")  # [rows, d_model]
    term = a_groups[:, t, None] * w_rows
    acc = term if acc is None else acc + term
  acc = jax.lax.optimization_barrier(acc)
  return np.ones((rows,), acc.dtype) @ acc


def mlp_decode(x: jax.Array, w1: jax.Array, b1: jax.Array | None, w2: jax.Array,
               b2: jax.Array | None, *, activation: ActivationName = "jsrelu",
               mixing: jax.Array | float = 1.0,
               capacities: Sequence[int] | None = None) -> jax.Array:
  """The MLP f(x W1 + b1) W2 + b2, reading only the rows of W2 some token needs.

  Meant for decoding (a handful of tokens), where the op is bound by reading weights:
  at union density p it reads W1 and p of W2, a bound of 2 / (1 + p) on the speedup
  over the dense op (see the module docstring). Jittable; the union of active units
  over all tokens picks a static-capacity branch with `jax.lax.switch`, so one
  compiled program serves every sparsity pattern.

  Args:
    x: [..., d_model] tokens; all leading dimensions together are the batch.
    w1: [d_model, d_ff].
    b1: [d_ff] or None.
    w2: [d_ff, d_model].
    b2: [d_model] or None.
    activation: 'relu', 'jsrelu' or 'mixed'.
    mixing: JSReLU share k of 'mixed'.
    capacities: strictly increasing row counts in [1, d_ff) the sparse branches
      gather; default `capacities_for(d_ff, tokens)`. Above the largest, the dense
      branch runs.

  Returns:
    [..., d_model], equal to the dense op (`sparse_jax.ops.mlp.mlp`, impl 'xla') of
    the same arguments up to float rounding.
  """
  d_ff = w1.shape[1]
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  caps = _check_capacities(
      capacities_for(d_ff, x2.shape[0]) if capacities is None else capacities, d_ff)
  z = x2 @ w1
  if b1 is not None:
    z = z + b1
  a = apply_activation(activation, z, mixing)
  active = jnp.any(is_active(z, activation), axis=0)
  # The active units, up to the largest capacity, are listed once, outside the switch
  # (each branch costs compile time); a branch takes the head of the list it needs.
  slots, count = _list_active(active, max(caps, default=0))

  def sparse_branch(capacity: int):
    def branch(a, slots, count, w2):
      idx = _pad(slots, count, capacity)
      # Indices lie in [0, d_ff) by construction: skip the bounds handling.
      a_sel = a.at[:, idx].get(mode="promise_in_bounds")
      if a.shape[0] <= FUSED_MAX_TOKENS and capacity % ROW_GROUP == 0:
        return jnp.stack([_grouped_row_matvec(row, w2, idx, interleave=i == 1)
                          for i, row in enumerate(a_sel)])
      # More tokens: XLA:CPU does not vectorise the grouped loop over tokens, and one
      # loop per token reads the rows that many times (on a 2-core x86 VM, 2 loops
      # cost 2/3 of a copy and a dot, 3 as much); copy the rows once, then dot.
      return a_sel @ w2.at[idx].get(mode="promise_in_bounds")
    return branch

  def dense_branch(a, slots, count, w2):
    del slots, count
    return a @ w2

  branches = [sparse_branch(c) for c in caps] + [dense_branch]
  y = jax.lax.switch(capacity_branch(count, caps), branches, a, slots, count, w2)
  if b2 is not None:
    y = y + b2
  return y.reshape(*lead, y.shape[-1])
