"""MLP op cases shared by tests/test_mlp_op.py and tests/multidevice_check.py: operands
with a chosen pattern of active units, and the op's value and gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.ops.mlp import mlp

# What value_and_grads returns, in order: y, then the gradients of its six operands.
NAMES = ("y", "dx", "dw1", "db1", "dw2", "db2", "dz")


def make_inputs(lead, d_model, d_ff, pattern, density, seed=0):
  """MLP operands whose z = x W1 + b1 + z_offset is active (z > 0) on a chosen pattern.

  'random': each entry active with probability `density`; 'blocks': whole 8 x 128
  token x unit blocks active with that probability (inside them entries are active
  with probability 0.7), so some blocks are all zero and kernels really skip.
  """
  rng = np.random.default_rng(seed)
  tokens = int(np.prod(lead))
  if pattern == "random":
    active = rng.random((tokens, d_ff)) < density
  else:
    blocks = rng.random((-(-tokens // 8), -(-d_ff // 128))) < density
    active = np.kron(blocks, np.ones((8, 128), bool))[:tokens, :d_ff]
    active &= rng.random((tokens, d_ff)) < 0.7
  x = rng.normal(size=(*lead, d_model)) * 0.5
  w1 = rng.normal(size=(d_model, d_ff)) * 0.3 / np.sqrt(d_model)
  b1 = rng.normal(size=(d_ff,)) * 0.05
  w2 = rng.normal(size=(d_ff, d_model)) / np.sqrt(d_ff)
  b2 = rng.normal(size=(d_model,)) * 0.1
  # |x W1 + b1| stays well below 0.5, so the offset decides the sign of z.
  offset = np.where(active, 0.6 + rng.random(active.shape), -0.6 - rng.random(active.shape))
  offset = offset.reshape(*lead, d_ff)
  return [jnp.asarray(a, jnp.float32) for a in (x, w1, b1, w2, b2, offset)]


def value_and_grads(kernel, activation="jsrelu", mixing=0.7, keep=None, rate=0.0):
  def loss(x, w1, b1, w2, b2, offset):
    y = mlp(x, w1, b1, w2, b2, activation=activation, mixing=mixing, z_offset=offset,
            dropout_keep=keep, dropout_rate=rate, kernel=kernel)
    # A loss whose cotangent differs per output entry, so dY is not uniform.
    return jnp.sum(jnp.sin(y.astype(jnp.float32) * 1.3)), y
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
