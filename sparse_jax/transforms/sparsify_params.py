"""The parameter side of `sparsify`: pretrained params and the optax projections.

`merge_pretrained` loads a checkpoint of the original model into the sparsified one
(same tree plus zero zeroth biases); `param_shapes` traces the sparsified model's
param shapes with keyword arguments bound. Both, and `optax_projections`, take params
with or without Flax's partitioning boxes (`nn.with_logical_partitioning`) and return
them as they were given. `optax_projections` wraps any optax optimizer
with the method's post-update projections, finding its parameters by path: the
`zeroth_bias` leaves `sparsify` adds, and for each the norm feeding its MLP block: a
sibling module of the block whose name matches a regex (`DEFAULT_NORM_PATTERN`), the
one named after the block if any, else the last in natural order.

Restricted LayerNorm without a bias (from scratch): the norm's `bias` leaf stays in the
tree (checkpoints of the original still load) and the projection keeps it at zero
after every update, which equals a bias-free norm whatever the optimizer does to it
(weight decay, momentum). Finetuning ('uplift') freezes that bias instead: its update
is zero, so it keeps the pretrained value.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from sparse_jax.transforms import projections
from sparse_jax.transforms.sparsify_block import ZEROTH_BIAS

# The zeroth biases `sparsify` creates, as a regex on the '/'-joined param path.
ZEROTH_BIAS_PATTERN = r"(^|/)zeroth_bias$"
# The norms: sibling modules of an MLP block whose names match. Of those, the one named
# after the MLP (mlp_norm, ln_mlp, ffn_norm) feeds it, else the last in natural order:
# LayerNorm_1 of a pre-LN encoder block (LayerNorm_0 feeds attention), LayerNorm_2 of
# a decoder block.
DEFAULT_NORM_PATTERN = r"(?i)norm|^ln"


def param_shapes(model: nn.Module, *args, method: str | None = None,
                 **kwargs) -> Any:
  """`model.init(rngs, *args, **kwargs)["params"]` as shapes (`jax.ShapeDtypeStruct`,
  in the model's boxes if it has any), traced shape-only: nothing is computed.

  Keyword arguments (`train=False`) are bound before tracing: passed to
  `jax.eval_shape(model.init, ...)` they would be traced and break a Python `if`.
  The rngs are 'params' and 'dropout'.
  """
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  init = functools.partial(model.init, rngs, *args, method=method, **kwargs)
  return jax.eval_shape(init)["params"]


def _is_box(value: Any) -> bool:
  return isinstance(value, nn.meta.AxisMetadata)


def merge_pretrained(params: Any, pretrained: Any, *args, method: str | None = None,
                     **kwargs) -> Any:
  """The sparsified model's params with every leaf `pretrained` has taken from it.

  Two forms:
  * `merge_pretrained(sparse_model, pretrained, *example_inputs, **kwargs)`: the model
    and the arguments of its call (`train=False` included); its params' shapes come from
    `param_shapes`, so no init is computed. The result is boxed as `pretrained` is:
    unboxed for a plain checkpoint, in the model's `nn.with_logical_partitioning`
    boxes when `pretrained` has boxes.
  * `merge_pretrained(params, pretrained)`: `params` is `sparse_model.init(...)
    ["params"]` or its shapes; the result is boxed exactly as `params` is.

  Either tree may hold `nn.LogicallyPartitioned` / `nn.Partitioned` boxes. Leaves only
  known by shape must be zeroth biases (zero-initialised) and are filled with zeros.
  Raises if `pretrained` has a path the model lacks or a different shape there, so a
  checkpoint of another model is not silently half-loaded.
  """
  if isinstance(params, nn.Module):
    shapes = param_shapes(params, *args, method=method, **kwargs)
    boxed = any(_is_box(v) for v in jax.tree.leaves(pretrained, is_leaf=_is_box))
    return merge_pretrained(shapes if boxed else nn.meta.unbox(shapes), pretrained)
  if args or kwargs or method is not None:
    raise TypeError("merge_pretrained(params, pretrained) takes no example inputs.\nFix: "
                    "pass the model first to trace its shapes: merge_pretrained("
                    "sparse_model, pretrained, *example_inputs, **kwargs).")
  raw = traverse_util.flatten_dict(dict(params))
  flat = {p: v.unbox() if _is_box(v) else v for p, v in raw.items()}
  old = {p: v.unbox() if _is_box(v) else v
         for p, v in traverse_util.flatten_dict(dict(pretrained)).items()}
  missing = ["/".join(p) for p in old if p not in flat]
  if missing:
    raise ValueError(f"Pretrained params {missing[:5]} are not in the sparsified model."
                     "\nFix: load a checkpoint of the model that was sparsified, with the "
                     "same config.")
  shapes = ["/".join(p) for p in old if jnp.shape(old[p]) != tuple(flat[p].shape)]
  if shapes:
    raise ValueError(f"Pretrained params {shapes[:5]} have other shapes than the "
                     "model's.\nFix: build the model with the checkpoint's sizes.")
  out = {}
  for path, value in flat.items():
    if path in old:
      value = old[path]
    elif isinstance(value, jax.ShapeDtypeStruct):
      if path[-1] != ZEROTH_BIAS:
        raise ValueError(f"{'/'.join(path)} is neither in the pretrained params nor a "
                         "zeroth bias, and only its shape is known.\nFix: pass the params "
                         "of sparse_model.init(...) instead of its eval_shape.")
      value = jnp.zeros(value.shape, value.dtype)
    out[path] = raw[path].replace_boxed(value) if _is_box(raw[path]) else value
  return traverse_util.unflatten_dict(out)


def optax_projections(tx: optax.GradientTransformation, *,
                      norm_projection: projections.NormProjection | None = "clamp",
                      zeroth_bias_clipping: float | None = 0.1, uplift_steps: int = 0,
                      norm_pattern: str = DEFAULT_NORM_PATTERN,
                      norm_bias: projections.NormBias | None | str = "auto",
                      before_update: bool = False) -> optax.GradientTransformation:
  """Wraps any optax optimizer with the method's projections after every update.

  The zeroth biases are the `zeroth_bias` leaves `sparsify` adds; the restricted norm
  of each is a sibling module of its MLP block whose name matches `norm_pattern`: the
  one whose name contains the block's (mlp -> mlp_norm), else the last in natural
  order (LayerNorm_1 in a Flax-examples encoder block). For other layouts (post-LN
  blocks, a norm named unlike its block) pass a pattern that only that norm matches.
  A rule that finds no zeroth bias or no norm raises at `tx.init` / `tx.update`.
  Params may be boxed (`nn.LogicallyPartitioned`, `nn.Partitioned`): `tx.init` and
  `tx.update` then work on the boxed trees and the updates come back boxed. They may
  also be Flax NNX `State`s: `nnx.Optimizer(model, optax_projections(tx), wrt=nnx.Param)`
  for a model from `sparsify(nnx_model, ...)`.

  Args:
    tx: any optax GradientTransformation (call `tx.update(grads, state, params)`).
    norm_projection: 'clamp' (gamma >= 1, from scratch), 'uplift' (|gamma| >=
      min(step / uplift_steps, 1), finetuning) or None.
    zeroth_bias_clipping: c of the box |b| <= c |gamma|; None leaves biases unclipped.
    uplift_steps: T_up of the uplift.
    norm_pattern: regex on the names of an MLP block's sibling modules.
    norm_bias: the restricted norm's bias: 'zero' (kept at 0: a bias-free norm with
      the tree unchanged), 'freeze' (kept at its pretrained value), None (trained);
      'auto' = 'zero' for clamp, 'freeze' for uplift.
    before_update: project before the update (official ViT code) instead of after.
  """
  if norm_bias == "auto":
    norm_bias = {"clamp": "zero", "uplift": "freeze"}.get(norm_projection)
  if norm_projection is None and zeroth_bias_clipping is None:
    raise ValueError("optax_projections with norm_projection=None and "
                     "zeroth_bias_clipping=None would project nothing.\nFix: use tx as is.")
  rule = projections.ProjectionRule(
      zeroth_bias_clipping=zeroth_bias_clipping, norm_projection=norm_projection,
      uplift_steps=uplift_steps, zeroth_bias_path=ZEROTH_BIAS_PATTERN,
      norm_scale_path=norm_pattern, norm_bias=norm_bias, require_match=True)
  inner = projections.with_projections(tx, rule, before_update=before_update)

  def init_fn(params):
    projections.resolve(params, rule)  # Fails early, with the rule in the message.
    return inner.init(params)

  return optax.GradientTransformation(init_fn, inner.update)

