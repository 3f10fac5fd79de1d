"""Weight noise as pure transforms of an apply function or of parameters.

Inside sparse_jax models, per-token weight noise is built into the MLP's dense layers
and switched on by passing `rngs={'weight_noise': key}` to `apply` in training. For
any other Flax model, `perturb_params` gives the per-step form W <- W + sigma E on the
kernels a predicate selects, and `noisy_apply` wraps an apply function with it.
"""
import re
from typing import Any, Callable

import jax
from flax import traverse_util

from sparse_jax.ops.weight_noise import perturb_kernel

Params = Any


def kernel_path_predicate(pattern: str) -> Callable[[tuple[str, ...]], bool]:
  """A predicate selecting `kernel` params whose '/'-joined path matches `pattern`."""
  regex = re.compile(pattern)
  return lambda path: path[-1] == "kernel" and regex.search("/".join(path)) is not None


def perturb_params(params: Params, rng: jax.Array | None, rho: float,
                   predicate: Callable[[tuple[str, ...]], bool]) -> Params:
  """Adds N(0, (rho rms(W))^2) noise to each selected kernel; rng=None returns params."""
  if rng is None or rho == 0:
    return params
  flat = traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(rng, len(flat)))
  noisy = {path: perturb_kernel(value, rho, next(keys)) if predicate(path) else value
           for path, value in flat.items()}
  return traverse_util.unflatten_dict(noisy)


def noisy_apply(apply_fn: Callable[..., Any], rho: float,
                predicate: Callable[[tuple[str, ...]], bool]) -> Callable[..., Any]:
  """apply_fn(variables, *args) -> noisy_fn(variables, *args, rng=None, **kwargs).

  The returned function perturbs `variables['params']` once per call when `rng` is
  given (training) and is exactly `apply_fn` when it is not (eval).
  """

  def noisy_fn(variables, *args, rng: jax.Array | None = None, **kwargs):
    if rng is not None:
      variables = dict(variables, params=perturb_params(variables["params"], rng, rho,
                                                        predicate))
    return apply_fn(variables, *args, **kwargs)

  return noisy_fn
