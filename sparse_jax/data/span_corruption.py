"""T5's span corruption objective (Raffel et al., 2020, section 3.1.4), in numpy.

A chunk of `tokens_length` tokens is split into alternating non-noise and noise
spans; the inputs keep the non-noise tokens and replace each noise span by one
sentinel id, the targets list each sentinel followed by the tokens it hides:

  tokens   a b c d e f g h
  inputs   a <X> d e <Y> EOS            (<X> = vocab_size - 1, <Y> = ... - 2)
  targets  <X> b c <Y> f g h EOS

The span counts and the random segmentation follow T5's `random_spans_*`
functions, so lengths match T5 exactly (512 inputs <- 568 tokens -> 114
targets for density 0.15, mean span length 3).
"""

import numpy as np


def _span_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for a chunk of `length` tokens."""
  # Python's round, like T5: halves go to the even integer.
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  # T5 would silently make empty spans when the spans outnumber the tokens
  # (density > 0.5 with mean span length ~1); cap instead. No effect otherwise.
  return num_noise, min(num_spans, num_noise, length - num_noise)


def _corrupted_lengths(tokens_length: int, noise_density: float,
                       mean_noise_span_length: float) -> tuple[int, int]:
  """(inputs, targets) lengths after corruption, both including EOS."""
  num_noise, num_spans = _span_counts(tokens_length, noise_density,
                                      mean_noise_span_length)
  return (tokens_length - num_noise + num_spans + 1,
          num_noise + num_spans + 1)


def targets_length_for(inputs_length: int, noise_density: float,
                       mean_noise_span_length: float) -> tuple[int, int]:
  """Raw chunk length that corrupts into exactly `inputs_length` inputs.

  T5's `random_spans_helper`: the longest chunk whose inputs (non-noise tokens,
  one sentinel per span, EOS) fit `inputs_length`. The inputs length grows by 0
  or 1 per extra token, so it hits `inputs_length` exactly. (T5's special case
  for noise_density 0.5, one token less so that targets are not longer than
  inputs, is left out: it would make the inputs one token short.)

  Args:
    inputs_length: encoder length, EOS included (e.g. 512).
    noise_density: fraction of tokens corrupted (e.g. 0.15).
    mean_noise_span_length: mean corrupted span length (e.g. 3.0).

  Returns:
    (tokens_length, targets_length), e.g. (568, 114) for 512 / 0.15 / 3.0; the
    targets length includes EOS.
  """
  if inputs_length < 3:
    raise ValueError(f'inputs_length={inputs_length} is below 3.')
  if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
    raise ValueError(
        f'Need 0 < noise_density < 1 and mean_noise_span_length >= 1, got '
        f'{noise_density} and {mean_noise_span_length}.')
  tokens_length = inputs_length - 1  # Inputs of at most inputs_length: a start.
  while _corrupted_lengths(tokens_length + 1, noise_density,
                           mean_noise_span_length)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, _corrupted_lengths(
      tokens_length, noise_density, mean_noise_span_length)[1]


def _segment_ends(num_items: int, num_segments: int,
                  rng: np.random.Generator) -> np.ndarray:
  """Ends of a random split of `num_items` into `num_segments` non-empty parts.

  The ends are cumulative, the last one is `num_items`; every split is equally
  likely. T5 shuffles a vector of segment-start flags; choosing the num_segments - 1
  cut points among the num_items - 1 gaps at random is the same distribution.
  """
  ends = np.empty(num_segments, np.int64)
  ends[:-1] = rng.permutation(num_items - 1)[:num_segments - 1] + 1
  ends[:-1].sort()
  ends[-1] = num_items
  return ends


def _noise_spans(length: int, noise_density: float,
                 mean_noise_span_length: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Cumulative ends of the non-noise spans and of the noise spans.

  Span k of each kind: non-noise span k is followed by noise span k, so noise
  span k covers [non_noise[k] + noise[k - 1], non_noise[k] + noise[k]).
  """
  if length < 2:
    raise ValueError(f'Cannot corrupt {length} tokens; need at least 2.')
  num_noise, num_spans = _span_counts(length, noise_density,
                                      mean_noise_span_length)
  noise = _segment_ends(num_noise, num_spans, rng)
  non_noise = _segment_ends(length - num_noise, num_spans, rng)
  return non_noise, noise


def _mask(length: int, non_noise: np.ndarray, noise: np.ndarray) -> np.ndarray:
  starts = non_noise.copy()
  starts[1:] += noise[:-1]
  change = np.zeros(length + 1, np.int8)  # +1 where noise starts, -1 where it ends.
  change[starts] = 1
  change[non_noise + noise] = -1
  return np.cumsum(change[:-1], dtype=np.int8).view(bool)


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
  """T5's random spans noise mask.

  round(length * noise_density) noise tokens (at least 1, at most length - 1)
  in round(noise / mean_noise_span_length) spans (at least 1); the noise and the
  non-noise tokens are each split into that many non-empty spans at random and
  interleaved, starting with non-noise (so the last token is always noise).

  Args:
    length: number of tokens, at least 2.
    noise_density: fraction of tokens to corrupt.
    mean_noise_span_length: mean length of a corrupted span.
    rng: the randomness.

  Returns:
    bool [length], True for noise.
  """
  return _mask(length, *_noise_spans(length, noise_density,
                                     mean_noise_span_length, rng))


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, *,
                 vocab_size: int, noise_density: float,
                 mean_noise_span_length: float,
                 eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Corrupts one chunk of token ids.

  Draws the same spans as `noise_mask(len(tokens), ..., rng)`.

  Args:
    tokens: int [L] ids, L >= 2, all below the sentinels.
    rng: the randomness.
    vocab_size: the vocabulary's size including its sentinels; span i's
      sentinel is vocab_size - 1 - i.
    noise_density: fraction of tokens to corrupt.
    mean_noise_span_length: mean length of a corrupted span.
    eos_id: appended to both outputs.

  Returns:
    (inputs, targets), int32: the kept tokens with one sentinel per span, and
    each span's sentinel followed by its tokens; both end with EOS.
  """
  tokens = np.asarray(tokens, np.int32)
  non_noise, noise = _noise_spans(len(tokens), noise_density,
                                  mean_noise_span_length, rng)
  mask = _mask(len(tokens), non_noise, noise)
  num_spans = len(noise)
  span = np.arange(num_spans)
  sentinels = (vocab_size - 1 - span).astype(np.int32)
  # Sentinel k follows the first k + 1 non-noise spans and k earlier sentinels
  # in the inputs; in the targets, the first k noise spans and k sentinels.
  inputs = _interleave(tokens[~mask], non_noise + span, sentinels, eos_id)
  noise_before = np.zeros(num_spans, np.int64)
  noise_before[1:] = noise[:-1]
  targets = _interleave(tokens[mask], noise_before + span, sentinels, eos_id)
  return inputs, targets


def _interleave(kept: np.ndarray, positions: np.ndarray, sentinels: np.ndarray,
                eos_id: int) -> np.ndarray:
  """`kept` with `sentinels` placed at `positions` of the output, then EOS."""
  out = np.empty(len(kept) + len(sentinels) + 1, np.int32)
  is_kept = np.ones(len(out) - 1, bool)
  is_kept[positions] = False
  out[:-1][is_kept] = kept
  out[positions] = sentinels
  out[-1] = eos_id
  return out
