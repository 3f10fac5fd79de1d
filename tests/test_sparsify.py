"""`sparsify` and friends on a third-party-style Flax model (written here, not ours)."""
import functools
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

import sparse_jax
from sparse_jax import metrics
from sparse_jax.metrics import STACK_MARKER
from sparse_jax.transforms import projections
from sparse_jax.transforms.sparsify_params import DEFAULT_NORM_PATTERN, ZEROTH_BIAS_PATTERN

WIDTH, DEPTH, MLP_DIM, TOKENS = 16, 2, 32, 16  # 8x8 images in 2x2 patches.
MLP_PATHS = tuple((f"encoderblock_{i}", "MlpBlock_0") for i in range(DEPTH))


# ------------------------------------------------- a small ViT in the Flax examples' style
class MlpBlock(nn.Module):
  """Transformer MLP / feed-forward block."""
  mlp_dim: int
  activation: Callable = nn.relu
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, inputs, deterministic=True):
    x = nn.Dense(self.mlp_dim)(inputs)
    x = self.activation(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    out = nn.Dense(inputs.shape[-1])(x)
    return nn.Dropout(rate=self.dropout_rate)(out, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer encoder layer."""
  activation: Callable = nn.relu
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs, deterministic=True):
    x = nn.LayerNorm()(inputs)
    x = nn.MultiHeadDotProductAttention(num_heads=2,
                                        dropout_rate=self.attention_dropout_rate,
                                        deterministic=deterministic)(x, x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs
    y = nn.LayerNorm()(x)
    y = MlpBlock(MLP_DIM, self.activation, self.dropout_rate)(y, deterministic)
    return x + y


class TinyViT(nn.Module):
  """Patch embedding, learned positions, encoder blocks, global average pooling
  (big_vision's default: every token's MLP gets a gradient), linear head."""
  activation: Callable = nn.relu
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, images, train=False):
    x = nn.Conv(WIDTH, (2, 2), strides=(2, 2), padding="VALID", name="embedding")(images)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w, c))
    for i in range(DEPTH):
      x = EncoderBlock(self.activation, self.dropout_rate,
                       name=f"encoderblock_{i}")(x, not train)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(2, name="head")(x.mean(axis=1))


def _data(n=16):
  images = np.random.default_rng(0).normal(size=(n, 8, 8, 1)).astype(np.float32)
  labels = (images[:, :4].mean((1, 2, 3)) > images[:, 4:].mean((1, 2, 3))).astype(np.int32)
  return images, labels


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree))


def _params(model, images, *, pretrained):
  """Params filled on the host (numpy: nothing to compile). pretrained=False: norms
  at scale 1 / bias 0 and zero biases, like a fresh init; True: all perturbed."""
  rng = np.random.default_rng(1)
  shapes = _flat(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
  out = {}
  for path, s in shapes.items():
    if path[-1] in ("kernel", "pos_embedding"):
      std = 1 / np.sqrt(np.prod(s.shape[:-1]))
      out[path] = rng.normal(0, std, s.shape)
    else:
      base = 1.0 if path[-1] == "scale" else 0.0
      out[path] = base + (rng.normal(0, 0.1, s.shape) if pretrained else 0.0)
    out[path] = np.broadcast_to(out[path], s.shape).astype(np.float32)
  return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def relu_model():
  model = TinyViT()
  return model, _params(model, _data()[0], pretrained=True)


# ------------------------------------------------------------------------------ tests
# Everything that runs a model is jitted, many applies per jit: on CPU every eager op
# and every jit costs an XLA compile, which dominates this file's time. Backend
# optimisation off halves it; outputs compared for equality come from one program.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def outputs(relu_model):
  """Outputs of the original model and of sparsified variants, from one jit."""
  model, pretrained = relu_model
  images, _ = _data()
  gelu = TinyViT(activation=nn.gelu)
  sparse = {
      # Weight noise on: it must be off without a 'weight_noise' rng.
      "relu_out": sparsify_relu("mlp_output", weight_noise=0.1),
      # GELU -> ReLU must give the ReLU model's outputs; JSReLU must change them.
      "gelu_to_relu_in": sparse_jax.sparsify(gelu, activation="relu",
                                             zeroth_bias="mlp_input", max_len=TOKENS),
      "jsrelu": sparse_jax.sparsify(gelu, zeroth_bias="mlp_output", max_len=TOKENS),
      "mixed": sparse_jax.sparsify(gelu, activation="mixed", zeroth_bias="mlp_output",
                                   max_len=TOKENS)}
  shapes = jax.eval_shape(sparse["relu_out"].init, jax.random.key(1), images)
  predicate = sparse_jax.mlp_kernel_predicate(sparse_jax.find_mlp_blocks(model, images))
  noisy_apply = sparse_jax.noisy_apply(model.apply, 0.1, predicate)

  @_jit
  def run(params, pretrained):
    v, original = {"params": params}, {"params": pretrained}
    # An rbg key: threefry's random bits would double this function's compile time.
    train = {"dropout": jax.random.key(2, impl="rbg")}
    return {
        "original": model.apply(original, images),
        "original_train": model.apply(original, images, True, rngs=train),
        "relu_out": sparse["relu_out"].apply(v, images),
        # Dropout on: the substituted activation must go through the block's dropout.
        "relu_out_train": sparse["relu_out"].apply(v, images, True, rngs=train),
        "relu_out_noise": sparse["relu_out"].apply(
            v, images, rngs={"weight_noise": jax.random.key(4)}),
        "gelu_to_relu_in": sparse["gelu_to_relu_in"].apply(v, images),
        "jsrelu": sparse["jsrelu"].apply(v, images),
        "mixed_0": sparse["mixed"].apply(v, images, mixing=0.0),
        "noisy_apply": noisy_apply(original, images),
        "noisy_apply_rng": noisy_apply(original, images, rng=jax.random.key(5, impl="rbg"))}

  params = sparse_jax.merge_pretrained(shapes["params"], pretrained)
  return jax.tree.map(np.asarray, run(params, pretrained))


def sparsify_relu(position, weight_noise=0.0):
  return sparse_jax.sparsify(TinyViT(), activation="relu", zeroth_bias=position,
                             max_len=TOKENS, weight_noise=weight_noise)


@pytest.mark.parametrize("position", ["mlp_output", "mlp_input"])
def test_pretrained_params_load_unchanged(relu_model, position):
  model, pretrained = relu_model
  images, _ = _data()
  shapes = jax.eval_shape(sparsify_relu(position).init, jax.random.key(1), images)
  assert set(shapes) == {"params", "perturbations"}
  new = {p for p in _flat(shapes["params"]) if p not in _flat(pretrained)}
  assert new == {b + ("zeroth_bias",) for b in MLP_PATHS}  # Same tree, biases added.
  params = _flat(sparse_jax.merge_pretrained(shapes["params"], pretrained))
  for path, value in params.items():
    if path in new:
      assert value.shape == (TOKENS, WIDTH) and not np.any(value)
    else:
      assert value is _flat(pretrained)[path]


def test_relu_on_a_relu_model_gives_the_same_outputs(outputs):
  np.testing.assert_array_equal(outputs["relu_out"], outputs["original"])
  assert not np.allclose(outputs["original_train"], outputs["original"], atol=1e-3)
  np.testing.assert_array_equal(outputs["relu_out_train"], outputs["original_train"])


def test_the_activation_is_replaced(outputs):
  # GELU model, ReLU activation, zero zeroth bias on the MLP input: the ReLU model.
  np.testing.assert_array_equal(outputs["gelu_to_relu_in"], outputs["original"])
  assert not np.allclose(outputs["jsrelu"], outputs["original"], atol=1e-3)
  # 'mixed' at k = 0 is ReLU (and at the default k = 1 JSReLU, as tested in ops).
  np.testing.assert_allclose(outputs["mixed_0"], outputs["original"], atol=1e-6)


def test_weight_noise(outputs, relu_model):
  model, pretrained = relu_model
  # sparsify(weight_noise=...): per-token noise, drawn only from the 'weight_noise' rng.
  assert not np.allclose(outputs["relu_out_noise"], outputs["original"], atol=1e-4)
  # noisy_apply: per-step noise on the kernels of the matched blocks, of any apply
  # function: the model's, then one returning the params it is given.
  np.testing.assert_array_equal(outputs["noisy_apply"], outputs["original"])
  assert not np.allclose(outputs["noisy_apply_rng"], outputs["original"], atol=1e-4)
  blocks = sparse_jax.find_mlp_blocks(model, _data()[0])
  assert blocks == MLP_PATHS
  predicate = sparse_jax.mlp_kernel_predicate(blocks)
  noisy_fn = sparse_jax.noisy_apply(lambda v: v["params"], 0.1, predicate)
  variables = {"params": pretrained}
  assert noisy_fn(variables) is pretrained  # No rng, no noise.
  rng = jax.random.key(3, impl="rbg")
  noisy = _flat(_jit(lambda v: noisy_fn(v, rng=rng))(variables))
  changed = {p for p, v in _flat(pretrained).items() if not np.array_equal(noisy[p], v)}
  assert changed == {b + (d, "kernel") for b in MLP_PATHS for d in ("Dense_0", "Dense_1")}


def test_training_with_projections_and_metrics():
  images, labels = _data()
  clip = 0.05
  sparse = sparse_jax.sparsify(TinyViT(activation=nn.gelu), activation="jsrelu",
                               zeroth_bias="mlp_output", max_len=TOKENS)
  params = sparse_jax.merge_pretrained(
      jax.eval_shape(sparse.init, jax.random.key(0), images)["params"],
      _params(TinyViT(), images, pretrained=False))
  # Zero probes on z and y: their gradients are the per-token dL/dz and dL/dy.
  probes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
      sparse.init, jax.random.key(0), images)["perturbations"])
  tx = sparse_jax.optax_projections(optax.adamw(3e-2, weight_decay=0.1),
                                    zeroth_bias_clipping=clip)
  opt_state = _jit(tx.init)(params)  # Jitted: eager ops compile one by one.

  def loss_fn(params, probes):
    # Dropout off (train=False): its path is checked in the tests above, and random
    # bits would triple this step's compile time on CPU.
    logits, state = sparse.apply({"params": params, "perturbations": probes}, images,
                                 mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, state["intermediates"]

  @_jit
  def train_step(params, opt_state):
    (loss, inter), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, loss,
            {**metrics.activation_metrics(inter), **metrics.gradient_metrics(probe_grads),
             **metrics.flatness_metrics(inter, probe_grads),
             **metrics.spectral_metrics(inter, 0.5)})

  losses, densities = [], []
  for step in range(8):
    before = _flat(params)
    params, opt_state, loss, m = train_step(params, opt_state)
    # The theory metrics see the user's own Dense kernels and gradients.
    for i, (block, mlp) in enumerate(MLP_PATHS):
      w1 = np.asarray(before[(block, mlp, "Dense_0", "kernel")], np.float64)
      np.testing.assert_allclose(m[f"w1_frobenius_sq/layer_{i}"], np.sum(w1 ** 2),
                                 rtol=1e-5)
      assert float(m[f"spectral_ratio/layer_{i}"]) >= 1.0
    assert 0.0 < float(m["flatness_density/mean"]) < 1.0
    assert float(m["augmented_flatness_key/mean"]) > 0.0
    assert float(m["augmented_flatness_value/mean"]) > 0.0
    assert float(m["derivative_square/mean"]) > 0.0
    losses.append(float(loss))
    densities.append(float(m["activation_density/mean"]))
    assert 0.0 < densities[-1] <= 1.0
    assert "activation_density/layer_1" in m and "activation_density/layer_2" not in m
    # The probe sits on z: dL/dz = 0 exactly where JSReLU's derivative is (z < 0),
    # while dL/da, say, is nonzero almost everywhere.
    for layer in ("layer_0", "layer_1"):
      derivative_sparsity = float(m[f"derivative_sparsity/{layer}"])
      assert 0.05 < derivative_sparsity < 0.95
      assert abs(float(m[f"gradient_sparsity_1e-09/{layer}"]) - derivative_sparsity) < 0.01
    flat = _flat(params)
    for block, _ in MLP_PATHS:  # The projections hold after every step.
      gamma = np.asarray(flat[(block, "LayerNorm_1", "scale")])
      bias = np.abs(np.asarray(flat[(block, "MlpBlock_0", "zeroth_bias")]))
      assert np.all(gamma >= 1.0), (step, gamma)
      assert np.all(bias <= clip * np.abs(gamma) + 1e-6), step
      np.testing.assert_array_equal(flat[(block, "LayerNorm_1", "bias")], 0.0)
  for block, _ in MLP_PATHS:
    gamma = np.asarray(flat[(block, "LayerNorm_1", "scale")])
    bias = np.abs(np.asarray(flat[(block, "MlpBlock_0", "zeroth_bias")]))
    assert np.any(np.isclose(bias, clip * gamma, rtol=1e-5))  # The box was active,
    # and only the norms feeding the MLPs are restricted.
    assert np.any(np.asarray(flat[(block, "LayerNorm_0", "scale")]) < 1.0)
    assert np.any(np.asarray(flat[(block, "LayerNorm_0", "bias")]) != 0.0)
  assert losses[-1] < losses[0]
  assert abs(densities[-1] - densities[0]) > 1e-3  # Training moves the density.
  parameter_metrics = _jit(lambda p: metrics.parameter_metrics(
      p, ZEROTH_BIAS_PATTERN, DEFAULT_NORM_PATTERN))
  pm = parameter_metrics(params)
  assert set(pm) == {f"{n}/{k}" for n in ("zeroth_bias_abs", "norm_scale_abs")
                     for k in ("layer_0", "layer_1", "mean")}
  np.testing.assert_allclose(
      pm["norm_scale_abs/layer_1"],
      np.abs(flat[("encoderblock_1", "LayerNorm_1", "scale")]).mean(), rtol=1e-6)


def test_default_norm_rule_restricts_only_the_norms_feeding_mlps(relu_model):
  model, _ = relu_model
  sparse = sparse_jax.sparsify(model, zeroth_bias="mlp_input", max_len=TOKENS)
  shapes = jax.eval_shape(sparse.init, jax.random.key(1), _data()[0])["params"]
  rule = sparse_jax.ProjectionRule(zeroth_bias_path=ZEROTH_BIAS_PATTERN,
                                   norm_scale_path=DEFAULT_NORM_PATTERN)
  norms, pairs = projections.resolve(shapes, rule)  # Tree structure only: no compute.
  # Not LayerNorm_0 (before attention) nor encoder_norm: LayerNorm_1 of each block.
  assert norms == [(b, "LayerNorm_1", "scale") for b, _ in MLP_PATHS]
  assert pairs == [(b + ("zeroth_bias",), (b[0], "LayerNorm_1", "scale"))
                   for b in MLP_PATHS]


class Ffn(nn.Module):
  """A setup-style MLP with a class name the default rule does not know."""
  def setup(self):
    self.wi, self.wo = nn.Dense(8), nn.Dense(4)

  def __call__(self, x):
    return self.wo(nn.relu(self.wi(x)))


class FfnModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = x + Ffn(name="ffn")(nn.LayerNorm(name="ffn_norm")(x))
    return nn.LayerNorm(name="final_norm")(y)


@pytest.mark.parametrize("match", [Ffn, r"(^|/)ffn$", lambda m: m.name == "ffn"])
def test_match_by_type_pattern_or_predicate(match):
  x = np.ones((2, 3, 4), np.float32)
  sparse = sparse_jax.sparsify(FfnModel(), zeroth_bias="mlp_output", max_len=3,
                               match=match)
  shapes = jax.eval_shape(sparse.init, jax.random.key(0), x)
  assert shapes["params"]["ffn"]["zeroth_bias"].shape == (3, 4)
  assert set(shapes["perturbations"]["ffn"]) == {"z", "y", STACK_MARKER}
  assert sparse_jax.find_mlp_blocks(sparse, x) == (("ffn",),)
  assert projections.resolve(shapes["params"], sparse_jax.ProjectionRule(
      zeroth_bias_path=ZEROTH_BIAS_PATTERN, norm_scale_path=DEFAULT_NORM_PATTERN))[0] == [
          ("ffn_norm", "scale")]


def test_fresh_init_and_uplift_with_frozen_norm_bias():
  x = np.ones((2, 3, 4), np.float32)
  sparse = sparse_jax.sparsify(FfnModel(), zeroth_bias="mlp_output", max_len=3,
                               match=Ffn)
  tx = sparse_jax.optax_projections(optax.sgd(0.1), norm_projection="uplift",
                                    uplift_steps=4)

  @_jit
  def run(key):
    variables = sparse.init(key, x)
    _, state = sparse.apply(variables, x, mutable=["intermediates"])
    return variables["params"], FfnModel().init(key, x)["params"], state["intermediates"]

  params, original, inter = run(jax.random.key(0, impl="rbg"))  # rbg: a quick compile.
  # A fresh init is the model's own init (same rng) plus a zero zeroth bias.
  assert _flat(params).keys() - _flat(original).keys() == {("ffn", "zeroth_bias")}
  for path, value in _flat(original).items():
    np.testing.assert_array_equal(_flat(params)[path], value)
  np.testing.assert_array_equal(params["ffn"]["zeroth_bias"], 0.0)
  assert set(inter["ffn"]) == {"z", "a", "x", "derivative", "w1", "w2", STACK_MARKER}
  np.testing.assert_array_equal(inter["ffn"]["w1"][0],
                                _flat(params)[("ffn", "wi", "kernel")])
  # Finetuning: |gamma| >= min(step / 4, 1), that norm's bias frozen, the rest trained.
  params = jax.tree.map(lambda v: np.full(v.shape, 0.5, np.float32), params)
  state, update = _jit(tx.init)(params), _jit(tx.update)
  grads, bias = jax.tree.map(np.ones_like, params), np.full((3, 4), 0.5)
  for step in range(1, 4):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert np.all(np.abs(params["ffn_norm"]["scale"]) >= min(step / 4, 1.0) - 1e-6)
    np.testing.assert_array_equal(params["ffn_norm"]["bias"], 0.5)
    np.testing.assert_allclose(params["final_norm"]["scale"], 0.5 - 0.1 * step, rtol=1e-5)
    np.testing.assert_allclose(params["final_norm"]["bias"], 0.5 - 0.1 * step, rtol=1e-5)
    bound = 0.1 * np.abs(params["ffn_norm"]["scale"])  # The box of the uplifted gamma.
    bias = np.clip(bias - 0.1, -bound, bound)
    np.testing.assert_allclose(params["ffn"]["zeroth_bias"], bias, rtol=1e-5)


class ScannedBlocks(nn.Module):
  """Two pre-LN MLP layers stacked with nn.scan (params get a leading layer axis)."""
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, carry, _):
        return carry + MlpBlock(8, dropout_rate=0.0)(nn.LayerNorm()(carry)), None

    scan = nn.scan(Layer, variable_axes={"params": 0, "perturbations": 0},
                   split_rngs={"params": True}, length=2)
    return scan()(x, None)[0]


def test_layers_stacked_by_scan():
  x = np.ones((2, 3, 4), np.float32)
  sparse = sparse_jax.sparsify(ScannedBlocks(), zeroth_bias="mlp_input", max_len=3)
  shapes = jax.eval_shape(sparse.init, jax.random.key(0), x)["params"]
  assert shapes["ScanLayer_0"]["MlpBlock_0"]["zeroth_bias"].shape == (2, 3, 4)
  params = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
  params["ScanLayer_0"]["LayerNorm_0"]["scale"] = np.array([[1.0] * 4, [3.0] * 4],
                                                           np.float32)
  tx = sparse_jax.optax_projections(optax.sgd(0.0))
  updates, _ = _jit(tx.update)(params, _jit(tx.init)(params), params)
  bias = optax.apply_updates(params, updates)["ScanLayer_0"]["MlpBlock_0"]["zeroth_bias"]
  np.testing.assert_allclose(bias[0], 0.1)  # Each layer's box uses its own gamma.
  np.testing.assert_allclose(bias[1], 0.3)


def test_errors(relu_model):
  model, pretrained = relu_model
  images, _ = _data()
  key = jax.random.key(0)
  # Traced only (eval_shape): the errors come at trace time, before anything runs.
  with pytest.raises(ValueError, match=r"(?s)no MLP block.*MlpBlock.*look like MLP "
                     r"blocks.*: ffn \(Ffn\)\.\nFix: .*match="):
    jax.eval_shape(sparse_jax.sparsify(FfnModel()).init, key, np.ones((2, 3, 4)))
  # Matches the whole model, which calls one Dense (its head) directly.
  with pytest.raises(ValueError, match=r"(?s)calls 1 Dense layers directly \(\['head'\]"
                     r"\): this block shape is not supported.*\nFix: .*match="):
    jax.eval_shape(sparse_jax.sparsify(model, match=TinyViT).init, key, images)
  sparse = sparse_jax.sparsify(model, zeroth_bias="mlp_output", max_len=TOKENS)
  with pytest.raises(ValueError, match="merge_pretrained"):
    jax.eval_shape(sparse.apply, {"params": pretrained}, images)
  with pytest.raises(ValueError, match=r"(?s)exceeds its zeroth bias table \(4 rows\).*max_len="):
    jax.eval_shape(sparse_jax.sparsify(model, zeroth_bias="mlp_input", max_len=4).init,
                   key, images)
  with pytest.raises(ValueError, match="found no zeroth bias"):
    sparse_jax.optax_projections(optax.sgd(0.1)).init(pretrained)
  params = jax.eval_shape(sparse.init, key, images)["params"]
  with pytest.raises(ValueError, match="no norm scale.*'rmsnorm'"):
    sparse_jax.optax_projections(optax.sgd(0.1), norm_pattern="rmsnorm").init(params)
  with pytest.raises(ValueError, match="activation"):
    sparse_jax.sparsify(model, activation="swish")
  # Layers written inline in one module: one norm pattern cannot pair norms and MLPs.
  inline = sparse_jax.sparsify(InlineLayers(), zeroth_bias="mlp_output", max_len=3)
  params = jax.eval_shape(inline.init, key, np.ones((2, 3, 4)))["params"]
  with pytest.raises(ValueError, match="resolve to one norm"):
    sparse_jax.optax_projections(optax.sgd(0.1)).init(params)


class InlineLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = x + MlpBlock(8, dropout_rate=0.0)(nn.LayerNorm()(x))
    return x
