"""Tile shapes of the block-sparse MLP kernels and the elementwise map fused before them."""
import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.ops.activations import activation_derivative, apply_activation


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block shape of the kernels: `tokens` x `units` is the unit of skipping.

  Attributes:
    tokens: token tile (rows of x, z, y).
    units: hidden-unit tile (columns of z, rows of W2).
    features: d_model tile (columns of y and x, the dense side of each matmul).
  """
  tokens: int
  units: int
  features: int

  def validate(self, platform: str) -> None:
    """Raises ValueError unless the tiles suit `platform` ('tpu' needs (8, 128) alignment)."""
    for name, value in dataclasses.asdict(self).items():
      if value <= 0:
        raise ValueError(f"Tile '{name}'={value} must be positive.")
    if platform == "tpu" and (self.tokens % 8 or self.units % 128 or self.features % 128):
      raise ValueError(
          f"TPU tiles must be (8, 128)-aligned: tokens % 8 == 0, units and features % 128 "
          f"== 0; got {self}. Fix: e.g. --config.mlp_tiles='(128, 128, 256)'.")


# TPU: (8, 128)-aligned, big enough for the MXU. GPU: powers of two that fit Triton's
# register budget. Interpreted runs (CPU) use the TPU tiles unless told otherwise.
DEFAULT_TILES = {"tpu": Tiles(128, 128, 256), "gpu": Tiles(64, 64, 128)}


def default_tiles(backend: str) -> Tiles:
  return DEFAULT_TILES[backend]


@dataclasses.dataclass(frozen=True)
class HiddenMap:
  """The elementwise map a kernel applies to its hidden-layer operand after loading it.

  activation None: identity (the operand is already dZ). Else `scale * f(z)`, or
  `scale * f'(z)` with `derivative=True`; `scale` is the dropout rescaling 1/keep.
  """
  activation: str | None = None
  scale: float = 1.0
  derivative: bool = False

  def __call__(self, z: jax.Array, mixing: jax.Array) -> jax.Array:
    if self.activation is None:
      return z.astype(jnp.float32)
    z = z.astype(jnp.float32)
    fn = activation_derivative if self.derivative else apply_activation
    out = fn(self.activation, z, mixing)
    return out * self.scale if self.scale != 1.0 else out


IDENTITY = HiddenMap()
