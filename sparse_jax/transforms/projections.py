"""The sparsity projections packaged for any optax optimizer.

After every optimizer update the zeroth biases are clipped into their box and the
restricted LayerNorm scales are clamped (from scratch) or uplifted (finetuning). Which
parameters these are is decided by a path rule (`ProjectionRule`): by default a
parameter named `zeroth_bias` inside a module named `mlp`, whose preceding norm is the
sibling module `mlp_norm` (the layout of every sparse_jax model).

For models laid out differently (any third-party Flax model), both paths can instead be
regexes: `zeroth_bias_path` on the '/'-joined parameter path, and `norm_scale_path` on
the names of the sibling modules of the module holding each zeroth bias (its norm is
a matching sibling named after the MLP, else the last matching sibling in natural
order, e.g. `LayerNorm_1` of a Flax-examples encoder block, `LayerNorm_2` of a decoder
block). See `resolve`.

`with_projections(tx, rule)` wraps an optax GradientTransformation so that
`optax.apply_updates(params, updates)` lands on the projected parameters; the plain
function `project(params, step, rule)` is there for code that updates params itself.
All of them take params with or without Flax's partitioning boxes
(`nn.with_logical_partitioning` -> `nn.LogicallyPartitioned`, `nn.Partitioned`): the
rule reads the values inside, and what comes back is boxed as what went in. They also
take Flax NNX `State` trees (what `nnx.Optimizer` hands its optax transformation; keys
are compared as strings, so a list index 0 is the path part '0').
"""
import dataclasses
import re
from typing import Any, Literal, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from sparse_jax.ops import projections as ops

Params = Any
Path = tuple[str, ...]
NormProjection = Literal["clamp", "uplift"]
NormBias = Literal["zero", "freeze"]


@dataclasses.dataclass(frozen=True)
class ProjectionRule:
  """Which parameters are projected, and how.

  Attributes:
    zeroth_bias_clipping: c in |b| <= c |gamma|; None leaves zeroth biases unclipped.
    norm_projection: 'clamp' (gamma >= 1, from scratch), 'uplift' (finetuning), or None
      (the norms are not restricted).
    uplift_steps: T_up of the uplift.
    zeroth_bias_path: path suffix of a zeroth bias parameter, or a regex searched in
      the '/'-joined parameter path.
    norm_scale_path: path suffix, relative to the zeroth bias's grandparent, of the
      scale of the norm before that MLP; also the suffix that marks restricted norms.
      Or a regex searched in the names of the sibling modules of the module holding a
      zeroth bias: among the matching siblings that have a `scale`, that bias's norm
      is the last (natural order) whose name contains the MLP module's name without
      its number (mlp -> mlp_norm), else the last of all (LayerNorm_1 of a pre-LN
      block); the restricted norms are exactly the norms so paired.
    norm_bias: what happens to the bias of each restricted norm: 'zero' (kept at 0 by
      the projection: the bias-free LayerNorm of from-scratch training), 'freeze'
      (`with_projections` keeps it at its current value: finetuning), or None.
    require_match: raise when the rule finds no zeroth bias (with clipping on) or no
      restricted norm (with a norm projection on), instead of doing nothing.
  """
  zeroth_bias_clipping: float | None = 0.1
  norm_projection: NormProjection | None = "clamp"
  uplift_steps: int = 0
  zeroth_bias_path: tuple[str, ...] | str = ("mlp", "zeroth_bias")
  norm_scale_path: tuple[str, ...] | str = ("mlp_norm", "scale")
  norm_bias: NormBias | None = None
  require_match: bool = False


def _is_box(value: Any) -> bool:
  return isinstance(value, nn.meta.AxisMetadata)


def _is_plain(params: Params) -> bool:
  """A Linen params tree (dicts); otherwise a Flax NNX `State` (keys may be ints, the
  leaves `nnx.Variable`s or their values)."""
  return isinstance(params, (dict, flax.core.FrozenDict))


def _walk(tree: Mapping, prefix: Path = ()):
  """(path with str keys, leaf) of a nested Mapping (an NNX State); Variables unwrapped."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _walk(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),), (value.get_value() if hasattr(value, "get_value")
                                   else value)


def _rebuild(like: Mapping, values: dict[Path, Any]) -> Any:
  """`like`'s structure (State, Variables) holding `values` by str path."""
  def leaf(path, value):
    key = tuple(str(k.key) for k in path)
    return value.replace(values[key]) if hasattr(value, "get_value") else values[key]

  return jax.tree_util.tree_map_with_path(
      leaf, like, is_leaf=lambda v: hasattr(v, "get_value"))


def _flat(params: Params) -> dict[Path, Any]:
  """The params by path, their values out of any partitioning boxes (or NNX
  Variables)."""
  if not _is_plain(params):
    return dict(_walk(params))
  return {p: v.unbox() if _is_box(v) else v
          for p, v in traverse_util.flatten_dict(dict(params)).items()}


def _boxed_like(values: dict[Path, Any], like: Params) -> Params:
  """`values` (by path) as a tree, each leaf in the box its path has in `like`."""
  if not _is_plain(like):
    return _rebuild(like, values)
  raw = traverse_util.flatten_dict(dict(like))
  return traverse_util.unflatten_dict(
      {p: raw[p].replace_boxed(v) if _is_box(raw.get(p)) else v for p, v in values.items()})


def _ends_with(path: tuple[str, ...], suffix: tuple[str, ...]) -> bool:
  return len(path) >= len(suffix) and path[-len(suffix):] == suffix


def _natural_key(name: str) -> list:
  """LayerNorm_2 before LayerNorm_10."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", name) if t]


def _is_zeroth_bias(path: Path, rule: ProjectionRule) -> bool:
  if isinstance(rule.zeroth_bias_path, str):
    return re.search(rule.zeroth_bias_path, "/".join(path)) is not None
  return _ends_with(path, rule.zeroth_bias_path)


def _norm_of(bias_path: Path, paths: set[Path], rule: ProjectionRule) -> Path:
  """The scale path of the norm before the MLP holding the zeroth bias `bias_path`."""
  if not isinstance(rule.norm_scale_path, str):
    suffix = rule.zeroth_bias_path
    prefix = bias_path[:-len(suffix)] if isinstance(suffix, tuple) else bias_path[:-2]
    norm_path = prefix + rule.norm_scale_path
    if norm_path not in paths:
      raise ValueError(f"Zeroth bias {'/'.join(bias_path)} has no norm scale at "
                       f"{'/'.join(norm_path)} to bound it.\nFix: set norm_scale_path.")
    return norm_path
  # bias_path = parent + (mlp, leaf): the MLP's siblings are the other children of parent.
  parent, mlp = bias_path[:-2], bias_path[-2]
  regex = re.compile(rule.norm_scale_path)
  names = sorted({p[len(parent)] for p in paths
                  if len(p) == len(parent) + 2 and p[:len(parent)] == parent
                  and p[-1] == "scale" and p[len(parent)] != mlp
                  and regex.search(p[len(parent)])}, key=_natural_key)
  if not names:
    where = "/".join(parent) or "the top level"
    raise ValueError(f"Zeroth bias {'/'.join(bias_path)} has no norm scale to bound it: "
                     f"no sibling module of {mlp!r} in {where} matches "
                     f"{rule.norm_scale_path!r} and has a 'scale'.\nFix: pass a norm "
                     "pattern that names the norm feeding that MLP.")
  # A name that contains the MLP's (mlp -> mlp_norm, ffn -> ln_ffn) says which norm it
  # is; otherwise the last one: Flax numbers auto-named modules in creation order, and
  # in a pre-LN block the norm feeding the MLP is created last (LayerNorm_1, _2).
  stem = re.sub(r"_?\d+$", "", mlp).lower()
  named = [n for n in names if stem and stem in n.lower()]
  return parent + ((named or names)[-1], "scale")


def resolve(params: Params, rule: ProjectionRule
            ) -> tuple[list[Path], list[tuple[Path, Path | None]]]:
  """(restricted norm scale paths, [(zeroth bias path, its norm scale path)]).

  Pure Python on the tree structure (runs once per trace under jit). A zeroth bias is
  paired with a norm only when clipping is on or the norm paths come from a regex.
  """
  flat = _flat(params)
  paths = set(flat)
  biases = sorted((p for p in flat if _is_zeroth_bias(p, rule)), key="/".join)
  pattern_norms = isinstance(rule.norm_scale_path, str)
  pair = rule.zeroth_bias_clipping is not None or pattern_norms
  if pattern_norms and any(len(p) < 2 for p in biases):
    raise ValueError(f"Zeroth biases {['/'.join(p) for p in biases if len(p) < 2]} are "
                     "not inside an MLP module, and a norm pattern looks for the MLP's "
                     "sibling modules.\nFix: give the norm as a path (norm_scale_path=).")
  pairs = [(p, _norm_of(p, paths, rule) if pair else None) for p in biases]
  if pattern_norms:
    norms = sorted({n for _, n in pairs}, key="/".join)
    if len(norms) < len(pairs):  # E.g. all layers inline in one module: say so.
      shared = [("/".join(b), "/".join(n)) for b, n in pairs
                if sum(m == n for _, m in pairs) > 1]
      raise ValueError(f"Several zeroth biases resolve to one norm: {shared}; the norm "
                       "pattern picks one sibling module per MLP block.\nFix: pass a "
                       "pattern that only the norm feeding each block matches, or give "
                       "each layer its own module (as in the Flax examples).")
  else:
    norms = sorted((p for p in flat if _ends_with(p, rule.norm_scale_path)), key="/".join)
  if rule.require_match:
    if rule.zeroth_bias_clipping is not None and not biases:
      raise ValueError(f"The projection rule found no zeroth bias (pattern "
                       f"{rule.zeroth_bias_path!r}) in the params, whose top-level keys "
                       f"are {sorted(map(str, params))}.\nFix: sparsify the model with a zeroth "
                       "bias or turn clipping off (zeroth_bias_clipping=None).")
    if rule.norm_projection is not None and not norms:
      raise ValueError(f"The projection rule found no restricted norm (pattern "
                       f"{rule.norm_scale_path!r}) in the params; restricted norms are "
                       "the norms before zeroth-biased MLPs.\nFix: sparsify with a zeroth "
                       "bias, fix the norm pattern, or set norm_projection=None.")
  return norms, pairs


def _norm_bias_paths(norms: list[Path], paths) -> list[Path]:
  return [n[:-1] + ("bias",) for n in norms if n[:-1] + ("bias",) in paths]


def project(params: Params, step: jax.Array | int, rule: ProjectionRule) -> Params:
  """Returns `params` with the rule's projections applied (pure; jit-friendly).

  Norm scales are projected first, so each zeroth-bias box uses the projected gamma.
  `norm_bias='zero'` zeroes the restricted norms' biases; 'freeze' needs the previous
  params and is applied by `with_projections`, not here.
  """
  flat = _flat(params)
  out = dict(flat)
  norms, pairs = resolve(params, rule)
  if rule.norm_projection is not None:
    for path in norms:
      value = flat[path]
      if rule.norm_projection == "clamp":
        out[path] = ops.clamp_norm_scale(value)
      elif rule.norm_projection == "uplift":
        out[path] = ops.uplift_norm_scale(value, step, rule.uplift_steps)
      else:
        raise ValueError(f"norm_projection={rule.norm_projection!r} is not a norm "
                         "projection.\nFix: pass 'clamp', 'uplift' or None.")
  if rule.norm_bias == "zero":
    for path in _norm_bias_paths(norms, flat):
      out[path] = jnp.zeros_like(flat[path])
  if rule.zeroth_bias_clipping is not None:
    for path, norm_path in pairs:
      # gamma [..., d] -> [..., 1, d] against b [..., positions, d]: the same for one
      # layer, and right for layers stacked by nn.scan ([layers, d], [layers, pos, d]).
      out[path] = ops.clip_zeroth_bias(flat[path], jnp.expand_dims(out[norm_path], -2),
                                       rule.zeroth_bias_clipping)
  return _boxed_like(out, params)


def _keep(target: Params, params: Params, paths: list[Path]) -> Params:
  """`target` with the leaves at `paths` taken from `params` (their update is 0)."""
  if not paths:
    return target
  flat, old = _flat(target), _flat(params)
  flat.update({p: old[p] for p in paths})
  return _boxed_like(flat, target)


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
      raise ValueError("with_projections needs params.\nFix: call tx.update(grads, "
                       "state, params).")
    updates, inner = tx.update(updates, state.inner, params)
    count = state.count + 1
    if before_update:
      target = optax.apply_updates(project(params, state.count, rule), updates)
    else:
      target = project(optax.apply_updates(params, updates), count, rule)
    if rule.norm_bias == "freeze":
      target = _keep(target, params, _norm_bias_paths(resolve(params, rule)[0],
                                                      _flat(params)))
    # Leaf by leaf inside the boxes: the updates keep the structure (and boxes) of the
    # params, as the wrapped optimizer's did.
    updates = jax.tree.map(lambda t, p: (t - p).astype(p.dtype), target, params)
    return updates, ProjectionState(inner, count)

  return optax.GradientTransformation(init_fn, update_fn)
