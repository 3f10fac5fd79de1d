"""Jitted-friendly sparsity metrics from sown intermediates, probe gradients and params.

Every function here is pure jnp and returns a flat dict of scalars named
`<metric>/layer_<i>` plus `<metric>/mean` (the mean over layers). Layers are the MLP
blocks in the order of their parameter paths (natural sort: block_2 before block_10).
Definitions follow the method (Peng et al.): a unit is active when |a| > 1e-6; its
derivative is zero when z <= 0; dL/dz comes from zero-valued probes on z.
"""
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

ACTIVE_THRESHOLD = 1e-6
GRADIENT_THRESHOLDS = (1e-9, 1e-6, 1e-3)


def _natural_key(path: tuple[str, ...]) -> list:
  return [int(t) if t.isdigit() else t
          for part in path for t in re.split(r"(\d+)", part) if t]


def mlp_blocks(tree: Mapping[str, Any], leaf_names: tuple[str, ...]
               ) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
  """[(module path, {leaf: value})] for every module holding all of `leaf_names`.

  Sown values are tuples (one entry per call); the last call's value is used.
  """
  flat = traverse_util.flatten_dict(dict(tree))
  modules: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, value in flat.items():
    if path[-1] in leaf_names:
      modules.setdefault(path[:-1], {})[path[-1]] = (
          value[-1] if isinstance(value, tuple) else value)
  found = [(p, m) for p, m in modules.items() if all(n in m for n in leaf_names)]
  return sorted(found, key=lambda item: _natural_key(item[0]))


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of x [B, ...] over everything, with examples weighted by mask [B] (or None)."""
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.mean(x)
  per_example = jnp.mean(x, axis=tuple(range(1, x.ndim)))
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _with_mean(name: str, values: list[jax.Array]) -> dict[str, jax.Array]:
  out = {f"{name}/layer_{i}": v for i, v in enumerate(values)}
  if values:
    out[f"{name}/mean"] = jnp.mean(jnp.stack(values))
  return out


def activation_metrics(intermediates: Mapping[str, Any],
                       mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Activation density (1 - sparsity) and derivative sparsity per MLP layer."""
  blocks = mlp_blocks(intermediates, ("z", "a"))
  density = [masked_mean(jnp.abs(m["a"]) > ACTIVE_THRESHOLD, mask) for _, m in blocks]
  derivative = [masked_mean(m["z"] <= 0, mask) for _, m in blocks]
  return {**_with_mean("activation_density", density),
          **_with_mean("derivative_sparsity", derivative)}


def gradient_metrics(probe_grads: Mapping[str, Any],
                     mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Effective gradient sparsity mean 1[|dL/dz| < p] and the per-token ||dL/dy||.

  `probe_grads` is the gradient of the loss with respect to the 'perturbations'
  collection (zero probes on z and y of every MLP).
  """
  blocks = mlp_blocks(probe_grads, ("z", "y"))
  out: dict[str, jax.Array] = {}
  for p in GRADIENT_THRESHOLDS:
    out.update(_with_mean(f"gradient_sparsity_{p:g}",
                          [masked_mean(jnp.abs(m["z"]) < p, mask) for _, m in blocks]))
  out.update(_with_mean("output_gradient_norm", [
      masked_mean(jnp.linalg.norm(m["y"].astype(jnp.float32), axis=-1), mask)
      for _, m in blocks]))
  return out


def parameter_metrics(params: Mapping[str, Any],
                      zeroth_bias_path: tuple[str, ...] = ("mlp", "zeroth_bias"),
                      norm_scale_path: tuple[str, ...] = ("mlp_norm", "scale")
                      ) -> dict[str, jax.Array]:
  """Zeroth-bias mean |b| and pre-MLP norm mean |gamma| per layer."""
  flat = traverse_util.flatten_dict(dict(params))

  def per_layer(suffix):
    paths = sorted((p for p in flat if p[-len(suffix):] == suffix), key=_natural_key)
    return [jnp.mean(jnp.abs(flat[p])) for p in paths]

  return {**_with_mean("zeroth_bias_abs", per_layer(zeroth_bias_path)),
          **_with_mean("norm_scale_abs", per_layer(norm_scale_path))}


def _targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Soft targets [B, C] from class ids [B] or soft targets [B, C]."""
  if labels.ndim == logits.ndim:
    return labels
  return jax.nn.one_hot(labels, logits.shape[-1])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy [B]; labels are class ids [B] or soft targets [B, C]."""
  return -jnp.sum(_targets(logits, labels) * jax.nn.log_softmax(logits), axis=-1)


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Cross-entropy and top-1 accuracy; labels are class ids [B] or soft targets [B, C]."""
  label_ids = jnp.argmax(labels, axis=-1) if labels.ndim == logits.ndim else labels
  correct = jnp.argmax(logits, axis=-1) == label_ids
  return {"loss": masked_mean(cross_entropy(logits, labels), mask),
          "accuracy": masked_mean(correct, mask)}
