"""The sparsity projections packaged for any optax optimizer.

After every optimizer update the zeroth biases are clipped into their box and the
restricted LayerNorm scales are clamped (from scratch) or uplifted (finetuning). Which
parameters these are is decided by a path rule (`ProjectionRule`): by default a
parameter named `zeroth_bias` inside a module named `mlp`, whose preceding norm is the
sibling module `mlp_norm` (the layout of every sparse_jax model).

`with_projections(tx, rule)` wraps an optax GradientTransformation so that
`optax.apply_updates(params, updates)` lands on the projected parameters; the plain
function `project(params, step, rule)` is there for code that updates params itself.
"""
import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from sparse_jax.ops import projections as ops

Params = Any
NormProjection = Literal["clamp", "uplift"]


@dataclasses.dataclass(frozen=True)
class ProjectionRule:
  """Which parameters are projected, and how.

  Attributes:
    zeroth_bias_clipping: c in |b| <= c |gamma|; None leaves zeroth biases unclipped.
    norm_projection: 'clamp' (gamma >= 1, from scratch), 'uplift' (finetuning), or None
      (the norms are not restricted).
    uplift_steps: T_up of the uplift.
    zeroth_bias_path: path suffix of a zeroth bias parameter.
    norm_scale_path: path suffix, relative to the zeroth bias's grandparent, of the
      scale of the norm before that MLP; also the suffix that marks restricted norms.
  """
  zeroth_bias_clipping: float | None = 0.1
  norm_projection: NormProjection | None = "clamp"
  uplift_steps: int = 0
  zeroth_bias_path: tuple[str, ...] = ("mlp", "zeroth_bias")
  norm_scale_path: tuple[str, ...] = ("mlp_norm", "scale")


def _ends_with(path: tuple[str, ...], suffix: tuple[str, ...]) -> bool:
  return len(path) >= len(suffix) and path[-len(suffix):] == suffix


def project(params: Params, step: jax.Array | int, rule: ProjectionRule) -> Params:
  """Returns `params` with the rule's projections applied (pure; jit-friendly).

  Norm scales are projected first, so each zeroth-bias box uses the projected gamma.
  """
  flat = traverse_util.flatten_dict(params)
  out = dict(flat)
  if rule.norm_projection is not None:
    for path, value in flat.items():
      if _ends_with(path, rule.norm_scale_path):
        if rule.norm_projection == "clamp":
          out[path] = ops.clamp_norm_scale(value)
        elif rule.norm_projection == "uplift":
          out[path] = ops.uplift_norm_scale(value, step, rule.uplift_steps)
        else:
          raise ValueError(f"norm_projection={rule.norm_projection!r}; expected "
                           "'clamp', 'uplift' or None.")
  if rule.zeroth_bias_clipping is not None:
    for path, value in flat.items():
      if _ends_with(path, rule.zeroth_bias_path):
        prefix = path[:-len(rule.zeroth_bias_path)]
        norm_path = prefix + rule.norm_scale_path
        if norm_path not in out:
          raise ValueError(f"Zeroth bias {'/'.join(path)} has no norm scale at "
                           f"{'/'.join(norm_path)} to bound it; set norm_scale_path.")
        out[path] = ops.clip_zeroth_bias(value, out[norm_path], rule.zeroth_bias_clipping)
  return traverse_util.unflatten_dict(out)


class ProjectionState(NamedTuple):
  """The wrapped optimizer's state and the number of updates applied so far."""
  inner: optax.OptState
  count: jax.Array


def with_projections(tx: optax.GradientTransformation, rule: ProjectionRule, *,
                     before_update: bool = False) -> optax.GradientTransformation:
  """Wraps `tx` so that params + updates lands on the projected parameters.

  after the update (default, the papers' text): params + updates = project(params + u);
  before it (`before_update=True`, the official ViT code, which projects between
  backward and optimizer.step()): params + updates = project(params) + u, so a freshly
  updated scale reaches the next forward pass unprojected. u is `tx`'s update of the
  unprojected params. The projection's step is the number of updates applied, counting
  this one when projecting after it.
  """

  def init_fn(params):
    return ProjectionState(tx.init(params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("with_projections needs params: call tx.update(grads, state, params).")
    updates, inner = tx.update(updates, state.inner, params)
    count = state.count + 1
    if before_update:
      target = optax.apply_updates(project(params, state.count, rule), updates)
    else:
      target = project(optax.apply_updates(params, updates), count, rule)
    updates = jax.tree.map(lambda t, p: (t - p).astype(p.dtype), target, params)
    return updates, ProjectionState(inner, count)

  return optax.GradientTransformation(init_fn, update_fn)
