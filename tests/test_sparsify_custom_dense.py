"""`sparsify` on Linen MLP blocks built from their own dense class, written the way
t5x writes its `DenseGeneral` and `MlpBlock` (a Module with features, axis,
kernel_axes, dtype, kernel_init; params by `self.param`; `lax.dot_general`), plain and
gated, through the whole workflow: sparsify, load pretrained, train with projections,
metrics, cached decoding. Also `dense_types=` and the error when no dense layer is
recognised."""
import functools
import operator
from typing import Any, Callable, Sequence

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
from sparse_jax.transforms.sparsify_params import param_shapes

VOCAB, D, HEADS, FF, LEN, BATCH = 11, 8, 2, 16, 5, 4
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree))


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(a if a >= 0 else ndim + a for a in axes)


class DenseGeneral(nn.Module):
  """The project's own dense layer, t5x-style: no flax Dense underneath."""
  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in",
                                                           "truncated_normal")
  kernel_axes: tuple[str, ...] = ()
  use_bias: bool = False

  @nn.compact
  def __call__(self, inputs):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    inputs = jnp.asarray(inputs, self.dtype)
    axis = _normalize_axes(axis, inputs.ndim)
    kernel_shape = tuple(inputs.shape[a] for a in axis) + features
    kernel = jnp.asarray(self.param("kernel", self.kernel_init, kernel_shape, jnp.float32),
                         self.dtype)
    contract = tuple(range(len(axis)))
    out = jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))
    if self.use_bias:
      out = out + jnp.asarray(self.param("bias", nn.initializers.zeros, features,
                                         jnp.float32), self.dtype)
    return out


class MlpBlock(nn.Module):
  """t5x-style MLP: one DenseGeneral per activation ('wi', or 'wi_0', 'wi_1', ... when
  gated), their product, dropout broadcast over the length, DenseGeneral 'wo'."""
  intermediate_dim: int = FF
  activations: Sequence[str] = ("relu",)
  intermediate_dropout_rate: float = 0.3
  dtype: Any = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, inputs, decode: bool = False, deterministic: bool = False):
    hidden = []
    for idx, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{idx}"
      x = DenseGeneral(self.intermediate_dim, dtype=self.dtype, kernel_axes=("embed", "mlp"),
                       use_bias=self.use_bias, name=name)(inputs)
      hidden.append(x if act == "linear" else getattr(nn, act)(x))
    x = functools.reduce(operator.mul, hidden)
    x = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    return DenseGeneral(inputs.shape[-1], dtype=self.dtype, kernel_axes=("mlp", "embed"),
                        use_bias=self.use_bias, name="wo")(x)


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer: cached self-attention when decoding, then the MLP."""
  activations: Sequence[str]
  use_bias: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, deterministic):
    y = nn.LayerNorm(name="pre_self_attention_layer_norm")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, decode=self.decode,
                                            name="self_attention")(y, y, mask=mask)
    y = nn.LayerNorm(name="pre_mlp_layer_norm")(x)
    return x + MlpBlock(activations=self.activations, use_bias=self.use_bias, name="mlp")(
        y, decode=self.decode, deterministic=deterministic)


class Decoder(nn.Module):
  """Decoder-only LM with learned positions (the next position kept in 'cache' when
  decoding, as flax's examples)."""
  activations: Sequence[str] = ("relu",)
  use_bias: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    x = nn.Embed(VOCAB, D, name="token_embedder")(tokens)
    table = self.param("pos_embedding", nn.initializers.normal(0.5), (LEN, D))
    if self.decode and self.has_variable("cache", "position"):
      position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      x = x + jax.lax.dynamic_slice_in_dim(table, position.value, 1)
      position.value += 1
    else:
      if self.decode:
        self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
      x = x + table[:tokens.shape[1]]
    mask = None if self.decode else nn.make_causal_mask(tokens)
    for i in range(2):
      x = DecoderLayer(self.activations, self.use_bias, self.decode,
                       name=f"layers_{i}")(x, mask, not train)
    return nn.Dense(VOCAB, name="logits_dense")(nn.LayerNorm(name="decoder_norm")(x))


PLAIN, GATED = ("relu",), ("relu", "linear")


def _data(seed=0):
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LEN)).astype(np.int32)
  return tokens, np.roll(tokens, -1, axis=1)


@pytest.mark.parametrize("activations,use_bias", [(PLAIN, True), (GATED, False)],
                         ids=["plain", "gated"])
def test_relu_on_its_own_dense_class_gives_the_same_outputs(activations, use_bias):
  model, (tokens, _) = Decoder(activations, use_bias), _data()
  pretrained = random_pretrained(model, tokens)
  relu = sparse_jax.sparsify(model, activation="relu")  # MlpBlock: the default rule.
  jsrelu = sparse_jax.sparsify(model)
  params = sparse_jax.merge_pretrained(relu, pretrained, tokens)
  assert _flat(params).keys() - _flat(pretrained).keys() == {
      (f"layers_{i}", "mlp", "zeroth_bias") for i in range(2)}
  out = outputs_against_the_original(model, pretrained, tokens, relu, jsrelu, params)
  np.testing.assert_array_equal(out["relu"], out["original"])
  np.testing.assert_array_equal(out["relu_train"], out["original_train"])
  assert not np.allclose(out["original_train"], out["original"], atol=1e-3)  # Dropout on.
  assert not np.allclose(out["jsrelu"], out["original"], atol=1e-3)
  inter = out["intermediates"]["layers_0"]["mlp"]
  gate = "wi" if activations == PLAIN else "wi_0"
  np.testing.assert_array_equal(inter["w1"][0], pretrained["layers_0"]["mlp"][gate]["kernel"])
  np.testing.assert_array_equal(inter["a"][0], np.maximum(inter["z"][0], 0.0))
  if activations == PLAIN:  # The theory metrics' inputs, W2 = wo's kernel.
    np.testing.assert_array_equal(inter["w2"][0], pretrained["layers_0"]["mlp"]["wo"]["kernel"])
    assert inter["x"][0].shape == (BATCH, LEN, D)


@pytest.mark.parametrize("activations", [PLAIN, GATED], ids=["plain", "gated"])
def test_its_own_dense_class_trains_with_projections_metrics_and_decodes(activations):
  model, (tokens, targets) = Decoder(activations), _data()
  sparse = sparse_jax.sparsify(model, weight_noise=0.05)
  params = sparse_jax.merge_pretrained(sparse, random_pretrained(model, tokens), tokens)
  shapes = jax.eval_shape(sparse.init, jax.random.key(0), tokens)
  probes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["perturbations"])
  tx = sparse_jax.optax_projections(optax.adam(3e-2), zeroth_bias_clipping=0.05)

  def loss_fn(params, probes, key):
    logits, state = sparse.apply(
        {"params": params, "perturbations": probes}, tokens, True,
        rngs={"dropout": key, "weight_noise": jax.random.fold_in(key, 1)},
        mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, state["intermediates"]

  @_jit
  def train_step(params, opt_state, key):
    (loss, inter), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, {
        **metrics.activation_metrics(inter), **metrics.gradient_metrics(probe_grads),
        **metrics.spectral_metrics(inter), **metrics.flatness_metrics(inter, probe_grads),
        **metrics.parameter_metrics(params, r"(^|/)zeroth_bias$", r"(?i)norm")}

  opt_state, losses = tx.init(params), []
  for step in range(4):
    params, opt_state, loss, m = train_step(params, opt_state, jax.random.key(step))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  flat = _flat(params)
  for i in range(2):  # The restricted norm is the one named after the MLP.
    gamma = np.asarray(flat[(f"layers_{i}", "pre_mlp_layer_norm", "scale")])
    bias = np.abs(np.asarray(flat[(f"layers_{i}", "mlp", "zeroth_bias")]))
    assert np.all(gamma >= 1.0)
    np.testing.assert_array_equal(flat[(f"layers_{i}", "pre_mlp_layer_norm", "bias")], 0)
    assert np.all(bias <= 0.05 * gamma + 1e-6) and np.any(bias > 0)
    assert np.any(np.asarray(flat[(f"layers_{i}", "pre_self_attention_layer_norm",
                                   "scale")]) < 1.0)  # Not restricted.
  assert 0.0 < float(m["activation_density/mean"]) < 1.0
  for layer in ("layer_0", "layer_1"):
    # The probe sits on the gate's z: dL/dz = 0 where f'(z) = 0, and where dropout
    # dropped the unit.
    assert (float(m[f"gradient_sparsity_1e-09/{layer}"])
            >= float(m[f"derivative_sparsity/{layer}"]) > 0.0)
    assert float(m[f"w1_frobenius_sq/{layer}"]) > 0.0
    assert float(m[f"zeroth_bias_abs/{layer}"]) > 0.0
  # Flatness for plain blocks only (a GLU's quantities differ; docs/sparsify.md).
  assert ("augmented_flatness_key/mean" in m) == (activations == PLAIN)

  # Cached decoding: one token per step equals the full pass, the zeroth bias of each
  # step's true position added.
  decoder = sparse_jax.sparsify(Decoder(activations, decode=True))
  cache = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      decoder.init, jax.random.key(0), tokens)["cache"])
  assert int(cache["layers_1"]["mlp"]["zeroth_bias_index"]) == 0
  step = _jit(lambda c, t: decoder.apply({"params": params, "cache": c}, t,
                                         mutable=["cache"]))
  cached = []
  for t in range(LEN):
    out, state = step(cache, tokens[:, t:t + 1])
    cache = state["cache"]
    cached.append(out)
  full = _jit(lambda p: sparse.apply({"params": p}, tokens))(params)
  np.testing.assert_allclose(np.concatenate(cached, 1), full, rtol=1e-5, atol=1e-5)
  assert int(cache["layers_1"]["mlp"]["zeroth_bias_index"]) == LEN


class OtherDense(nn.Module):
  """A dense layer whose params are not named kernel / bias: not recognised."""
  features: int

  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))


class OtherMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return OtherDense(D, name="wo")(nn.relu(OtherDense(FF, name="wi")(x)))


class OtherModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D)(tokens)
    return x + OtherMlp(name="mlp")(nn.LayerNorm(name="mlp_norm")(x))


def test_dense_types_and_the_error_listing_what_the_block_called():
  tokens, _ = _data()
  with pytest.raises(ValueError, match=(
      r"^MLP block mlp \(OtherMlp\).* called no layer sparsify recognises as dense; the "
      r"submodules it called: wi \(OtherDense, params: w \(8, 16\)\); wo \(OtherDense, "
      r"params: w \(16, 8\)\)\. [^\n]*\nFix: pass sparsify\(\.\.\., dense_types=")):
    jax.eval_shape(sparse_jax.sparsify(OtherModel(), match=OtherMlp).init,
                   jax.random.key(0), tokens)
  # Named by the user, the t5x-style class is used; naming another one turns the
  # recognition by params off, so the block has no dense layer.
  model = Decoder()
  ok = sparse_jax.sparsify(model, dense_types=DenseGeneral)
  assert (("layers_0", "mlp", "zeroth_bias") in _flat(param_shapes(ok, tokens)))
  with pytest.raises(ValueError, match=r"submodules it called: wi \(DenseGeneral, params: "
                     r"kernel \(8, 16\)\); Dropout_0 \(Dropout, params: none\); wo "
                     r"\(DenseGeneral, params: kernel \(16, 8\)\)\."):
    param_shapes(sparse_jax.sparsify(model, dense_types=OtherDense), tokens)
  # A rule that matches nothing: the blocks built from the own dense class are listed.
  with pytest.raises(ValueError, match=r"look like MLP blocks .*: layers_0/mlp \(MlpBlock\), "
                     r"layers_1/mlp \(MlpBlock\)\.\nFix: "):
    param_shapes(sparse_jax.sparsify(model, match="nothing$"), tokens)
  with pytest.raises(TypeError, match="dense_types"):
    sparse_jax.sparsify(model, dense_types=("DenseGeneral",))
