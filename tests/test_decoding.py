"""Cached T5 decoding (`T5.decode_step`, `sparse_jax.decoding`) against teacher forcing."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import decoding
from sparse_jax.models.t5 import T5, T5Config
from sparse_jax.ops import mlp_decode

BASE = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=128,
            num_encoder_layers=2, num_decoder_layers=2, max_len=12)
VARIANTS = {
    "vanilla": T5Config(**BASE),
    "sparsified": T5Config(**BASE, activation="jsrelu", zeroth_bias_position="mlp_input"),
    # The official code's zeroth bias position (configs/t5_c4.py's), on the MLP output.
    "sparsified_output": T5Config(**BASE, activation="jsrelu",
                                  zeroth_bias_position="mlp_output"),
}


@functools.lru_cache(maxsize=None)
def _model(variant: str):
  """(model, params, encoder tokens, decoder tokens) with a sparse decoder MLP.

  The decoder's MLPs are made sparse (~10% of units active) so that `mlp_decode` takes
  its sparse branches. Vanilla (ReLU): the other units' W1 columns are zero. Sparsified
  (J-SquaredReLU, active at z >= 0): the MLP input's first feature carries a per-unit
  offset of -4 through W1's first row, set by a zeroth bias whose rows differ per
  position, so a decode step that read another position's row would differ.
  Sparsified with the zeroth bias on the output: random rows, MLPs left dense.
  """
  model = T5(VARIANTS[variant])
  enc = jax.random.randint(jax.random.key(1), (2, 10), 1, 64).at[1, 7:].set(0)
  dec = jax.random.randint(jax.random.key(2), (2, 9), 1, 64).at[:, 0].set(0)
  # The sparsified params are the vanilla ones plus zeroth biases (its restricted norm
  # is a projection in training): one init, compiled once, serves both.
  params = jax.tree.map(np.array, _vanilla_params(enc, dec))
  rng = np.random.default_rng(0)
  for i in range(2):
    mlp = params["decoder"][f"layer_{i}"]["mlp"]
    w1 = mlp["wi"]["kernel"]
    offset = np.where(rng.random(w1.shape[1]) < 0.1, 0.5, -4.0)
    if VARIANTS[variant].zeroth_bias_position == "mlp_output":
      for stack in ("encoder", "decoder"):
        params[stack][f"layer_{i}"]["mlp"]["zeroth_bias"] = rng.normal(
            0.0, 0.5, (BASE["max_len"], BASE["d_model"])).astype(np.float32)
    elif VARIANTS[variant].zeroth_bias_position:
      # Feature 0 = 20 + noise per position; W1 row 0 = offset / 20.
      bias = np.zeros((BASE["max_len"], BASE["d_model"]), np.float32)
      for stack in ("encoder", "decoder"):
        params[stack][f"layer_{i}"]["mlp"]["zeroth_bias"] = np.zeros_like(bias)
      bias[:, 0] = 20.0 + rng.normal(0.0, 3.0, bias.shape[0])
      bias[:, 1:] = rng.normal(0.0, 0.3, bias[:, 1:].shape)
      mlp["zeroth_bias"] = bias
      w1[0] = offset / 20.0
    else:  # ReLU: a unit whose W1 column is zero has z = 0, inactive for every token.
      w1[:, offset < 0] = 0.0
  return model, jax.tree.map(jnp.asarray, params), enc, dec


def _vanilla_params(enc, dec):
  model = T5(VARIANTS["vanilla"])
  return nn.unbox(jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), enc, dec)["params"])


@functools.lru_cache(maxsize=None)
def _jitted(model):
  """(encode, decode_step) of `model`, jitted once per model (tests share them)."""
  encode = jax.jit(functools.partial(model.apply, method=T5.encode))
  step = jax.jit(functools.partial(model.apply, method=T5.decode_step, mutable=["cache"]),
                 static_argnames=("decode_length", "sparse_mlp"))
  return encode, step


def _cached_logits(model, params, enc, dec, length, sparse):
  """Logits of each position of `dec`, fed one token per jitted decode_step."""
  encode, step = _jitted(model)
  encoded = encode({"params": params}, enc)
  cache, out = None, []
  for t in range(dec.shape[1]):
    variables = {"params": params} | ({} if cache is None else {"cache": cache})
    logits, mutated = step(variables, dec[:, t:t + 1], encoded, enc, decode_length=length,
                           sparse_mlp=sparse)
    cache = mutated["cache"]
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("variant, sparse", [
    ("vanilla", False), ("vanilla", True), ("sparsified", False), ("sparsified", True),
    ("sparsified_output", False)])
def test_cached_decoding_equals_teacher_forcing(variant, sparse):
  model, params, enc, dec = _model(variant)
  forced = jax.jit(functools.partial(model.apply, train=False))({"params": params},
                                                                enc, dec)
  cached = _cached_logits(model, params, enc, dec, 12, sparse)  # Cache longer than dec.
  np.testing.assert_allclose(cached, forced, rtol=1e-4, atol=1e-4)
  assert not np.allclose(forced[:, 1:], forced[:, :1], atol=1e-2)  # Positions matter.


def test_zeroth_bias_row_is_the_true_position():
  """A decode step reading zeroth-bias row 0 at every position would not match."""
  model, params, enc, dec = _model("sparsified")
  forced = jax.jit(functools.partial(model.apply, train=False))({"params": params},
                                                                enc, dec)
  first_row = jax.tree.map(lambda x: x, params)
  for i in range(2):
    mlp = first_row["decoder"][f"layer_{i}"]["mlp"]
    mlp["zeroth_bias"] = jnp.broadcast_to(mlp["zeroth_bias"][:1], mlp["zeroth_bias"].shape)
  wrong = _cached_logits(model, first_row, enc, dec, 12, False)
  assert not np.allclose(wrong[:, 1:], forced[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", [
    pytest.param("vanilla", marks=pytest.mark.slow), "sparsified"])
def test_generate_is_greedy_and_mlp_decode_gives_the_same_tokens(variant):
  model, params, enc, _ = _model(variant)
  settings = decoding.DecodeSettings(max_decode_length=10, stop_at_eos=False,
                                     with_density=True)
  dense = decoding.generate(model, params, enc, settings)
  sparse = decoding.generate(model, params, enc,
                             dataclasses.replace(settings, sparse_mlp=True))
  np.testing.assert_array_equal(sparse.tokens, dense.tokens)
  np.testing.assert_allclose(sparse.density, dense.density)
  # The batch's union: at least each token's share, at most their sum (no EOS here).
  assert np.all(dense.union_density >= dense.density.max(axis=0) - 1e-6)
  assert np.all(dense.union_density <= dense.density.sum(axis=0) + 1e-6)
  # Each token is the argmax of the teacher-forced logits of the tokens before it.
  previous = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), dense.tokens[:, :-1]], 1)
  forced = model.apply({"params": params}, enc, previous, train=False)
  np.testing.assert_array_equal(jnp.argmax(forced, -1), dense.tokens)
  # Sparse enough that mlp_decode gathered rows rather than running its dense branch:
  # the batch's union of active units is at most the sum of the two tokens' shares.
  union_bound = np.max(np.sum(np.asarray(dense.density), axis=0))
  assert 0 < union_bound < mlp_decode.capacities_for(128, 2)[-1] / 128, dense.density

def test_generate_stops_at_eos_and_samples_with_an_explicit_rng():
  model, params, enc, _ = _model("vanilla")
  greedy = decoding.DecodeSettings(max_decode_length=10, stop_at_eos=False)
  first = int(decoding.generate(model, params, enc, greedy).tokens[0, 0])
  # Make the first greedy token of row 0 the end token: it stops there, padded with 0.
  stop = decoding.DecodeSettings(max_decode_length=10, eos_id=first)
  out = decoding.generate(model, params, enc, stop)
  assert out.tokens[0, 0] == first and int(out.lengths[0]) == 1
  assert not np.any(out.tokens[0, 1:])
  sample = decoding.DecodeSettings(max_decode_length=10, temperature=5.0, top_k=8,
                                   stop_at_eos=False, num_ids=60)
  with pytest.raises(ValueError, match="needs an rng"):
    decoding.generate(model, params, enc, sample)
  a = decoding.generate(model, params, enc, sample, rng=jax.random.key(0)).tokens
  b = decoding.generate(model, params, enc, sample, rng=jax.random.key(0)).tokens
  c = decoding.generate(model, params, enc, sample, rng=jax.random.key(1)).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert np.all(np.asarray(a) < 60)
