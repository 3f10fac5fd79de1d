"""Jitted-friendly sparsity metrics from sown intermediates, probe gradients and params.

Every function here is pure jnp and returns a flat dict of scalars named
`<metric>/layer_<i>` plus `<metric>/mean` (the mean over layers). Layers are the MLP
blocks in the order of their parameter paths (natural sort: block_2 before block_10).
Models with several stacks (T5's encoder and decoder) pass `masks` as a mapping from the
top-level module name to that stack's token mask; keys are then
`<metric>/<stack>/layer_<i>`, `<metric>/<stack>/mean` and `<metric>/mean` over all layers.
Definitions follow the method (Peng et al.): a unit is active when |a| > 1e-6; its
derivative is zero when z <= 0; dL/dz comes from zero-valued probes on z.
"""
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict

ACTIVE_THRESHOLD = 1e-6
GRADIENT_THRESHOLDS = (1e-9, 1e-6, 1e-3)


def _natural_key(path: tuple[str, ...]) -> list:
  return [int(t) if t.isdigit() else t
          for part in path for t in re.split(r"(\d+)", part) if t]


# A zero scalar that `sparsify` sows (and adds as a probe) in each block it rewrites. A
# lifted transform that stacks the blocks (nn.scan over layers) stacks it too, to
# [layers]; its shape tells mlp_blocks to read such a block as that many layers.
STACK_MARKER = "stack_marker"


def plain_tree(tree: Mapping[Any, Any]) -> Mapping[str, Any]:
  """A Linen collection as it is; a Flax NNX `State` (what `nnx.capture` and
  `nnx.grad` return) as nested dicts with str keys holding its Variables' values."""
  if isinstance(tree, (dict, FrozenDict)):
    return tree
  return {str(k): plain_tree(v) if isinstance(v, Mapping) else
          (v.get_value() if hasattr(v, "get_value") else v) for k, v in tree.items()}


def mlp_blocks(tree: Mapping[str, Any], leaf_names: tuple[str, ...]
               ) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
  """[(module path, {leaf: value})] for every module holding all of `leaf_names`.

  Sown values are tuples (one entry per call); the last call's value is used. A block
  stacked by nn.scan (its STACK_MARKER has shape [layers], or [n, m] for nested scans)
  becomes one entry per layer, path + ('0',), path + ('1',), ...
  `tree` may be an NNX State (`plain_tree`).
  """
  flat = traverse_util.flatten_dict(dict(plain_tree(tree)))
  modules: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, value in flat.items():
    if path[-1] in leaf_names or path[-1] == STACK_MARKER:
      modules.setdefault(path[:-1], {})[path[-1]] = (
          value[-1] if isinstance(value, tuple) else value)
  found = []
  for path, m in modules.items():
    marker = m.pop(STACK_MARKER, None)
    if not all(n in m for n in leaf_names):
      continue
    stacked = () if marker is None else tuple(marker.shape)
    if not stacked:
      found.append((path, m))
      continue
    layers = 1
    for size in stacked:
      layers *= size
    per_layer = {k: v.reshape((layers,) + v.shape[len(stacked):]) for k, v in m.items()}
    found += [(path + (str(i),), {k: v[i] for k, v in per_layer.items()})
              for i in range(layers)]
  return sorted(found, key=lambda item: _natural_key(item[0]))


Mask = jax.Array | None
Masks = Mask | Mapping[str, jax.Array]


def masked_mean(x: jax.Array, mask: Mask) -> jax.Array:
  """Mean of x over everything, weighting its leading dims by mask ([B] per example,
  [B, L] per token; None = unweighted)."""
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.mean(x)
  mask = mask.astype(jnp.float32)
  per_item = jnp.mean(x, axis=tuple(range(mask.ndim, x.ndim)))
  return jnp.sum(per_item * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _with_mean(name: str, values: list[jax.Array]) -> dict[str, jax.Array]:
  out = {f"{name}/layer_{i}": v for i, v in enumerate(values)}
  if values:
    out[f"{name}/mean"] = jnp.mean(jnp.stack(values))
  return out


def _per_layer(name: str, blocks: list[tuple[tuple[str, ...], Any]], value_fn,
               masks: Masks) -> dict[str, jax.Array]:
  """value_fn(block, mask) per block, named per layer (and per stack if masks is a map)."""
  if not isinstance(masks, Mapping):
    return _with_mean(name, [value_fn(m, masks) for _, m in blocks])
  stray = ["/".join(p) for p, _ in blocks if p[0] not in masks]
  if stray:
    raise ValueError(f"MLP blocks {stray} are in none of the stacks {sorted(masks)}.")
  out, every = {}, []
  for stack, mask in masks.items():
    values = [value_fn(m, mask) for p, m in blocks if p[0] == stack]
    out.update(_with_mean(f"{name}/{stack}", values))
    every += values
  if every:
    out[f"{name}/mean"] = jnp.mean(jnp.stack(every))
  return out


def _layer_names(blocks: list[tuple[tuple[str, ...], Any]], masks: Masks
                 ) -> list[tuple[str, Any, Mask]]:
  """(name suffix, block, mask) per layer: 'layer_<i>', or '<stack>/layer_<i>' when
  masks is a map from stack name to mask (the naming `_per_layer` uses)."""
  if not isinstance(masks, Mapping):
    return [(f"layer_{i}", m, masks) for i, (_, m) in enumerate(blocks)]
  stray = ["/".join(p) for p, _ in blocks if p[0] not in masks]
  if stray:
    raise ValueError(f"MLP blocks {stray} are in none of the stacks {sorted(masks)}.")
  out = []
  for stack, mask in masks.items():
    out += [(f"{stack}/layer_{i}", m, mask)
            for i, m in enumerate(m for p, m in blocks if p[0] == stack)]
  return out


def activation_metrics(intermediates: Mapping[str, Any],
                       mask: Masks = None) -> dict[str, jax.Array]:
  """Activation density (1 - sparsity) and derivative sparsity per MLP layer."""
  blocks = mlp_blocks(intermediates, ("z", "a"))
  return {
      **_per_layer("activation_density", blocks,
                   lambda m, k: masked_mean(jnp.abs(m["a"]) > ACTIVE_THRESHOLD, k), mask),
      **_per_layer("derivative_sparsity", blocks,
                   lambda m, k: masked_mean(m["z"] <= 0, k), mask)}


# ------------------------------------------------------------ dead and live units
# A unit (one of an MLP layer's d_ff hidden units) is dead when it is active on none of
# the tokens seen: over the whole eval split in eval mode, over the logged batch in
# training mode. Dead units make a narrower network (prunable once); the papers' claim
# is about live units that are rarely active. The counts are sums, so they add over
# batches (and, inside jit, over the devices the batch is split across) before the
# shares are taken: a unit dead in every batch can be alive over the split.
UNIT_METRICS = ("dead_unit_share", "live_unit_density", "effective_width")


def unit_activity(intermediates: Mapping[str, Any], mask: Masks = None
                  ) -> dict[str, dict[str, jax.Array]]:
  """Per MLP layer: {'active': [units] int32, 'tokens': int32 scalar}.

  'active' counts the tokens on which each unit is active (|a| > 1e-6), 'tokens' the
  tokens counted; only real tokens count (mask > 0, with mask [B] per example or
  [B, L] per token as in `masked_mean`). Layers are named as in `_per_layer` ('layer_i',
  or '<stack>/layer_i' with a map of masks). Add these over batches, then take
  `unit_metrics`.
  """
  blocks = mlp_blocks(intermediates, ("z", "a"))
  out = {}
  for name, m, mask in _layer_names(blocks, mask):
    active = jnp.abs(m["a"]) > ACTIVE_THRESHOLD          # [B, ..., units]
    real = jnp.ones(active.shape[:-1], bool)
    if mask is not None:
      real = real & (mask > 0).reshape(mask.shape + (1,) * (real.ndim - mask.ndim))
    # Integer counts: float32 sums stop being exact past 2^24 tokens (a large eval split).
    counted = (active & real[..., None]).astype(jnp.int32)
    out[name] = {"active": jnp.sum(counted.reshape(-1, active.shape[-1]), axis=0),
                 "tokens": jnp.sum(real.astype(jnp.int32))}
  return out


def unit_metrics(activity: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
  """Dead units, live-unit density and effective width from (summed) `unit_activity`.

  Per layer: dead_unit_share = share of units active on no token; effective_width =
  the number of live units; live_unit_density = active (token, unit) pairs / (tokens x
  live units), the density among live units (0 when every unit is dead). So density =
  (1 - dead_unit_share) x live_unit_density. Plus '<metric>/mean' over all layers and,
  for named stacks ('encoder/layer_0'), '<metric>/<stack>/mean'; the live-unit
  density's means are over the layers that have live units (a layer whose units all
  died has no density among live units; counting it as 0 would call the network
  sparser for losing that layer), 0 when no layer has any.
  """
  per_layer: dict[str, dict[str, jax.Array]] = {n: {} for n in UNIT_METRICS}
  for name, counts in activity.items():
    active = counts["active"]
    live = (active > 0).astype(jnp.float32)
    width = jnp.sum(live)
    # float32 before multiplying: tokens x width can pass int32's range.
    pairs = jnp.sum(active.astype(jnp.float32))
    slots = counts["tokens"].astype(jnp.float32) * width
    # Counted, not 1 - mean(live): exactly 0 when no unit is dead.
    per_layer["dead_unit_share"][name] = jnp.mean((active == 0).astype(jnp.float32))
    per_layer["effective_width"][name] = width
    per_layer["live_unit_density"][name] = jnp.where(slots > 0, pairs / jnp.maximum(
        slots, 1.0), 0.0)
  def mean(metric: str, names: list[str]) -> jax.Array:
    values = jnp.stack([per_layer[metric][n] for n in names])
    if metric != "live_unit_density":
      return jnp.mean(values)
    alive = jnp.stack([per_layer["effective_width"][n] for n in names]) > 0
    return jnp.sum(jnp.where(alive, values, 0.0)) / jnp.maximum(jnp.sum(alive), 1)

  out: dict[str, jax.Array] = {}
  stacks: dict[str, list[str]] = {}
  for name in activity:
    stack = name.rpartition("/")[0]
    if stack:
      stacks.setdefault(stack, []).append(name)
  for metric, values in per_layer.items():
    for name, v in values.items():
      out[f"{metric}/{name}"] = v
    for stack, names in stacks.items():
      out[f"{metric}/{stack}/mean"] = mean(metric, names)
    if values:
      out[f"{metric}/mean"] = mean(metric, list(values))
  return out


def gradient_metrics(probe_grads: Mapping[str, Any],
                     mask: Masks = None) -> dict[str, jax.Array]:
  """Effective gradient sparsity mean 1[|dL/dz| < p] and the per-token ||dL/dy||.

  `probe_grads` is the gradient of the loss with respect to the 'perturbations'
  collection (zero probes on z and y of every MLP).
  """
  blocks = mlp_blocks(probe_grads, ("z", "y"))
  out: dict[str, jax.Array] = {}
  for p in GRADIENT_THRESHOLDS:
    out.update(_per_layer(f"gradient_sparsity_{p:g}", blocks,
                          lambda m, k, p=p: masked_mean(jnp.abs(m["z"]) < p, k), mask))
  out.update(_per_layer(
      "output_gradient_norm", blocks,
      lambda m, k: masked_mean(jnp.linalg.norm(m["y"].astype(jnp.float32), axis=-1), k),
      mask))
  return out


def _joined_blocks(intermediates: Mapping[str, Any], probe_grads: Mapping[str, Any]
                   ) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
  """MLP blocks with their sown values (x, a, derivative, w2) and probe gradients
  (dL/dz as 'eta', dL/dy as 'dy'), joined on the module path."""
  grads = dict(mlp_blocks(probe_grads, ("z", "y")))
  return [(p, {**m, "eta": grads[p]["z"], "dy": grads[p]["y"]})
          for p, m in mlp_blocks(intermediates, ("x", "a", "derivative", "w2"))
          if p in grads]


def _sq_norm(v: jax.Array) -> jax.Array:
  """Squared norm over the last axis, in float32: [..., d] -> [...]."""
  return jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1)


def _activation_gradient(m: Mapping[str, jax.Array]) -> jax.Array:
  """g = dL/da = dL/dy W2^T per token (what W2 sees; no extra probe needed)."""
  w2 = m["w2"].astype(jnp.float32)
  return jnp.dot(m["dy"].astype(jnp.float32), w2.T)


def _flatness_density(m: Mapping[str, jax.Array], mask: Mask) -> jax.Array:
  """mean_(t,i) g^2 1[a > 0] ||x_t||^2 / mean_(t,i) g^2 ||x_t||^2."""
  g2 = jnp.square(_activation_gradient(m))
  x2 = _sq_norm(m["x"])
  active = (m["a"] > 0).astype(jnp.float32)
  masked = masked_mean(jnp.sum(g2 * active, axis=-1) * x2, mask)
  whole = masked_mean(jnp.sum(g2, axis=-1) * x2, mask)
  return masked / jnp.maximum(whole, jnp.finfo(jnp.float32).tiny)


def flatness_metrics(intermediates: Mapping[str, Any], probe_grads: Mapping[str, Any],
                     mask: Masks = None) -> dict[str, jax.Array]:
  """The theory's gradient and flatness quantities per MLP layer (Peng et al.).

  Needs the blocks' sown 'x', 'a', 'derivative', 'w2' and the probe gradients dL/dz
  (eta) and dL/dy. Per token t (means over real tokens; f' = the activation's
  derivative, g = dL/da = dL/dy W2^T):
  * derivative_square: mean over tokens and units of f'(z)^2;
  * effective_gradient_l1 / _l2: mean of sum_i |eta_ti| / sum_i eta_ti^2;
  * activation_gradient_norm: mean of ||g_t||^2;
  * augmented_flatness_key: mean of ||eta_t||^2 ||x_t||^2 (the per-token squared norm
    of dL/dW1 for a one-token loss), augmented_flatness_value: mean of
    ||dL/dy_t||^2 ||a_t||^2 (the same for W2);
  * flatness_density: mean of g_ti^2 1[a_ti > 0] ||x_t||^2 over (t, i) divided by the
    same mean without the mask, the follow-up paper's density as a ratio of augmented
    flatness to input norm x activation gradient (for ReLU its numerator is the key).
  """
  blocks = _joined_blocks(intermediates, probe_grads)
  f32 = lambda v: v.astype(jnp.float32)
  per_token = {
      "derivative_square": lambda m: jnp.square(f32(m["derivative"])),
      "effective_gradient_l1": lambda m: jnp.sum(jnp.abs(f32(m["eta"])), axis=-1),
      "effective_gradient_l2": lambda m: _sq_norm(m["eta"]),
      "activation_gradient_norm": lambda m: _sq_norm(_activation_gradient(m)),
      "augmented_flatness_key": lambda m: _sq_norm(m["eta"]) * _sq_norm(m["x"]),
      "augmented_flatness_value": lambda m: _sq_norm(m["dy"]) * _sq_norm(m["a"]),
  }
  out: dict[str, jax.Array] = {}
  for name, value in per_token.items():
    out.update(_per_layer(name, blocks, lambda m, k, v=value: masked_mean(v(m), k), mask))
  out.update(_per_layer("flatness_density", blocks, _flatness_density, mask))
  return out


def default_spectral_threshold(shape: tuple[int, ...]) -> float:
  """t = 10 min(d_in, d_out) / max(d_in, d_out): the official analysis's t = 10 on the
  [d_ff, d_ff] Gram matrix (rank d_model, its mean diluted by the structural zeros),
  restated for the min(d_in, d_out) eigenvalues computed here (2.5 for ViT-B/16 and
  T5-Base)."""
  return 10.0 * min(shape) / max(shape)


def spectrum(kernel: jax.Array, platform: str | None = None) -> jax.Array:
  """Eigenvalues (ascending, >= 0) of the Gram matrix of a kernel [d_in, d_out] on its
  smaller side: the min(d_in, d_out) squared singular values.

  `platform`: where the program runs, if not this host's default. On 'tpu' the
  eigenvalues come from the TPU's Jacobi eigensolver, one custom call: JAX's default
  there (QDWH) is plain HLO that took the TPU compiler minutes per 768 x 768 matrix,
  most of a ViT-B/16 logging step's compile time.
  """
  w = kernel.astype(jnp.float32)
  gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
  if (platform or jax.default_backend()) == "tpu":
    _, lam = jax.lax.linalg.eigh(gram, implementation=jax.lax.linalg.EighImplementation.JACOBI)
  else:
    lam = jnp.linalg.eigvalsh(gram)
  return jnp.maximum(lam, 0.0)


def spectral_values(kernel: jax.Array, threshold: float | None = None,
                    platform: str | None = None) -> dict[str, jax.Array]:
  """Spectral increase and concentration of one kernel W1 [d_in, d_out].

  Returns w1_frobenius_sq = ||W1||_F^2, spectral_nonzero_fraction = share of the
  eigenvalues lambda (see `spectrum`) above t * mean(lambda), and spectral_ratio =
  lambda_max / the smallest such eigenvalue (1 when none is above the threshold; its
  square root is the singular-value ratio). t defaults to `default_spectral_threshold`.
  """
  t = default_spectral_threshold(kernel.shape) if threshold is None else threshold
  lam = spectrum(kernel, platform)
  nonzero = lam > t * jnp.mean(lam)
  largest = lam[-1]
  smallest = jnp.min(jnp.where(nonzero, lam, largest))
  return {"w1_frobenius_sq": jnp.sum(jnp.square(kernel.astype(jnp.float32))),
          "spectral_nonzero_fraction": jnp.mean(nonzero.astype(jnp.float32)),
          "spectral_ratio": largest / jnp.maximum(smallest, jnp.finfo(jnp.float32).tiny)}


def spectral_metrics(intermediates: Mapping[str, Any], threshold: float | None = None,
                     stacks: tuple[str, ...] | None = None,
                     platform: str | None = None) -> dict[str, jax.Array]:
  """`spectral_values` of the 'w1' kernel every MLP block sowed, per layer (per stack
  if given) and mean: w1_frobenius_sq, spectral_ratio, spectral_nonzero_fraction.
  `platform`: see `spectrum`."""
  blocks = mlp_blocks(intermediates, ("w1",))
  masks = None if stacks is None else {s: None for s in stacks}
  values = [spectral_values(m["w1"], threshold, platform) for _, m in blocks]
  out: dict[str, jax.Array] = {}
  for name in ("w1_frobenius_sq", "spectral_ratio", "spectral_nonzero_fraction"):
    named = [(p, v[name]) for (p, _), v in zip(blocks, values)]
    out.update(_per_layer(name, named, lambda v, _: v, masks))
  return out


def parameter_metrics(params: Mapping[str, Any],
                      zeroth_bias_path: tuple[str, ...] | str = ("mlp", "zeroth_bias"),
                      norm_scale_path: tuple[str, ...] | str = ("mlp_norm", "scale"),
                      stacks: tuple[str, ...] | None = None) -> dict[str, jax.Array]:
  """Zeroth-bias mean |b| and pre-MLP norm mean |gamma| per layer (per stack if given).

  Paths are suffixes, or regexes as in `transforms.projections.ProjectionRule` (for
  a model from `sparsify`: `r"(^|/)zeroth_bias$"` and a regex on the names of the MLP
  block's sibling modules, e.g. `r"(?i)norm"`; the norms are then those feeding the
  zeroth-biased MLPs). `params` may be an NNX State (`nnx.state(model, nnx.Param)`).
  """
  params = plain_tree(params)
  flat = traverse_util.flatten_dict(dict(params))
  masks = None if stacks is None else {s: None for s in stacks}
  if isinstance(zeroth_bias_path, str) or isinstance(norm_scale_path, str):
    # Imported here: projections pulls in optax, which suffix paths do not need.
    from sparse_jax.transforms import projections  # pylint: disable=g-import-not-at-top
    norms, pairs = projections.resolve(params, projections.ProjectionRule(
        zeroth_bias_clipping=None, norm_projection=None,
        zeroth_bias_path=zeroth_bias_path, norm_scale_path=norm_scale_path))
    found = {"zeroth_bias_abs": [p for p, _ in pairs], "norm_scale_abs": norms}
  else:
    found = {name: [p for p in flat if p[-len(suffix):] == suffix] for name, suffix in
             (("zeroth_bias_abs", zeroth_bias_path), ("norm_scale_abs", norm_scale_path))}

  # A zeroth bias table is [rows, d] and a norm scale [d]: leading axes beyond those
  # are the layers of an nn.scan stack, read as one entry per layer.
  table_ndim = {"zeroth_bias_abs": 2, "norm_scale_abs": 1}

  def per_layer(name):
    blocks = []
    for p in sorted(found[name], key=_natural_key):
      v = flat[p]
      stacked = v.shape[:v.ndim - table_ndim[name]]
      if not stacked:
        blocks.append((p, v))
        continue
      v = v.reshape((-1,) + v.shape[len(stacked):])
      blocks += [(p + (str(i),), v[i]) for i in range(v.shape[0])]
    return _per_layer(name, blocks, lambda v, _: jnp.mean(jnp.abs(v)), masks)

  return {**per_layer("zeroth_bias_abs"), **per_layer("norm_scale_abs")}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy per position of logits [..., C]; labels are class ids [...] or soft
  targets [..., C]."""
  log_probs = jax.nn.log_softmax(logits)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels * log_probs, axis=-1)
  # Ids: a gather, not a one-hot as large as the logits (T5's vocabulary is 32k).
  return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Cross-entropy and top-1 accuracy; labels are class ids [B] or soft targets [B, C]."""
  label_ids = jnp.argmax(labels, axis=-1) if labels.ndim == logits.ndim else labels
  correct = jnp.argmax(logits, axis=-1) == label_ids
  return {"loss": masked_mean(cross_entropy(logits, labels), mask),
          "accuracy": masked_mean(correct, mask)}


def token_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> dict[str, jax.Array]:
  """Token cross-entropy and accuracy of logits [B, L, V] against targets [B, L],
  averaged over tokens with weights [B, L] (0 for padding)."""
  correct = jnp.argmax(logits, axis=-1) == targets
  return {"loss": masked_mean(cross_entropy(logits, targets), weights),
          "accuracy": masked_mean(correct, weights)}


# ------------------------------------------------------------- validation experiments
def s_shaped_metrics(intermediates: Mapping[str, Any], shift_x: float, shift_y: float,
                     half_width: float, mask: Masks = None) -> dict[str, jax.Array]:
  """Where the S-shaped activation's inputs and outputs sit, per MLP layer.

  `activation_concentration`: share of z in the flat region [s_x - w, s_x + w] (where
  f'(z) = 0); `flat_output_share`: share of a with |a - s_y| <= 1e-6 (the activation
  sparsity of this activation, measured at its flat value s_y instead of at 0).
  """
  blocks = mlp_blocks(intermediates, ("z", "a"))
  return {
      **_per_layer("activation_concentration", blocks,
                   lambda m, k: masked_mean(jnp.abs(m["z"] - shift_x) <= half_width, k),
                   mask),
      **_per_layer("flat_output_share", blocks,
                   lambda m, k: masked_mean(jnp.abs(m["a"] - shift_y) <= ACTIVE_THRESHOLD,
                                            k), mask)}


def _largest_to_mean_eigenvalue(per_example: jax.Array) -> jax.Array:
  """lambda_max / mean(lambda) of the covariance over the batch of rows [B, D].

  The mean runs over all D eigenvalues (trace / D), zeros included when B <= D; the
  largest comes from the smaller of the D x D covariance and the B x B Gram matrix of
  the centred rows, which share their nonzero eigenvalues.
  """
  g = per_example.reshape(per_example.shape[0], -1).astype(jnp.float32)
  g = g - jnp.mean(g, axis=0, keepdims=True)
  n, d = g.shape
  gram = g @ g.T if n <= d else g.T @ g
  largest = jnp.linalg.eigvalsh(gram)[-1]
  mean = jnp.trace(gram) / d
  return largest / jnp.maximum(mean, jnp.finfo(jnp.float32).tiny)


def gradient_noise_anisotropy(probe_grads: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Anisotropy of the gradient noise at each block output, per layer + mean.

  For every module with a 'block_output' probe (the residual MLP's blocks): the ratio of
  the largest to the mean eigenvalue of the covariance over the batch of the per-example
  dL/d(block output). The loss is a batch mean, so the probe gradients are per-example
  gradients / B; the ratio does not depend on that scale. {} when no such probe exists.
  """
  blocks = mlp_blocks(probe_grads, ("block_output",))
  return _per_layer("gradient_noise_anisotropy", blocks,
                    lambda m, _: _largest_to_mean_eigenvalue(m["block_output"]), None)
