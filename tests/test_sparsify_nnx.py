"""`sparsify` on Flax NNX models, written the way NNX code is written (nnx.Linear
attributes, nnx.List of layers, nnx.MultiHeadAttention with init_cache, a Gemma-style
gated FeedForward, layers made by nnx.vmap and run by nnx.scan): the original weights
load and give the same outputs with activation='relu', training with nnx.Optimizer and
optax_projections keeps the projections, the metrics read what nnx.capture collects,
cached decoding adds each position's zeroth-bias row."""
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


def _data(seed=0):
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LEN)).astype(np.int32)
  return tokens, np.roll(tokens, -1, axis=1)


def _randomize(model, seed=1):
  """Every Param random (norm scales near 1), as a trained checkpoint's would be."""
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(
      lambda v: jnp.asarray(rng.normal(0, 0.5, v.shape) + 0.5, v.dtype), state))


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
