"""The Transformer MLP as one op, with an XLA reference and block-sparse Pallas kernels.

    z = x W1 + b1 + z_offset  ->  a = scale * f(z)  ->  y = a W2 + b2

`impl="xla"` is plain jnp (autodiff gives the backward): the reference and the CPU
default. `impl="pallas"` runs the forward second matmul and the backward matmuls as
block-sparse kernels that skip the (token tile x unit tile) blocks where f(z) and f'(z)
are zero, in a `jax.custom_vjp`:

    forward   z = x W1 (dense, XLA), y = f(z) W2            row_sparse_matmul
    backward  dZ = f'(z) * (dY W2^T), nonzero blocks only   masked_grad_matmul
              dW2 = f(z)^T dY, dW1 = (dZ^T x)^T             col_sparse_matmul
              dX = dZ W1^T                                   row_sparse_matmul

so five of the six matmuls of a training step skip zero blocks. Dropout is folded in:
dropped units are set to an inactive value before the mask is taken (they are zero in
f and f') and the 1/keep rescaling is the static `scale`. `z_offset` carries additive
terms computed outside (the z probe whose gradient is dL/dz, weight noise on W1).

Under a mesh the kernels run inside `jax.shard_map`: tokens split over the batch axes,
d_ff over the tensor axis; each tensor shard returns its partial y, summed outside.
"""
import dataclasses
import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparse_jax.kernels import sparse_mlp_gpu, sparse_mlp_reference, sparse_mlp_tpu
from sparse_jax.kernels.block_mask import INACTIVE, block_mask, is_active
from sparse_jax.kernels.tiles import IDENTITY, HiddenMap, Tiles, default_tiles
from sparse_jax.ops.activations import Activation, apply_activation, zero_below_zero

MlpImplName = Literal["xla", "pallas"]
MLP_IMPLS = ("xla", "pallas")
BACKENDS = ("auto", "tpu", "gpu", "reference")
_KERNELS = {"tpu": sparse_mlp_tpu, "gpu": sparse_mlp_gpu, "reference": sparse_mlp_reference}


@dataclasses.dataclass(frozen=True)
class MlpKernel:
  """How the MLP op runs (hashable: it is static under jit and a Flax attribute).

  Attributes:
    impl: 'xla' (plain jnp) or 'pallas' (block-sparse kernels).
    backend: kernel family for 'pallas': 'tpu' (Mosaic, scalar prefetch), 'gpu'
      (Triton, mask read in-kernel), 'reference' (their jnp meaning), or 'auto' (from
      the platform; CPU interprets the TPU kernels).
    platform: the platform the program is compiled for ('cpu', 'tpu', 'gpu'), or
      None: the platform of `mesh`'s devices, else JAX's default backend. A program
      compiled here for a TPU topology (`--compile_for`) names 'tpu', so its kernels
      are Mosaic kernels, not interpreted ones.
    tiles: (tokens, units, features) tile, or None for the backend's default.
    interpret: Pallas interpret mode: None = on CPU only, True, False, or a
      `pltpu.InterpretParams` (TPU interpreter: DMA/race simulation).
    mesh: run the kernels per shard of this mesh (None = unsharded).
    batch_axes / tensor_axis: mesh axes the tokens / d_ff are split over.
  """
  impl: MlpImplName = "xla"
  backend: str = "auto"
  tiles: tuple[int, int, int] | None = None
  interpret: Any = None
  mesh: jax.sharding.Mesh | None = None
  platform: str | None = None
  batch_axes: tuple[str, ...] = ("data", "fsdp")
  tensor_axis: str | None = "tensor"

  def resolved_platform(self) -> str:
    """'cpu', 'tpu' or 'gpu': where the kernels will run (see `platform`)."""
    platform = self.platform
    if platform is None and self.mesh is not None:
      platform = self.mesh.devices.flat[0].platform
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform

  def resolved_backend(self) -> str:
    if self.backend != "auto":
      return self.backend
    return "gpu" if self.resolved_platform() == "gpu" else "tpu"

  def resolved_tiles(self) -> Tiles:
    if self.tiles is not None:
      return Tiles(*self.tiles)
    backend = self.resolved_backend()
    return default_tiles("gpu" if backend == "gpu" else "tpu")

  def resolved_interpret(self) -> Any:
    if self.interpret is not None:
      return self.interpret
    return self.resolved_platform() == "cpu"

  def validate(self) -> None:
    """Raises ValueError naming the bad field and its fix."""
    if self.impl not in MLP_IMPLS:
      raise ValueError(f"mlp_impl={self.impl!r}; expected one of {MLP_IMPLS}.")
    if self.backend not in BACKENDS:
      raise ValueError(f"MLP kernel backend={self.backend!r}; expected one of {BACKENDS}.")
    if self.tiles is not None and len(self.tiles) != 3:
      raise ValueError(f"mlp_tiles={self.tiles!r}; expected (tokens, units, features).")
    if self.impl == "pallas" and self.resolved_backend() == "tpu" and self.tiles:
      Tiles(*self.tiles).validate("tpu")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad2(a: jax.Array, rows: int, cols: int, value: float = 0.0) -> jax.Array:
  if a.shape == (rows, cols):
    return a
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])),
                 constant_values=value)


@dataclasses.dataclass(frozen=True)
class _Static:
  activation: str
  scale: float
  tiles: Tiles
  backend: str
  interpret: Any


def _pre_activation(x, w1, b1, z_offset, keep):
  z = jnp.dot(x, w1, preferred_element_type=jnp.float32).astype(x.dtype)
  if b1 is not None:
    z = z + b1
  if z_offset is not None:
    z = z + z_offset
  if keep is not None:
    z = jnp.where(keep, z, jnp.asarray(INACTIVE, z.dtype))
  return z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_mlp(static: _Static, x, w1, b1, z_offset, keep, w2, b2, mixing):
  return _pallas_forward(static, x, w1, b1, z_offset, keep, w2, b2, mixing)[0]


def _pallas_forward(static, x, w1, b1, z_offset, keep, w2, b2, mixing):
  t, kern = static.tiles, _KERNELS[static.backend]
  (n, d), f = x.shape, w1.shape[1]
  np_, fp, dp = _round_up(n, t.tokens), _round_up(f, t.units), _round_up(d, t.features)
  if static.backend == "tpu" and static.interpret is False:
    sparse_mlp_tpu.check_block_tables(np_, fp, t)  # Mosaic would fail late, on SMEM.
  z = _pad2(_pre_activation(x, w1, b1, z_offset, keep), np_, fp, INACTIVE)
  mask = block_mask(is_active(z, static.activation), t.tokens, t.units)
  mix = jnp.reshape(mixing, (1,)).astype(jnp.float32)
  w2p = _pad2(w2, fp, dp)
  y = kern.row_sparse_matmul(
      z, w2p, mask, mix, fn=HiddenMap(static.activation, static.scale), tiles=t,
      rhs_transposed=False, out_dtype=x.dtype, **_interp(static))[:n, :d]
  if b2 is not None:
    y = y + b2
  return y, (x, w1, b1, z_offset, keep, w2p, b2, mix, z, mask)


def _interp(static: _Static) -> dict:
  return {} if static.backend == "reference" else {"interpret": static.interpret}


def _pallas_backward(static, residuals, dy):
  x, w1, b1, z_offset, keep, w2p, b2, mix, z, mask = residuals
  t, kern = static.tiles, _KERNELS[static.backend]
  (n, d), f = x.shape, w1.shape[1]
  np_, fp = z.shape
  dp = w2p.shape[1]
  dyp = _pad2(dy.astype(x.dtype), np_, dp)
  interp = _interp(static)
  dz = kern.masked_grad_matmul(
      z, dyp, w2p, mask, mix, fn=HiddenMap(static.activation, static.scale, True),
      tiles=t, out_dtype=x.dtype, **interp)
  dw2 = kern.col_sparse_matmul(z, dyp, mask, mix,
                               fn=HiddenMap(static.activation, static.scale), tiles=t,
                               out_dtype=w2p.dtype, **interp)[:f, :d]
  xp = _pad2(x, np_, dp)
  dw1 = kern.col_sparse_matmul(dz, xp, mask, mix, fn=IDENTITY, tiles=t,
                               out_dtype=w1.dtype, **interp)[:f, :d].T
  dx = kern.row_sparse_matmul(dz, _pad2(w1, dp, fp), mask, mix, fn=IDENTITY, tiles=t,
                              rhs_transposed=True, out_dtype=x.dtype, **interp)[:n, :d]
  dz = dz[:n, :f]
  db1 = None if b1 is None else jnp.sum(dz, axis=0, dtype=jnp.float32).astype(b1.dtype)
  db2 = None if b2 is None else jnp.sum(dy, axis=0, dtype=jnp.float32).astype(b2.dtype)
  dz_offset = None if z_offset is None else dz.astype(z_offset.dtype)
  return dx, dw1, db1, dz_offset, None, dw2, db2, jnp.zeros_like(mix[0])


def _pallas_fwd(static, x, w1, b1, z_offset, keep, w2, b2, mixing):
  y, residuals = _pallas_forward(static, x, w1, b1, z_offset, keep, w2, b2, mixing)
  return y, residuals


_pallas_mlp.defvjp(_pallas_fwd, _pallas_backward)


def _xla_mlp(static: _Static, x, w1, b1, z_offset, keep, w2, b2, mixing):
  z = _pre_activation(x, w1, b1, z_offset, None)
  a = apply_activation(static.activation, z, mixing)
  if keep is not None:
    a = jnp.where(keep, a, jnp.zeros_like(a))
  if static.scale != 1.0:
    a = a * jnp.asarray(static.scale, a.dtype)
  y = jnp.dot(a, w2, preferred_element_type=jnp.float32).astype(x.dtype)
  return y if b2 is None else y + b2


def mlp(x: jax.Array, w1: jax.Array, b1: jax.Array | None, w2: jax.Array,
        b2: jax.Array | None, *, activation: Activation,
        mixing: jax.Array | float = 1.0, z_offset: jax.Array | None = None,
        dropout_keep: jax.Array | None = None, dropout_rate: float = 0.0,
        kernel: MlpKernel = MlpKernel()) -> jax.Array:
  """y = scale * f(x W1 + b1 + z_offset) W2 + b2 for x [..., d_model].

  Args:
    x: inputs [..., d_model] (already including an input-side zeroth bias).
    w1, b1: first layer [d_model, d_ff] and bias [d_ff] (or None).
    w2, b2: second layer [d_ff, d_model] and bias [d_model] (or None).
    activation: 'relu', 'jsrelu' or 'mixed' ((1 - k) relu + k jsrelu, k = `mixing`),
      or an `SShaped`, GELU or a mixture from GELU (impl 'xla' only: they are not zero
      for z < 0, so the kernels' block masks do not apply).
    z_offset: optional [..., d_ff] term added to z; its gradient is dL/dz.
    dropout_keep: optional bool [..., d_ff] mask of kept units (None = no dropout);
      kept activations are scaled by 1 / (1 - dropout_rate).
    kernel: implementation, tiles, backend and sharding (see `MlpKernel`).

  Returns:
    y [..., d_model] in x's dtype. Gradients flow to x, W1, b1, W2, b2 and z_offset.
  """
  kernel.validate()
  lead, d_model = x.shape[:-1], x.shape[-1]
  d_ff = w1.shape[1]
  scale = 1.0 / (1.0 - dropout_rate) if dropout_keep is not None else 1.0
  mixing = jnp.asarray(mixing, jnp.float32)
  if kernel.impl == "xla":
    static = _Static(activation, scale, Tiles(1, 1, 1), "xla", False)
    return _xla_mlp(static, x, w1, b1, z_offset, dropout_keep, w2, b2, mixing)
  if not zero_below_zero(activation):
    raise ValueError(f"Activation {activation!r} runs only with impl='xla': the Pallas "
                     "kernels skip blocks where z < 0, which is not its zero region.")
  static = _Static(activation, scale, kernel.resolved_tiles(), kernel.resolved_backend(),
                   kernel.resolved_interpret())

  def local(x, w1, b1, z_offset, keep, w2, mixing):
    rows = x.shape[:-1]
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
    y = _pallas_mlp(static, flat(x), w1, b1, flat(z_offset), flat(keep), w2, None,
                    mixing)
    return y.reshape(*rows, d_model)

  if kernel.mesh is None or kernel.mesh.size == 1:
    y = local(x, w1, b1, z_offset, dropout_keep, w2, mixing)
  else:
    y = _sharded(local, kernel, lead, d_ff)(x, w1, b1, z_offset, dropout_keep, w2,
                                            mixing)
  return y if b2 is None else y + b2


def _sharded(local, kernel: MlpKernel, lead: Sequence[int], d_ff: int):
  """`local` under shard_map: tokens over the batch axes, d_ff over the tensor axis.

  Each tensor shard's partial y is returned stacked on a leading axis and summed
  outside: a psum inside shard_map would, with check_vma=False, transpose to a second
  psum and scale dX by the tensor size.
  """
  mesh = kernel.mesh
  shape = dict(mesh.shape)
  batch = tuple(a for a in kernel.batch_axes if shape.get(a, 1) > 1)
  batch_size = 1
  for a in batch:
    batch_size *= shape[a]
  batch = batch if batch and lead and lead[0] % batch_size == 0 else ()
  tensor = kernel.tensor_axis
  if tensor is None or shape.get(tensor, 1) == 1 or d_ff % shape[tensor]:
    tensor = None
  rows = P(batch or None)
  hidden = P(batch or None, *([None] * (len(lead) - 1)), tensor)
  in_specs = (rows, P(None, tensor), P(tensor), hidden, hidden, P(tensor, None), P())

  def stacked(x, w1, b1, z_offset, keep, w2, mixing):
    return local(x, w1, b1, z_offset, keep, w2, mixing)[None]

  out_spec = P(tensor, batch or None)

  def run(x, w1, b1, z_offset, keep, w2, mixing):
    specs = tuple(None if a is None else s
                  for a, s in zip((x, w1, b1, z_offset, keep, w2, mixing), in_specs))
    parts = jax.shard_map(stacked, mesh=mesh, in_specs=specs, out_specs=out_spec,
                          check_vma=False)(x, w1, b1, z_offset, keep, w2, mixing)
    return jnp.sum(parts, axis=0, dtype=jnp.float32).astype(x.dtype)

  return run
