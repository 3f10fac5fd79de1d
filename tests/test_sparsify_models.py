"""`sparsify` on models shaped like published Linen code (written here, kept tiny):
cached decoding in an lm1b-style decoder and a wmt-style encoder-decoder, a big_vision
style `nn.scan(nn.remat(block))` encoder, boxed params, a ViT whose MLP has unusual
names, the defaults, and models with a `train` flag."""
import ast
import functools
import inspect
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import sparse_jax
from conftest import REPO
from sparse_jax import metrics
from sparse_jax.transforms.sparsify_params import param_shapes

VOCAB, D, HEADS, FF, LEN, BATCH = 11, 8, 2, 16, 5, 2
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree))


def _random_params(shapes, seed=0):
  """Every leaf random (zeroth biases too: a zero table would hide a wrong row)."""
  rng = np.random.default_rng(seed)
  flat = _flat(nn.meta.unbox(shapes))
  return traverse_util.unflatten_dict(
      {p: (rng.normal(0, 0.5, s.shape) + (1.0 if p[-1] == "scale" else 0.0)).astype(
          np.float32) for p, s in flat.items()})


# ----------------------------------------------- lm1b / wmt style decoders (decode=True)
class AddPositionEmbs(nn.Module):
  """Learned positions; when decoding, the position of the next token is kept in
  'cache' (as in the Flax examples)."""
  decode: bool = False

  @nn.compact
  def __call__(self, x):
    table = self.param("pos_embedding", nn.initializers.normal(0.5), (1, LEN, D))
    if not self.decode:
      return x + table[:, :x.shape[1]]
    initialized = self.has_variable("cache", "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return x + table[:, :x.shape[1]]
    i = index.value
    index.value = i + 1
    return x + jax.lax.dynamic_slice_in_dim(table, i, 1, axis=1)


class MlpBlock(nn.Module):
  @nn.compact
  def __call__(self, inputs):
    return nn.Dense(inputs.shape[-1])(nn.relu(nn.Dense(FF)(inputs)))


class DecoderLayer(nn.Module):
  """Pre-LN self-attention (cached when decoding), optional cross-attention, MLP."""
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask=None, encoded=None):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, decode=self.decode)(
        y, y, mask=mask)
    if encoded is not None:
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(y, encoded)
    return x + MlpBlock()(nn.LayerNorm()(x))


class TransformerLM(nn.Module):
  """Decoder-only, as the lm1b example."""
  decode: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = AddPositionEmbs(self.decode)(nn.Embed(VOCAB, D)(tokens))
    mask = None if self.decode else nn.make_causal_mask(tokens)
    for i in range(2):
      x = DecoderLayer(self.decode, name=f"decoderblock_{i}")(x, mask)
    return nn.Dense(VOCAB, name="logits")(nn.LayerNorm()(x))


class EncoderLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(y, y)
    return x + MlpBlock()(nn.LayerNorm()(x))


class Transformer(nn.Module):
  """Encoder-decoder with `encode` / `decode` methods, as the wmt example."""
  decode: bool = False

  def setup(self):
    self.embed = nn.Embed(VOCAB, D)
    self.encoder_layers = [EncoderLayer() for _ in range(2)]
    self.positions = AddPositionEmbs(self.decode)
    self.decoder_layers = [DecoderLayer(self.decode) for _ in range(2)]
    self.logits = nn.Dense(VOCAB)

  def encode(self, inputs):
    x = self.embed(inputs)
    for layer in self.encoder_layers:
      x = layer(x)
    return x

  def decode_tokens(self, encoded, targets):
    x = self.positions(self.embed(targets))
    mask = None if self.decode else nn.make_causal_mask(targets)
    for layer in self.decoder_layers:
      x = layer(x, mask, encoded)
    return self.logits(x)

  def __call__(self, inputs, targets):
    return self.decode_tokens(self.encode(inputs), targets)


def _tokens(seed):
  return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LEN)).astype(np.int32)


def _cache(sparse_decoder, *args):
  """The initial cache: shapes of a decode=True init, all zero (index 0)."""
  shapes = jax.eval_shape(sparse_decoder.init, jax.random.key(0), *args)["cache"]
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _decode(step, cache, tokens):
  """Feeds `tokens` one per call to the jitted `step(cache, token)`, carrying the cache."""
  logits = []
  for t in range(tokens.shape[1]):
    out, state = step(cache, tokens[:, t:t + 1])
    cache = state["cache"]
    logits.append(out)
  return np.concatenate(logits, 1), cache


def test_cached_decoding_equals_the_full_pass_lm1b_style():
  tokens = _tokens(0)
  full = sparse_jax.sparsify(TransformerLM())  # Zeroth bias on the MLP output.
  decoder = sparse_jax.sparsify(TransformerLM(decode=True))
  params = _random_params(param_shapes(full, tokens))
  cache = _cache(decoder, tokens)
  # The block keeps its own position next to the attention's cache_index.
  for i in range(2):
    assert cache[f"decoderblock_{i}"]["MlpBlock_0"] == {"zeroth_bias_index": 0}
  no_bias = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 0 if p[-1].key == "zeroth_bias" else v, params)
  logits, without = _jit(lambda ps: [full.apply({"params": p}, tokens) for p in ps])(
      (params, no_bias))
  cached, cache = _decode(_jit(lambda c, t: decoder.apply(
      {"params": params, "cache": c}, t, mutable=["cache"])), cache, tokens)
  assert np.max(np.abs(logits - without)) > 0.1  # The zeroth biases matter here,
  np.testing.assert_allclose(cached, logits, rtol=1e-5, atol=1e-5)  # each step its row.
  assert int(cache["decoderblock_1"]["MlpBlock_0"]["zeroth_bias_index"]) == LEN


def test_cached_decoding_equals_the_full_pass_wmt_style():
  inputs, targets = _tokens(1), _tokens(2)
  full = sparse_jax.sparsify(Transformer(), zeroth_bias="mlp_input")
  decoder = sparse_jax.sparsify(Transformer(decode=True), zeroth_bias="mlp_input")
  params = _random_params(param_shapes(full, inputs, targets))
  cache = _cache(decoder, inputs, targets)
  # Only the decoder's blocks (whose layer has a cached attention) keep a position.
  assert {p for p in _flat(cache) if p[-1] == "zeroth_bias_index"} == {
      (f"decoder_layers_{i}", "MlpBlock_0", "zeroth_bias_index") for i in range(2)}
  v = {"params": params}
  logits, encoded = _jit(lambda: (full.apply(v, inputs, targets), full.apply(
      v, "encode", inputs, method="call_method")))()
  cached, _ = _decode(_jit(lambda c, t: decoder.apply(
      {"params": params, "cache": c}, "decode_tokens", encoded, t, method="call_method",
      mutable=["cache"])), cache, targets)
  np.testing.assert_allclose(cached, logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- big_vision style scanned encoder
class ViTMlp(nn.Module):
  """big_vision's MlpBlock: Dense -> gelu -> Dropout -> Dense."""
  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.gelu(nn.Dense(FF)(x))
    x = nn.Dropout(rate=0.1)(x, deterministic)
    return nn.Dense(D)(x)


class Encoder1DBlock(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic=True):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(y, y)
    x = x + ViTMlp(name="MlpBlock_0")(nn.LayerNorm()(x), deterministic)
    return x, None


class ScannedEncoder(nn.Module):
  """`nn.scan(nn.remat(block))` over the layers (big_vision's scan=True)."""
  variable_axes: tuple = (("params", 0),)
  split_rngs: tuple = (("params", True), ("dropout", True))

  @nn.compact
  def __call__(self, x, train=False):
    block = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,))
    layers = nn.scan(block, variable_axes=dict(self.variable_axes),
                     split_rngs=dict(self.split_rngs), in_axes=nn.broadcast, length=3)
    x, _ = layers(name="encoderblock")(x, not train)
    return nn.LayerNorm(name="encoder_norm")(x)


CARRYING = ScannedEncoder(
    variable_axes=(("params", 0), ("intermediates", 0), ("perturbations", 0)),
    split_rngs=(("params", True), ("dropout", True), ("weight_noise", True)))


def test_scan_that_carries_only_params_raises():
  x = np.ones((BATCH, LEN, D), np.float32)
  key = jax.random.key(0)
  params_only = sparse_jax.sparsify(ScannedEncoder(), weight_noise=0.1, match=ViTMlp)
  # At init: the probes could not be created inside the scan.
  with pytest.raises(ValueError, match=r"(?s)encoderblock/MlpBlock_0 cannot see the "
                     r"'perturbations' collection.*\nFix: .*'intermediates': 0, "
                     r"'perturbations': 0\}.*'weight_noise': True"):
    jax.eval_shape(params_only.init, key, x)
  # At apply: sown values asked for, or the weight noise rng given.
  params = param_shapes(sparse_jax.sparsify(CARRYING, match=ViTMlp), x)
  with pytest.raises(ValueError, match="cannot see the 'intermediates' collection"):
    jax.eval_shape(lambda p: params_only.apply({"params": p}, x,
                                               mutable=["intermediates"]), params)
  with pytest.raises(ValueError, match="cannot see the 'weight_noise' rng"):
    jax.eval_shape(lambda p: params_only.apply({"params": p}, x,
                                               rngs={"weight_noise": key}), params)


def test_scan_that_carries_the_collections_and_rng_works():
  x = np.random.default_rng(0).normal(size=(BATCH, LEN, D)).astype(np.float32)
  sparse = sparse_jax.sparsify(CARRYING, weight_noise=0.2, match=ViTMlp)
  shapes = jax.eval_shape(sparse.init, jax.random.key(0), x)
  assert shapes["params"]["encoderblock"]["MlpBlock_0"]["zeroth_bias"].shape == (3, LEN, D)
  assert shapes["perturbations"]["encoderblock"]["MlpBlock_0"]["z"].shape == (
      3, BATCH, LEN, FF)
  params = _random_params(shapes["params"])

  @_jit
  def run(params):
    v = {"params": params}
    clean, state = sparse.apply(v, x, mutable=["intermediates"])
    noisy = sparse.apply(v, x, rngs={"weight_noise": jax.random.key(1, impl="rbg")})
    return clean, noisy, state["intermediates"]

  clean, noisy, inter = run(params)
  assert inter["encoderblock"]["MlpBlock_0"]["z"][0].shape == (3, BATCH, LEN, FF)
  assert not np.allclose(clean, noisy, atol=1e-4)  # The noise reaches the blocks.

  # The metrics read the stack as its 3 layers, each from its own slice.
  a = inter["encoderblock"]["MlpBlock_0"]["a"][0]
  density = metrics.activation_metrics(inter)
  assert sorted(k for k in density if k.startswith("activation_density/layer_")) == [
      f"activation_density/layer_{i}" for i in range(3)]
  for i in range(3):
    np.testing.assert_allclose(density[f"activation_density/layer_{i}"],
                               np.mean(np.abs(a[i]) > metrics.ACTIVE_THRESHOLD))
  probes = jax.tree.map(jnp.zeros_like, shapes["perturbations"])
  grads = jax.grad(lambda q: sparse.apply({"params": params, "perturbations": q},
                                          x).sum())(probes)
  eta = grads["encoderblock"]["MlpBlock_0"]["z"]
  gradient = metrics.gradient_metrics(grads)
  for i in range(3):
    np.testing.assert_allclose(gradient[f"gradient_sparsity_1e-06/layer_{i}"],
                               np.mean(np.abs(eta[i]) < 1e-6))
  tables = params["encoderblock"]["MlpBlock_0"]["zeroth_bias"]  # [layers, LEN, D]
  table_abs = metrics.parameter_metrics(params, zeroth_bias_path=r"(^|/)zeroth_bias$",
                                        norm_scale_path=r"(?i)norm")
  for i in range(3):
    np.testing.assert_allclose(table_abs[f"zeroth_bias_abs/layer_{i}"],
                               np.mean(np.abs(tables[i])), rtol=1e-6)
  w1 = inter["encoderblock"]["MlpBlock_0"]["w1"][0]  # [layers, D, FF]
  spectra = metrics.spectral_metrics(inter)
  for i in range(3):
    np.testing.assert_allclose(spectra[f"w1_frobenius_sq/layer_{i}"],
                               np.sum(np.square(w1[i])), rtol=1e-5)


def test_observe_false_runs_in_a_scan_that_carries_only_params():
  """Without the metrics' hooks the method runs in big_vision's own scan, unchanged."""
  x = np.random.default_rng(1).normal(size=(BATCH, LEN, D)).astype(np.float32)
  quiet = sparse_jax.sparsify(ScannedEncoder(), match=ViTMlp, observe=False)
  shapes = jax.eval_shape(quiet.init, jax.random.key(0), x)
  assert set(shapes) == {"params"}  # No probes, nothing sown.
  assert shapes["params"]["encoderblock"]["MlpBlock_0"]["zeroth_bias"].shape == (3, LEN, D)
  params = _random_params(shapes["params"])
  observed = sparse_jax.sparsify(CARRYING, match=ViTMlp)
  out, state = quiet.apply({"params": params}, x, mutable=["intermediates"])
  assert not state  # Nothing sown even when asked.
  np.testing.assert_allclose(out, observed.apply({"params": params}, x), rtol=1e-5,
                             atol=1e-5)
  noisy = sparse_jax.sparsify(ScannedEncoder(), match=ViTMlp, observe=False,
                              weight_noise=0.1)
  with pytest.raises(ValueError, match="cannot see the 'weight_noise' rng"):
    noisy.apply({"params": params}, x, rngs={"weight_noise": jax.random.key(1)})


# ---------------------------------------------------------------------- boxed params
class BoxedModel(nn.Module):
  """Params boxed as in lm1b / wmt: nn.with_logical_partitioning (or nn.Partitioned)."""
  partitioning: str = "logical"

  @nn.compact
  def __call__(self, x):
    box = (nn.with_logical_partitioning if self.partitioning == "logical"
           else nn.with_partitioning)
    dense = lambda n, axes: nn.Dense(n, kernel_init=box(nn.initializers.lecun_normal(),
                                                        axes))
    norm = nn.LayerNorm(scale_init=box(nn.initializers.ones, ("embed",)),
                        bias_init=box(nn.initializers.zeros, ("embed",)))

    class Mlp(nn.Module):
      @nn.compact
      def __call__(self, y):
        return dense(D, ("mlp", "embed"))(nn.relu(dense(FF, ("embed", "mlp"))(y)))

    return x + Mlp()(norm(x))


def _boxes(tree):
  return {p: type(v).__name__ for p, v in _flat(tree).items()
          if isinstance(v, nn.meta.AxisMetadata)}


@pytest.mark.parametrize("partitioning", ["logical", "plain"])
def test_boxed_params_through_merge_pretrained_and_optax_projections(partitioning):
  x = np.random.default_rng(0).normal(size=(BATCH, LEN, D)).astype(np.float32)
  model = BoxedModel(partitioning)
  sparse = sparse_jax.sparsify(model)
  box = "LogicallyPartitioned" if partitioning == "logical" else "Partitioned"
  boxed_pretrained = _flat(_jit(model.init)(jax.random.key(0), x)["params"])
  boxed_pretrained = traverse_util.unflatten_dict(boxed_pretrained)
  pretrained = nn.meta.unbox(boxed_pretrained)
  shapes = jax.eval_shape(sparse.init, jax.random.key(0), x)["params"]
  assert set(_boxes(shapes).values()) == {box}
  # Boxed shapes in, boxed params out; unboxed in, unboxed out; either pretrained.
  merged = sparse_jax.merge_pretrained(shapes, pretrained)
  assert _boxes(merged) == _boxes(shapes)
  assert not _boxes(sparse_jax.merge_pretrained(nn.meta.unbox(shapes), boxed_pretrained))
  # The model form: boxed as the pretrained params are.
  assert _boxes(sparse_jax.merge_pretrained(sparse, boxed_pretrained, x)) == _boxes(shapes)
  plain = sparse_jax.merge_pretrained(sparse, pretrained, x)
  assert not _boxes(plain)
  for path, value in _flat(pretrained).items():
    np.testing.assert_array_equal(_flat(nn.meta.unbox(merged))[path], value)
  np.testing.assert_array_equal(plain["Mlp_0"]["zeroth_bias"], 0.0)
  # optax_projections: init and update on the boxed tree, updates boxed like it.
  clip = 0.05
  tx = sparse_jax.optax_projections(optax.adam(0.1), zeroth_bias_clipping=clip)

  @_jit
  def train(params):
    state = tx.init(params)
    for _ in range(3):
      grads = jax.grad(lambda p: jnp.sum(sparse.apply({"params": p}, x) ** 2))(params)
      updates, state = tx.update(grads, state, params)
      assert _boxes(updates) == _boxes(params)
      params = optax.apply_updates(params, updates)
    return params

  params = train(merged)
  assert _boxes(params) == _boxes(shapes)
  flat = _flat(nn.meta.unbox(params))
  gamma = np.asarray(flat[("LayerNorm_0", "scale")])
  assert np.all(gamma >= 1.0)
  np.testing.assert_array_equal(flat[("LayerNorm_0", "bias")], 0.0)
  bias = np.abs(np.asarray(flat[("Mlp_0", "zeroth_bias")]))
  assert np.all(bias <= clip * gamma + 1e-6) and np.any(np.isclose(bias, clip * gamma))


# ------------------------------------------------ no match: the MLP-shaped modules
class Positionwise(nn.Module):
  """A ViT MLP under a name no default rule knows, its Dense layers named too."""
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="contract")(nn.gelu(nn.Dense(FF, name="expand")(x)))


class OddViT(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = nn.Dense(D, name="patch_embedding")(images.reshape(images.shape[0], -1, 4))
    for i in range(3):
      y = nn.LayerNorm(name=f"pre_attention_norm_{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name=f"attention_{i}")(y, y)
      x = x + Positionwise(name=f"ffn_{i}")(nn.LayerNorm(name=f"pre_ffn_norm_{i}")(x))
    return nn.Dense(3, name="head")(x.mean(axis=1))


def test_no_match_lists_the_modules_that_look_like_mlp_blocks():
  images = np.ones((BATCH, 4, 4, 1), np.float32)
  with pytest.raises(ValueError) as error:
    jax.eval_shape(sparse_jax.sparsify(OddViT()).init, jax.random.key(0), images)
  message = str(error.value)
  listed = message.split("look like MLP blocks")[1].split("\n")[0]
  assert listed == (" (two Dense calls with an elementwise function between them): "
                    "ffn_0 (Positionwise), ffn_1 (Positionwise), ffn_2 (Positionwise).")
  assert "\nFix: pass match=" in message
  # What it lists is what to match.
  shapes = jax.eval_shape(sparse_jax.sparsify(OddViT(), match=Positionwise).init,
                          jax.random.key(0), images)
  assert {p[0] for p in _flat(shapes["params"]) if p[-1] == "zeroth_bias"} == {
      "ffn_0", "ffn_1", "ffn_2"}


# --------------------------------------------------------- defaults and train flags
class TrainFlagModel(nn.Module):
  """A model with a Python `train` flag (branches on it, as most Linen code does)."""
  @nn.compact
  def __call__(self, x, train=False):
    if train:
      x = nn.Dropout(0.5, deterministic=False)(x)
    return x + MlpBlock()(nn.LayerNorm()(x))


def test_the_defaults_are_the_papers_recipe_and_documented():
  x = np.random.default_rng(0).normal(size=(BATCH, LEN, D)).astype(np.float32)
  defaults = {k: p.default for k, p in inspect.signature(sparse_jax.sparsify).parameters.items()
              if p.default is not inspect.Parameter.empty}
  assert defaults == {"activation": "jsrelu", "zeroth_bias": "mlp_output", "max_len": None,
                      "weight_noise": 0.0, "match": None, "gate": "(?i)gate",
                      "observe": True, "dense_types": None, "rngs": None}
  sparse = sparse_jax.sparsify(TrainFlagModel())
  # One zeroth bias per block, as long as the input at init, added to the output.
  params = sparse_jax.merge_pretrained(sparse, TrainFlagModel().init(
      jax.random.key(0), x)["params"], x)
  assert params["MlpBlock_0"]["zeroth_bias"].shape == (LEN, D)
  params["MlpBlock_0"]["zeroth_bias"] = np.ones((LEN, D), np.float32)
  zero = jax.tree.map(np.zeros_like, params)
  zero["MlpBlock_0"]["zeroth_bias"] = params["MlpBlock_0"]["zeroth_bias"]
  # All other params zero: LayerNorm(x) = 0, the MLP gives 0 + b0, so out = x + b0.
  out = _jit(sparse.apply)({"params": zero}, x)
  np.testing.assert_allclose(out, x + 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="exceeds its zeroth bias table"):
    jax.eval_shape(sparse.apply, {"params": params}, np.ones((BATCH, LEN + 1, D)))
  # What the docs say the defaults are.
  docs = open(os.path.join(REPO, "docs", "sparsify.md"), encoding="utf-8").read()
  assert ('`sparsify(model)` alone is the papers\' recipe: `activation="jsrelu"`, '
          '`zeroth_bias="mlp_output"`, `max_len=None`') in " ".join(docs.split())
  assert "zeroth_bias: 'mlp_output' (default" in sparse_jax.sparsify.__doc__


def test_merge_pretrained_with_keyword_arguments():
  x = np.ones((BATCH, LEN, D), np.float32)
  model = TrainFlagModel()
  sparse = sparse_jax.sparsify(model)
  pretrained = model.init(jax.random.key(0), x)["params"]
  # The plain recipe traces the keyword and breaks on `if train:`,
  with pytest.raises(jax.errors.TracerBoolConversionError):
    jax.eval_shape(sparse.init, jax.random.key(0), x, train=False)
  # the model form binds it (both values of the flag).
  for train in (False, True):
    params = sparse_jax.merge_pretrained(sparse, pretrained, x, train=train)
    assert params["MlpBlock_0"]["zeroth_bias"].shape == (LEN, D)
    assert params["LayerNorm_0"]["scale"] is pretrained["LayerNorm_0"]["scale"]
  with pytest.raises(TypeError, match="takes no example inputs"):
    sparse_jax.merge_pretrained(params, pretrained, x)


def test_the_rule_does_not_import_the_wrapper():
  """mlp_rule is below sparsify: no import of the wrapper (the former cycle)."""
  tree = ast.parse(open(os.path.join(REPO, "sparse_jax", "transforms", "mlp_rule.py"),
                        encoding="utf-8").read())
  imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names}
  assert not {m for m in imported if m and "sparsify" in m}, imported
