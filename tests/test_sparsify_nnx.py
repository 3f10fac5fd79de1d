"""`sparsify` on Flax NNX models, written the way NNX code is written (nnx.Linear
attributes, nnx.List of layers, nnx.MultiHeadAttention with init_cache, a Gemma-style
gated FeedForward, layers made by nnx.vmap and run by nnx.scan): the original weights
load and give the same outputs with activation='relu', training with nnx.Optimizer and
optax_projections keeps the projections, the metrics read what nnx.capture collects,
cached decoding adds each position's zeroth-bias row."""
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparse_jax
from sparse_jax import metrics

VOCAB, D, FF, LEN, BATCH, HEADS = 11, 8, 16, 5, 4, 2


class Mlp(nnx.Module):
  """Linear -> relu -> Linear, with dropout on the activations."""

  def __init__(self, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(D, FF, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear2 = nnx.Linear(FF, D, rngs=rngs)

  def __call__(self, x):
    return self.linear2(self.dropout(nnx.relu(self.linear1(x))))


class FeedForward(nnx.Module):
  """Gemma-style gated MLP: down(act(gate(x)) * up(x)), the up projection called first."""

  def __init__(self, rngs: nnx.Rngs, act=nnx.relu):
    self.gate_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(FF, D, use_bias=False, rngs=rngs)
    self.act = act

  def __call__(self, x):
    up = self.up_proj(x)
    return self.down_proj(self.act(self.gate_proj(x)) * up)


class Layer(nnx.Module):
  def __init__(self, mlp, rngs: nnx.Rngs, decode: bool = False):
    self.attn_norm = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=decode, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(D, rngs=rngs)
    self.mlp = mlp(rngs=rngs)

  def __call__(self, x, mask=None):
    y = self.attn_norm(x)
    x = x + self.attn(y, mask=mask)
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Decoder-only LM: embedding, learned positions, two layers, a head."""

  def __init__(self, mlp=Mlp, *, rngs: nnx.Rngs, decode: bool = False):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.positions = nnx.Param(jax.random.normal(rngs.params(), (LEN, D)) * 0.5)
    self.layers = nnx.List([Layer(mlp, rngs, decode) for _ in range(2)])
    self.final_norm = nnx.LayerNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens, position=None):
    x = self.embed(tokens)
    if position is None:
      x = x + self.positions[:tokens.shape[1]]
      mask = nnx.make_causal_mask(tokens)
    else:  # One token at `position` (cached decoding).
      x = x + jax.lax.dynamic_slice_in_dim(self.positions[...], position, 1)
      mask = None
    for layer in self.layers:
      x = layer(x, mask)
    return self.head(self.final_norm(x))


class ScannedTransformer(nnx.Module):
  """Layers made by nnx.vmap (params stacked [layers, ...]) and run by nnx.scan."""

  def __init__(self, mlp=Mlp, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Layer(mlp, rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)

    return self.head(body(self.embed(tokens), self.layers))


class RematScannedTransformer(ScannedTransformer):
  """The same stack, each layer rematerialised in the backward pass (nnx.remat)."""

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(x, layer):
      return layer(x)

    return self.head(body(self.embed(tokens), self.layers))


def _data(seed=0):
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LEN)).astype(np.int32)
  return tokens, np.roll(tokens, -1, axis=1)


def _randomize(model, seed=1):
  """Every Param random (norm scales near 1), as a trained checkpoint's would be."""
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(
      lambda v: jnp.asarray(rng.normal(0, 0.5, v.shape) + 0.5, v.dtype), state))


def _sparsified_with_params_of(source, model, **sparsify_kwargs):
  """`sparsify(model, ...)` holding `source`'s params, in eval mode (dropout off)."""
  sparse = sparse_jax.sparsify(model, **sparsify_kwargs)
  nnx.update(sparse, nnx.state(source, nnx.Param))
  sparse.eval()
  return sparse


@pytest.mark.parametrize("mlp", [Mlp, FeedForward], ids=["relu", "gated"])
def test_original_weights_give_the_same_outputs_with_relu(mlp):
  tokens, _ = _data()
  original = Transformer(mlp, rngs=nnx.Rngs(0))
  _randomize(original)
  pretrained = nnx.state(original, nnx.Param)
  # Another instance, sparsified, then the original's weights loaded (no zeroth bias
  # in them: those stay zero).
  relu = sparse_jax.sparsify(Transformer(mlp, rngs=nnx.Rngs(5)), activation="relu",
                             max_len=LEN)
  nnx.update(relu, pretrained)
  jsrelu = sparse_jax.sparsify(Transformer(mlp, rngs=nnx.Rngs(5)), max_len=LEN)
  nnx.update(jsrelu, pretrained)
  added = {p for p, _ in nnx.to_flat_state(nnx.state(relu, nnx.Param))} - {
      p for p, _ in nnx.to_flat_state(pretrained)}
  assert added == {("layers", i, "mlp", "zeroth_bias") for i in range(2)}
  assert relu.layers[0].mlp.zeroth_bias.shape == (LEN, D)
  for model in (original, relu, jsrelu):
    model.eval()  # Dropout off.
  expected = original(tokens)
  np.testing.assert_array_equal(relu(tokens), expected)
  # Outside nnx.capture the hooks store nothing.
  assert not nnx.state(relu, nnx.Intermediate) and not nnx.state(relu, nnx.Perturbation)
  # One subclass per original class: a jitted call is traced once, for either model.
  assert type(relu.layers[0].mlp) is type(jsrelu.layers[1].mlp)
  traces = []
  forward = nnx.jit(lambda m: (traces.append(1), m(tokens))[1])
  forward(relu)
  forward(relu)
  assert len(traces) == 1
  assert not np.allclose(jsrelu(tokens), expected, atol=1e-3)
  # The zeroth bias is a Param of each block, added to its output.
  relu.layers[1].mlp.zeroth_bias[...] = jax.random.normal(jax.random.key(0), (LEN, D))
  assert not np.allclose(relu(tokens), expected, atol=1e-3)
  relu.layers[1].mlp.zeroth_bias[...] = jnp.zeros((LEN, D))
  if mlp is Mlp:  # Training mode: the block's dropout drops the new activations with
    # the same draws (the rng state copied too).
    nnx.update(relu, nnx.state(original, nnx.RngState))
    original.train()
    relu.train()
    dropped = original(tokens)
    assert not np.allclose(dropped, expected, atol=1e-3)
    np.testing.assert_array_equal(relu(tokens), dropped)


def _train(model, tokens, targets, steps=4):
  """nnx.Optimizer with the projections; metrics from nnx.capture and probe gradients."""
  optimizer = nnx.Optimizer(
      model, sparse_jax.optax_projections(optax.adam(3e-2), zeroth_bias_clipping=0.05),
      wrt=nnx.Param)
  # Zero probes on z and y of every block, shaped by one captured call.
  _, probes = nnx.capture(model, nnx.Perturbation)(tokens)

  @nnx.jit
  def train_step(model, optimizer, probes):
    def loss_fn(model, probes):
      logits, inter = nnx.capture(model, nnx.Intermediate, init=probes)(tokens)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return loss, inter

    (loss, inter), (grads, probe_grads) = nnx.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(model, probes)
    optimizer.update(model, grads)
    return loss, {**metrics.activation_metrics(inter),
                  **metrics.gradient_metrics(probe_grads),
                  **metrics.spectral_metrics(inter),
                  **metrics.flatness_metrics(inter, probe_grads),
                  **metrics.parameter_metrics(nnx.state(model, nnx.Param),
                                              r"(^|/)zeroth_bias$", r"(?i)norm")}

  losses = []
  for _ in range(steps):
    loss, m = train_step(model, optimizer, probes)
    losses.append(float(loss))
  return losses, m


def swiglu(rngs: nnx.Rngs) -> FeedForward:
  return FeedForward(rngs, act=nnx.silu)


@pytest.mark.parametrize("mlp", [Mlp, swiglu], ids=["relu", "swiglu"])
def test_training_with_nnx_optimizer_projections_and_metrics(mlp):
  tokens, targets = _data()
  model = Transformer(mlp, rngs=nnx.Rngs(0))
  _randomize(model)
  sparse_jax.sparsify(model, max_len=LEN)  # In place.
  model.eval()  # Dropout off: dL/dz = 0 exactly where f'(z) = 0.
  losses, m = _train(model, tokens, targets)
  assert losses[-1] < losses[0]
  for i, layer in enumerate(model.layers):
    gamma = np.asarray(layer.mlp_norm.scale[...])
    bias = np.abs(np.asarray(layer.mlp.zeroth_bias[...]))
    assert np.all(gamma >= 1.0)  # Clamped; its bias kept at 0.
    np.testing.assert_array_equal(layer.mlp_norm.bias[...], 0.0)
    assert np.all(bias <= 0.05 * gamma + 1e-6)
    assert np.any(np.isclose(bias, 0.05 * gamma, rtol=1e-5))  # The box was active.
    assert np.any(np.asarray(layer.attn_norm.scale[...]) < 1.0)  # Not restricted.
    name = f"layer_{i}"
    assert 0.0 < float(m[f"activation_density/{name}"]) < 1.0
    assert abs(float(m[f"gradient_sparsity_1e-09/{name}"])
               - float(m[f"derivative_sparsity/{name}"])) < 0.02
    assert float(m[f"w1_frobenius_sq/{name}"]) > 0.0
    assert float(m[f"output_gradient_norm/{name}"]) > 0.0
    np.testing.assert_allclose(m[f"zeroth_bias_abs/{name}"], np.mean(bias), rtol=1e-5)
  assert ("augmented_flatness_key/mean" in m) == (mlp is Mlp)  # Plain blocks only.


@pytest.mark.parametrize("stack", [ScannedTransformer, RematScannedTransformer],
                         ids=["scan", "scan_remat"])
def test_scanned_stack(stack):
  tokens, targets = _data()
  model = stack(rngs=nnx.Rngs(0))
  _randomize(model)
  model.eval()
  expected = model(tokens)
  relu = _sparsified_with_params_of(model, stack(rngs=nnx.Rngs(3)), activation="relu",
                                    max_len=LEN)
  # One stacked table [layers, max_len, d], sliced per layer by the scan.
  assert relu.layers.mlp.zeroth_bias.shape == (3, LEN, D)
  np.testing.assert_array_equal(relu(tokens), expected)
  sparse = sparse_jax.sparsify(model, max_len=LEN)
  losses, m = _train(sparse, tokens, targets, steps=3)
  assert losses[-1] < losses[0]
  # The stack marker's [layers] shape makes the metrics read three layers.
  assert {k for k in m if k.startswith("activation_density/")} == {
      "activation_density/layer_0", "activation_density/layer_1",
      "activation_density/layer_2", "activation_density/mean"}
  assert {k for k in m if k.startswith("zeroth_bias_abs/")} == {
      "zeroth_bias_abs/layer_0", "zeroth_bias_abs/layer_1", "zeroth_bias_abs/layer_2",
      "zeroth_bias_abs/mean"}
  gamma = np.asarray(sparse.layers.mlp_norm.scale[...])  # [layers, d]
  bias = np.abs(np.asarray(sparse.layers.mlp.zeroth_bias[...]))
  assert np.all(gamma >= 1.0) and np.all(bias <= 0.05 * gamma[:, None] + 1e-6)


@pytest.mark.parametrize("position", ["mlp_output", "mlp_input"])
def test_cached_decoding_adds_the_row_of_each_true_position(position):
  tokens, _ = _data()
  full = sparse_jax.sparsify(Transformer(FeedForward, rngs=nnx.Rngs(0)), max_len=LEN,
                             zeroth_bias=position)
  _randomize(full)  # Zeroth biases too: a wrong row would show.
  decoder = sparse_jax.sparsify(Transformer(FeedForward, rngs=nnx.Rngs(1), decode=True),
                                max_len=LEN, zeroth_bias=position)
  nnx.update(decoder, nnx.state(full, nnx.Param))
  for layer in decoder.layers:  # The model's own cache set-up: nothing for sparsify.
    layer.attn.init_cache((BATCH, LEN, D))
  expected = nnx.jit(lambda m: m(tokens))(full)
  step = nnx.jit(lambda m, token, t: m(token, position=t))
  cached = np.concatenate([step(decoder, tokens[:, t:t + 1], t) for t in range(LEN)], 1)
  np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
  # Each step used its own row: with the rows of position 0 everywhere it differs.
  for layer in full.layers:
    layer.mlp.zeroth_bias[...] = jnp.broadcast_to(layer.mlp.zeroth_bias[0:1], (LEN, D))
  assert not np.allclose(nnx.jit(lambda m: m(tokens))(full), expected, atol=1e-3)


def test_mixing_and_errors():
  tokens, _ = _data()
  original = Transformer(rngs=nnx.Rngs(0))
  _randomize(original)
  original.eval()
  expected = original(tokens)
  mixed = _sparsified_with_params_of(original, Transformer(rngs=nnx.Rngs(0)),
                                     activation="mixed", max_len=LEN)
  jsrelu = _sparsified_with_params_of(original, Transformer(rngs=nnx.Rngs(0)), max_len=LEN)
  # k = 0: ReLU, the original model; k = 1: J-SquaredReLU. Set inside jit too.
  run = nnx.jit(lambda m, k: (sparse_jax.set_mixing(m, k), m(tokens))[1])
  np.testing.assert_allclose(run(mixed, 0.0), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(mixed, 1.0), jsrelu(tokens), rtol=1e-5, atol=1e-5)
  assert not np.allclose(jsrelu(tokens), expected, atol=1e-3)
  assert float(mixed.layers[0].mlp.mixing[...]) == 1.0  # A state of the model.
  # observe=False: the method without the hooks; nnx.capture collects nothing.
  quiet = _sparsified_with_params_of(jsrelu, Transformer(rngs=nnx.Rngs(0)), max_len=LEN,
                                     observe=False)
  out, sown = nnx.capture(quiet, nnx.Intermediate)(tokens)
  assert not sown
  np.testing.assert_array_equal(out, jsrelu(tokens))
  with pytest.raises(ValueError, match=r"(?s)no MLP block in Transformer.*"
                     r"layers/0/mlp \(Mlp\).*\nFix: pass match="):
    sparse_jax.sparsify(Transformer(rngs=nnx.Rngs(0)), match="nothing", max_len=LEN)
  with pytest.raises(ValueError, match=r"\nFix: pass max_len="):
    sparse_jax.sparsify(Transformer(rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="dense_types"):
    sparse_jax.sparsify(Transformer(rngs=nnx.Rngs(0)), max_len=LEN, dense_types=nnx.Linear)
  with pytest.raises(ValueError, match=r"rngs= is for NNX models.*\nFix: drop rngs="):
    sparse_jax.sparsify(flax.linen.Dense(3), rngs=nnx.Rngs(0))
  too_short = sparse_jax.sparsify(Transformer(rngs=nnx.Rngs(0)), max_len=LEN - 1)
  with pytest.raises(ValueError, match=r"exceeds its zeroth bias table \(4 rows\)"):
    too_short(tokens)


# ------------------------------- flax's Gemma example's style: explicit layer caches
class GemmaStyleFeedForward(nnx.Module):
  """gate_proj, up_proj, down_proj nnx.Linear; gelu on the gate, called first."""

  def __init__(self, rngs: nnx.Rngs):
    self.gate_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(FF, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    gate_value = nnx.gelu(self.gate_proj(x))
    return self.down_proj(gate_value * self.up_proj(x))


class CachedAttention(nnx.Module):
  """One head; the cache is a dict passed in and returned (k, v, end_index [batch])."""

  def __init__(self, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
    self.kv_proj = nnx.Linear(D, 2 * D, use_bias=False, rngs=rngs)
    self.out_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)

  def __call__(self, x, segment_pos, cache, attn_mask):
    query = self.q_proj(x)
    key, value = jnp.split(self.kv_proj(x), 2, axis=-1)
    if cache is not None:
      start = (0, cache["end_index"][0], 0)
      key = jax.lax.dynamic_update_slice(cache["k"], key, start)
      value = jax.lax.dynamic_update_slice(cache["v"], value, start)
    logits = jnp.einsum("btd,bsd->bts", query, key) / np.sqrt(D)
    probs = jax.nn.softmax(jnp.where(attn_mask, logits, -1e30), axis=-1)
    out = self.out_proj(jnp.einsum("bts,bsd->btd", probs, value))
    if cache is None:
      return None, out
    return {"k": key, "v": value, "end_index": cache["end_index"] + x.shape[1]}, out


class GemmaStyleBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.pre_attention_norm = nnx.RMSNorm(D, rngs=rngs)
    self.attn = CachedAttention(rngs)
    self.pre_ffw_norm = nnx.RMSNorm(D, rngs=rngs)
    self.mlp = GemmaStyleFeedForward(rngs)

  def __call__(self, x, segment_pos, cache, attn_mask):
    cache, attn_output = self.attn(self.pre_attention_norm(x), segment_pos, cache,
                                   attn_mask)
    x = x + attn_output
    return cache, x + self.mlp(self.pre_ffw_norm(x))


class GemmaStyleTransformer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embedder = nnx.Embed(VOCAB, D, rngs=rngs)
    self.positions = nnx.Param(jax.random.normal(rngs.params(), (LEN, D)))
    self.blocks = nnx.List([GemmaStyleBlock(rngs) for _ in range(2)])
    self.final_norm = nnx.RMSNorm(D, rngs=rngs)

  def __call__(self, tokens, positions, cache, attn_mask):
    x = self.embedder(tokens) + self.positions[...][positions]
    new_cache = []
    for i, block in enumerate(self.blocks):
      layer_cache, x = block(x, positions, None if cache is None else cache[i], attn_mask)
      new_cache.append(layer_cache)
    return self.embedder.attend(self.final_norm(x)), new_cache


def test_cached_decoding_with_explicit_gemma_style_caches():
  tokens, _ = _data()
  model = sparse_jax.sparsify(GemmaStyleTransformer(nnx.Rngs(0)), max_len=LEN,
                             match=GemmaStyleFeedForward)
  _randomize(model)  # Zeroth biases too.
  positions = np.broadcast_to(np.arange(LEN), (BATCH, LEN))
  causal = positions[:, :, None] >= positions[:, None, :]
  expected, _ = nnx.jit(lambda m: m(tokens, positions, None, causal))(model)
  cache = [{"k": jnp.zeros((BATCH, LEN, D)), "v": jnp.zeros((BATCH, LEN, D)),
            "end_index": jnp.zeros((BATCH,), jnp.int32)} for _ in range(2)]

  @nnx.jit
  def step(model, tokens, positions, cache):
    mask = positions[:, :, None] >= jnp.arange(LEN)[None, None, :]
    return model(tokens, positions, cache, mask)

  # A prompt of two tokens, then one token per call.
  logits, cache = step(model, tokens[:, :2], positions[:, :2], cache)
  outs = [logits]
  for t in range(2, LEN):
    logits, cache = step(model, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), expected, rtol=1e-5, atol=1e-5)
  # The rows matter: with row 0 for every position the full pass differs.
  for block in model.blocks:
    block.mlp.zeroth_bias[...] = jnp.broadcast_to(block.mlp.zeroth_bias[0:1], (LEN, D))
  changed, _ = nnx.jit(lambda m: m(tokens, positions, None, causal))(model)
  assert not np.allclose(changed, expected, atol=1e-3)


class AxesScannedTransformer(ScannedTransformer):
  """nnx.scan with StateAxes: only the listed state on the layer axis, the rest
  broadcast."""

  def __init__(self, axes: nnx.StateAxes, *, rngs: nnx.Rngs):
    super().__init__(rngs=rngs)
    self.axes = axes

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, self.axes), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)

    return self.head(body(self.embed(tokens), self.layers))


def test_scan_that_broadcasts_the_captured_state_raises():
  tokens, _ = _data()
  carried = nnx.StateAxes({(nnx.Param, nnx.RngState, nnx.Intermediate, nnx.Perturbation): 0,
                           ...: None})
  model = sparse_jax.sparsify(AxesScannedTransformer(carried, rngs=nnx.Rngs(0)),
                              max_len=LEN)
  _, sown = nnx.capture(model, nnx.Intermediate)(tokens)
  assert sown["layers"]["mlp"]["z"][0].shape == (3, BATCH, LEN, FF)
  # Broadcast, what the blocks store is dropped by NNX: an error instead of nothing.
  params_only = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})
  model = sparse_jax.sparsify(AxesScannedTransformer(params_only, rngs=nnx.Rngs(0)),
                              max_len=LEN)
  expected = model(tokens)  # Outside nnx.capture nothing is stored: no error.
  for kind in (nnx.Intermediate, nnx.Perturbation):
    with pytest.raises(ValueError, match=(
        rf"MLP blocks \['layers/mlp'\] stored their {kind.__name__} values inside a "
        r"lifted transform .*\nFix: put nnx.Intermediate and nnx.Perturbation on the "
        r"layer axis.*observe=False")):
      nnx.capture(model, kind)(tokens)
  quiet = sparse_jax.sparsify(AxesScannedTransformer(params_only, rngs=nnx.Rngs(0)),
                              max_len=LEN, observe=False)
  out, sown = nnx.capture(quiet, nnx.Intermediate)(tokens)
  assert not sown
  np.testing.assert_array_equal(out, expected)


def test_weight_noise_in_training_mode_only():
  tokens, _ = _data()
  clean = sparse_jax.sparsify(Transformer(FeedForward, rngs=nnx.Rngs(0)), max_len=LEN)
  _randomize(clean)
  expected = clean(tokens)
  outs = {}
  for rho in ((0.2, 0.0), (0.0, 0.2)):  # Gate and up; down.
    noisy = sparse_jax.sparsify(Transformer(FeedForward, rngs=nnx.Rngs(0)), max_len=LEN,
                                weight_noise=rho, rngs=nnx.Rngs(weight_noise=7))
    nnx.update(noisy, nnx.state(clean, nnx.Param))
    step = nnx.jit(lambda m: m(tokens))
    first, second = step(noisy), step(noisy)  # The stream advances through nnx.jit.
    assert not np.allclose(first, expected, atol=1e-4)
    assert not np.allclose(first, second, atol=1e-4)
    noisy.eval()  # Evaluation is noise-free.
    np.testing.assert_array_equal(noisy(tokens), expected)
    outs[rho] = first
  assert not np.allclose(outs[(0.2, 0.0)], outs[(0.0, 0.2)], atol=1e-4)
  # A stack made by nnx.vmap: one key per layer, sliced by the scan.
  stack = ScannedTransformer(FeedForward, rngs=nnx.Rngs(0))
  stack.eval()
  expected = stack(tokens)
  sparse_jax.sparsify(stack, max_len=LEN, weight_noise=0.2, rngs=nnx.Rngs(3))
  assert stack.layers.mlp.weight_noise_rngs.key.shape == (3,)
  stack.train()
  noisy = stack(tokens)
  stack.eval()
  assert not np.allclose(noisy, stack(tokens), atol=1e-4)
  with pytest.raises(ValueError, match=r"\nFix: pass rngs=nnx.Rngs\(weight_noise=0\)"):
    sparse_jax.sparsify(Transformer(rngs=nnx.Rngs(0)), max_len=LEN, weight_noise=0.1)
