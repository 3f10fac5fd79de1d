"""`sparsify` on gated MLPs (GLU family): SwiGLU / GeGLU from nn.Dense in either call
order, t5x's MlpBlock on nn.DenseGeneral, and the einsum block it does not support."""
import functools
import operator
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import sparse_jax
from sparsify_cases import outputs_against_the_original, random_pretrained
from sparse_jax import metrics
from sparse_jax.metrics import STACK_MARKER

VOCAB, D, FF, LEN, BATCH = 13, 8, 16, 6, 8
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree))


class SwiGLU(nn.Module):
  """LLaMA-style: down(act(gate(x)) * up(x)), the gate called first."""
  act: Callable = nn.silu

  @nn.compact
  def __call__(self, x, deterministic=True):
    gate = nn.Dense(FF, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(FF, use_bias=False, name="up_proj")(x)
    return nn.Dense(D, use_bias=False, name="down_proj")(self.act(gate) * up)


class UpFirstGLU(nn.Module):
  """The up projection called before the gate (as Hugging Face's Flax Llama)."""
  act: Callable = nn.silu

  def setup(self):
    self.up_proj = nn.Dense(FF, use_bias=False)
    self.gate_proj = nn.Dense(FF, use_bias=False)
    self.down_proj = nn.Dense(D, use_bias=False)

  def __call__(self, x, deterministic=True):
    up = self.up_proj(x)
    return self.down_proj(up * self.act(self.gate_proj(x)))


class T5MlpBlock(nn.Module):
  """t5x's MlpBlock: one DenseGeneral per activation, their product, dropout, wo."""
  activations: tuple = ("relu", "linear")
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, inputs, deterministic=True):
    hidden = []
    for i, name in enumerate(self.activations):
      x = nn.DenseGeneral(FF, use_bias=False, name=f"wi_{i}")(inputs)
      hidden.append(x if name == "linear" else getattr(nn, name)(x))
    x = functools.reduce(operator.mul, hidden)
    x = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    return nn.DenseGeneral(D, use_bias=False, name="wo")(x)


class Einsum(nn.Module):
  """Gemma-like FeedForward: its own kernels and jnp.einsum, no Dense children."""
  @nn.compact
  def __call__(self, x, deterministic=True):
    gating = self.param("gating_einsum", nn.initializers.normal(), (2, D, FF))
    gate, up = jnp.einsum("...d,cdf->c...f", x, gating)
    linear = self.param("linear", nn.initializers.normal(), (FF, D))
    return jnp.einsum("...f,fd->...d", nn.gelu(gate) * up, linear)


class Layer(nn.Module):
  """Pre-LN residual MLP layer (its norm named after the MLP)."""
  mlp: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x, deterministic):
    return x + self.mlp(name="mlp")(nn.LayerNorm(name="mlp_norm")(x), deterministic)


class GluLM(nn.Module):
  """Embedding, two residual MLP layers, a head."""
  mlp: Callable[..., nn.Module] = SwiGLU

  @nn.compact
  def __call__(self, tokens, train=False):
    x = nn.Embed(VOCAB, D)(tokens)
    for i in range(2):
      x = Layer(self.mlp, name=f"layer_{i}")(x, not train)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="final_norm")(x).mean(1))


MODELS = {
    "swiglu": GluLM(functools.partial(SwiGLU, act=nn.relu)),
    "up_first": GluLM(functools.partial(UpFirstGLU, act=nn.relu)),
    "t5x": GluLM(functools.partial(T5MlpBlock)),
}
GLU_TYPES = (SwiGLU, UpFirstGLU, T5MlpBlock)


def _tokens():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, LEN)).astype(np.int32)
  return tokens, (tokens[:, 0] > VOCAB // 2).astype(np.int32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_relu_on_a_relu_glu_gives_the_same_outputs(name):
  model, (tokens, _) = MODELS[name], _tokens()
  pretrained = random_pretrained(model, tokens)
  relu = sparse_jax.sparsify(model, activation="relu", match=GLU_TYPES)
  jsrelu = sparse_jax.sparsify(model, match=GLU_TYPES)
  # The first Dense called taken as the gate: right for all but the up-first block.
  first_gate = sparse_jax.sparsify(model, activation="relu", match=GLU_TYPES, gate=None)
  params = sparse_jax.merge_pretrained(relu, pretrained, tokens)
  assert _flat(params).keys() - _flat(pretrained).keys() == {
      (f"layer_{i}", "mlp", "zeroth_bias") for i in range(2)}
  out = outputs_against_the_original(model, pretrained, tokens, relu, jsrelu, params,
                                     first_gate=first_gate)
  # The gate found (by name, whatever the call order), its activation replaced by ReLU:
  # the ReLU-gated model exactly, with its dropout on the product in training too.
  np.testing.assert_array_equal(out["relu"], out["original"])
  np.testing.assert_array_equal(out["relu_train"], out["original_train"])
  if name == "up_first":
    assert not np.allclose(out["first_gate"], out["original"], atol=1e-3)
  else:
    np.testing.assert_array_equal(out["first_gate"], out["original"])
  if name == "t5x":
    assert not np.allclose(out["original_train"], out["original"], atol=1e-3)
  assert not np.allclose(out["jsrelu"], out["original"], atol=1e-3)
  # Sown: z and a of the gate and its kernel as W1; not the plain-MLP theory inputs.
  inter = out["intermediates"]["layer_0"]["mlp"]
  assert set(inter) == {"z", "a", "w1", STACK_MARKER}
  gate = {"swiglu": "gate_proj", "up_first": "gate_proj", "t5x": "wi_0"}[name]
  np.testing.assert_array_equal(inter["w1"][0], pretrained["layer_0"]["mlp"][gate]["kernel"])
  np.testing.assert_array_equal(inter["a"][0], np.maximum(inter["z"][0], 0.0))


def test_glu_trains_with_the_projections_holding():
  model, (tokens, labels) = GluLM(), _tokens()  # SwiGLU.
  clip = 0.05
  sparse = sparse_jax.sparsify(model, weight_noise=0.05, match=SwiGLU)
  shapes = jax.eval_shape(sparse.init, jax.random.key(0), tokens)
  params = sparse_jax.merge_pretrained(shapes["params"],
                                       model.init(jax.random.key(0), tokens)["params"])
  probes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["perturbations"])
  assert {p: v.shape for p, v in _flat(probes).items()} == {
      (f"layer_{i}", "mlp", k): {"z": (BATCH, LEN, FF), "y": (BATCH, LEN, D),
                                 STACK_MARKER: ()}[k]
      for i in range(2) for k in ("z", "y", STACK_MARKER)}
  tx = sparse_jax.optax_projections(optax.adam(3e-2), zeroth_bias_clipping=clip)

  def loss_fn(params, probes, key):
    logits, state = sparse.apply({"params": params, "perturbations": probes}, tokens,
                                 rngs={"weight_noise": key}, mutable=["intermediates"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (
        state["intermediates"])

  @_jit
  def train_step(params, state, key):
    (loss, inter), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes, key)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, {
        **metrics.activation_metrics(inter), **metrics.gradient_metrics(probe_grads),
        **metrics.spectral_metrics(inter),
        "flatness": metrics.flatness_metrics(inter, probe_grads)}

  state, losses, steps = _jit(tx.init)(params), [], []
  for step in range(5):
    params, state, loss, m = train_step(params, state, jax.random.key(step, impl="rbg"))
    losses.append(float(loss))
    steps.append(m)
  flat = _flat(params)
  for i in range(2):
    gamma = np.asarray(flat[(f"layer_{i}", "mlp_norm", "scale")])
    bias = np.abs(np.asarray(flat[(f"layer_{i}", "mlp", "zeroth_bias")]))
    assert np.all(gamma >= 1.0)
    np.testing.assert_array_equal(flat[(f"layer_{i}", "mlp_norm", "bias")], 0.0)
    assert np.all(bias <= clip * gamma + 1e-6)
    assert np.any(np.isclose(bias, clip * gamma, rtol=1e-5))  # The box was active.
  # The final norm is not restricted.
  assert np.any(np.asarray(flat[("final_norm", "bias")]) != 0.0)
  for m in steps:
    assert 0.0 < float(m["activation_density/mean"]) < 1.0
    # The probe sits on the gate's z: dL/dz = 0 exactly where JSReLU's f'(z) is.
    for layer in ("layer_0", "layer_1"):
      assert abs(float(m[f"gradient_sparsity_1e-09/{layer}"])
                 - float(m[f"derivative_sparsity/{layer}"])) < 0.02
    assert float(m["output_gradient_norm/mean"]) > 0.0
    assert float(m["w1_frobenius_sq/layer_1"]) > 0.0
    assert m["flatness"] == {}  # Skipped for gated blocks (see docs/sparsify.md).


def test_weight_noise_reaches_the_gated_projections():
  model, (tokens, _) = GluLM(), _tokens()
  pretrained = random_pretrained(model, tokens)
  sparse = {rho: sparse_jax.sparsify(model, weight_noise=rho, match=SwiGLU)
            for rho in ((0.0, 0.0), (0.2, 0.0), (0.0, 0.2))}
  params = sparse_jax.merge_pretrained(sparse[(0.0, 0.0)], pretrained, tokens)
  key = {"weight_noise": jax.random.key(0, impl="rbg")}
  out = _jit(lambda p: {r: (s.apply({"params": p}, tokens, rngs=key), s.apply(
      {"params": p}, tokens)) for r, s in sparse.items()})(params)
  clean = out[(0.0, 0.0)][0]
  for rho in ((0.2, 0.0), (0.0, 0.2)):  # Gate and up; down.
    noisy, without_rng = out[rho]
    assert not np.allclose(noisy, clean, atol=1e-4)
    np.testing.assert_array_equal(without_rng, clean)


def test_einsum_blocks_say_their_shape_is_not_supported():
  model, (tokens, _) = GluLM(Einsum), _tokens()
  with pytest.raises(ValueError, match=r"(?s)layer_0/mlp \(Einsum\).*own parameters "
                     r"\['gating_einsum', 'linear'\].*this block shape is not supported"):
    jax.eval_shape(sparse_jax.sparsify(model, match=Einsum).init, jax.random.key(0),
                   tokens)


def test_no_match_lists_gated_blocks():
  with pytest.raises(ValueError, match=r"look like MLP blocks .*: layer_0/mlp \(SwiGLU\), "
                     r"layer_1/mlp \(SwiGLU\)\.\n"):
    jax.eval_shape(sparse_jax.sparsify(GluLM()).init, jax.random.key(0), _tokens()[0])
