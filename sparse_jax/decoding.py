"""Autoregressive decoding of a T5: greedy or sampled, one token per step, jitted.

    settings = DecodeSettings(max_decode_length=14)              # greedy, dense MLPs
    out = generate(model, params, encoder_tokens, settings)      # out.tokens [B, 14]

The encoder runs once; each step feeds the previous token to `T5.decode_step`, whose
'cache' collection holds the decoder's self-attention keys/values and the
cross-attention's projections of the encoder output. Shapes are static (the cache holds
`max_decode_length` positions), so one compiled program serves every input of a batch
size; the loop is a `lax.while_loop` that stops early once every sequence has emitted
EOS (`stop_at_eos`). `sparse_mlp=True` runs the decoder MLPs through
`ops.mlp_decode` (only the rows of W2 some token needs are read); the tokens are the
same as with dense MLPs up to float rounding.

`start` and `finish` split `generate` in two (the encoder and the first step, then the
remaining steps) so that a benchmark can time the steps alone.
"""
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparse_jax.metrics import ACTIVE_THRESHOLD  # |a| above it counts as active.
from sparse_jax.models.t5 import T5

START_ID = 0  # T5's decoder start token (= padding).
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Static settings of a decode (hashable: they select the compiled program).

  Attributes:
    max_decode_length: tokens generated at most (the cache's positions).
    sparse_mlp: decoder MLPs through `ops.mlp_decode` (only active rows of W2 read).
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k: when sampling, only the k likeliest tokens (0 = all).
    stop_at_eos: stop once every sequence has emitted EOS; False always decodes
      max_decode_length tokens (benchmarks).
    eos_id: the end token; after it a sequence holds 0 (padding).
    num_ids: ids at or above this are never generated (the embedding's padding rows
      past the vocabulary); 0 = no limit.
    with_density: also count the decoder MLPs' active units per generated token.
  """
  max_decode_length: int
  sparse_mlp: bool = False
  temperature: float = 0.0
  top_k: int = 0
  stop_at_eos: bool = True
  eos_id: int = EOS_ID
  num_ids: int = 0
  with_density: bool = False


class DecodeState(NamedTuple):
  """The loop's carry: what has been generated and the model's cache."""
  step: jax.Array          # Positions generated so far (the next one to fill).
  tokens: jax.Array        # [B, max_decode_length] int32, 0 after EOS and not yet made.
  done: jax.Array          # [B] bool: EOS emitted.
  cache: Any               # T5.decode_step's 'cache' collection.
  encoded: jax.Array       # [B, Li, d_model] encoder output.
  encoder_tokens: jax.Array
  active_units: jax.Array  # [B, decoder layers] float32: active units summed over tokens.
  counted: jax.Array       # [B] float32: tokens those sums cover (up to and incl. EOS).
  union_units: jax.Array   # [decoder layers] float32: units active for some token of the
  #                          batch (not past its EOS), summed over steps.
  union_steps: jax.Array   # float32: steps those sums cover (some sequence not ended).
  rng: jax.Array


class Generation(NamedTuple):
  """What `generate` returns."""
  tokens: jax.Array   # [B, max_decode_length] int32; EOS included, 0 after it.
  lengths: jax.Array  # [B] int32: tokens up to and including EOS (all if none).
  density: jax.Array  # [B, decoder layers]: mean share of active MLP units per token
  #                     (NaN without `with_density`).
  union_density: jax.Array  # [decoder layers]: mean over steps of the share of units
  #                           active for some token of the batch: the rows of W2 that
  #                           `mlp_decode` reads (NaN without `with_density`).


def _select(logits: jax.Array, rng: jax.Array, settings: DecodeSettings) -> jax.Array:
  """The next token [B] from logits [B, vocab]: argmax, or a (top-k) sample."""
  if settings.num_ids:
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where(ids < settings.num_ids, logits, -jnp.inf)
  if settings.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / settings.temperature
  if settings.top_k:
    kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _active(intermediates: Any, num_layers: int) -> jax.Array:
  """[layers, B, d_ff] bool: the decoder MLPs' active units for this step's token."""
  decoder = intermediates["decoder"]
  return jnp.stack([jnp.abs(decoder[f"layer_{i}"]["mlp"]["a"][0][:, 0]) > ACTIVE_THRESHOLD
                    for i in range(num_layers)])


def _step(model: T5, params: Any, state: DecodeState, previous: jax.Array,
          settings: DecodeSettings, mixing: jax.Array | float,
          cache: Any | None) -> DecodeState:
  """Decodes position state.step after `previous` [B]; cache None creates it."""
  mutable = ["cache"] + (["intermediates"] if settings.with_density else [])
  variables = {"params": params} if cache is None else {"params": params, "cache": cache}
  logits, mutated = model.apply(
      variables, previous[:, None], state.encoded, state.encoder_tokens,
      decode_length=settings.max_decode_length, mixing=mixing,
      sparse_mlp=settings.sparse_mlp, method=T5.decode_step, mutable=mutable)
  token = _select(logits[:, 0], jax.random.fold_in(state.rng, state.step), settings)
  token = jnp.where(state.done, 0, token)
  counts = jnp.where(state.done, 0.0, 1.0)
  active, union = state.active_units, state.union_units
  if settings.with_density:
    units = _active(mutated["intermediates"], model.cfg.num_decoder_layers)
    units = units & ~state.done[None, :, None]
    active = active + jnp.sum(units, axis=-1, dtype=jnp.float32).T
    union = union + jnp.sum(jnp.any(units, axis=1), axis=-1, dtype=jnp.float32)
  union_steps = state.union_steps + jnp.any(~state.done).astype(jnp.float32)
  return state._replace(
      step=state.step + 1,
      tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None],
                                                 state.step, axis=1),
      done=state.done | (token == settings.eos_id), cache=mutated["cache"],
      active_units=active, counted=state.counted + counts, union_units=union,
      union_steps=union_steps)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def start(model: T5, params: Any, encoder_tokens: jax.Array, settings: DecodeSettings,
          rng: jax.Array | None = None, mixing: jax.Array | float = 1.0) -> DecodeState:
  """Encodes `encoder_tokens` [B, Li] and decodes the first token (creating the cache).

  `rng`: the randomness of sampling (temperature > 0); greedy decoding needs none.
  """
  batch = encoder_tokens.shape[0]
  encoded = model.apply({"params": params}, encoder_tokens, mixing=mixing,
                        method=T5.encode)
  state = DecodeState(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.zeros((batch, settings.max_decode_length), jnp.int32),
      done=jnp.zeros((batch,), bool), cache=None, encoded=encoded,
      encoder_tokens=encoder_tokens,
      active_units=jnp.zeros((batch, model.cfg.num_decoder_layers), jnp.float32),
      counted=jnp.zeros((batch,), jnp.float32),
      union_units=jnp.zeros((model.cfg.num_decoder_layers,), jnp.float32),
      union_steps=jnp.zeros((), jnp.float32),
      rng=jax.random.key(0) if rng is None else rng)
  return _step(model, params, state, jnp.full((batch,), START_ID, jnp.int32), settings,
               mixing, cache=None)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def finish(model: T5, params: Any, state: DecodeState, settings: DecodeSettings,
           mixing: jax.Array | float = 1.0) -> DecodeState:
  """Decodes the remaining positions of `state` (from `start`), one token per step."""
  def cond(s: DecodeState):
    more = s.step < settings.max_decode_length
    return more & ~jnp.all(s.done) if settings.stop_at_eos else more

  def body(s: DecodeState):
    previous = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1,
                                            keepdims=False)
    return _step(model, params, s, previous, settings, mixing, cache=s.cache)

  return jax.lax.while_loop(cond, body, state)


def generate(model: T5, params: Any, encoder_tokens: jax.Array, settings: DecodeSettings,
             rng: jax.Array | None = None, mixing: jax.Array | float = 1.0
             ) -> Generation:
  """Decodes up to `settings.max_decode_length` tokens for each row of `encoder_tokens`.

  Args:
    model: the T5 (its config decides the architecture).
    params: its parameters (LoRA adapters merged).
    encoder_tokens: [B, Li] int32, 0-padded.
    settings: greedy/sampling, dense or `mlp_decode` MLPs, the length.
    rng: needed for sampling (temperature > 0); each step folds in its position.
    mixing: the JSReLU share of the 'mixed' activation (finetuning runs).

  Returns:
    The tokens, their lengths and (with `settings.with_density`) the decoder MLPs'
    activation density over the generated tokens.
  """
  if settings.temperature > 0 and rng is None:
    raise ValueError("Sampling (temperature > 0) needs an rng.\n"
                     "Fix: pass rng=jax.random.key(seed), or temperature=0 (greedy).")
  state = finish(model, params, start(model, params, encoder_tokens, settings, rng, mixing),
                 settings, mixing)
  is_eos = state.tokens == settings.eos_id
  lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1,
                      settings.max_decode_length).astype(jnp.int32)
  d_ff = model.cfg.d_ff
  if settings.with_density:
    density = state.active_units / d_ff / jnp.maximum(state.counted, 1.0)[:, None]
    union = state.union_units / d_ff / jnp.maximum(state.union_steps, 1.0)
  else:
    density = jnp.full_like(state.active_units, jnp.nan)
    union = jnp.full_like(state.union_units, jnp.nan)
  return Generation(state.tokens, lengths, density, union)
