"""sparse_jax: activation-sparse Transformer MLPs in JAX/Flax.

The method in your own Flax Linen or NNX model (names resolve lazily, see below):

  sparsify(model, activation=, zeroth_bias=, max_len=, weight_noise=, match=, gate=,
           observe=, dense_types=, rngs=)
      the model with its MLP blocks (two-Dense and gated GLU blocks) sparsified
      (J-SquaredReLU, zeroth bias, per-token weight noise, observation hooks), a Linen
      module (`transforms.sparsify`); the defaults are the papers' sparsified recipe.
      A Flax NNX model is sparsified in place and returned (`transforms.sparsify_nnx`).
  set_mixing(nnx_model, k)     the JSReLU share of an NNX model sparsified 'mixed'.
  Sparsified, MlpRule          the module `sparsify` returns; the MLP matching rule.
  merge_pretrained(sparse_model, pretrained, *inputs, **kwargs)
  merge_pretrained(params, pretrained)
      loads the original model's params (boxed or not) into the sparsified model's.
  param_shapes(model, *inputs, **kwargs)
      a model's params as shapes, keyword arguments (`train=False`) bound before tracing.
  optax_projections(tx, norm_projection=, zeroth_bias_clipping=, norm_pattern=, ...)
      any optax optimizer plus the zeroth-bias box and restricted-LayerNorm clamp /
      uplift after every update (`transforms.sparsify_params`).
  ProjectionRule, with_projections
      the path rule and optax wrapper beneath it (`transforms.projections`).
  noisy_apply(apply_fn, rho, predicate), perturb_params(params, rng, rho, predicate)
      per-step weight noise for any apply function (`transforms.weight_noise`).
  find_mlp_blocks(model, *args), mlp_kernel_predicate(paths)
      the matched blocks' paths and a predicate on their kernels (`transforms.mlp_rule`).
  metrics                      activation / gradient / parameter / theory metrics from sown
      intermediates, probe gradients and params (`sparse_jax.metrics`).
  lora                         LoRA on any params tree: add_adapters, merge (W + A B / r,
      also the export), trainable_labels for optax.multi_transform
      (`transforms.lora`).

`import sparse_jax` itself imports nothing heavy (no JAX): the CLI imports
`sparse_jax.errors` before JAX is configured. Each name above is imported on first use
by the module-level `__getattr__`; add new public names to `_LAZY`.
"""
import importlib
from typing import Any

from sparse_jax import host as _host

__version__ = "0.1.0"

# Before anything imports JAX: on a host with libtpu but no TPU, keep JAX on the CPU
# (and libtpu's start-up warnings away); see sparse_jax/host.py.
_host.use_cpu_without_accelerator()

# Public name -> (module, attribute); attribute None means the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "sparsify": ("sparse_jax.transforms.sparsify", "sparsify"),
    "set_mixing": ("sparse_jax.transforms.sparsify_nnx", "set_mixing"),
    "Sparsified": ("sparse_jax.transforms.sparsify", "Sparsified"),
    "MlpRule": ("sparse_jax.transforms.mlp_rule", "MlpRule"),
    "find_mlp_blocks": ("sparse_jax.transforms.mlp_rule", "find_mlp_blocks"),
    "mlp_kernel_predicate": ("sparse_jax.transforms.mlp_rule", "mlp_kernel_predicate"),
    "merge_pretrained": ("sparse_jax.transforms.sparsify_params", "merge_pretrained"),
    "optax_projections": ("sparse_jax.transforms.sparsify_params", "optax_projections"),
    "param_shapes": ("sparse_jax.transforms.sparsify_params", "param_shapes"),
    "ProjectionRule": ("sparse_jax.transforms.projections", "ProjectionRule"),
    "with_projections": ("sparse_jax.transforms.projections", "with_projections"),
    "noisy_apply": ("sparse_jax.transforms.weight_noise", "noisy_apply"),
    "perturb_params": ("sparse_jax.transforms.weight_noise", "perturb_params"),
    "metrics": ("sparse_jax.metrics", None),
    "lora": ("sparse_jax.transforms.lora", None),
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'sparse_jax' has no attribute {name!r}")
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value  # Later lookups skip __getattr__.
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
