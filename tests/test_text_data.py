"""Tests of the T5 text pipeline (sparse_jax.data.text and its parts), CPU only."""

import gc
import itertools
import os
import socket
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparse_jax.data import span_corruption
from sparse_jax.data import text
from sparse_jax.data import text_corpus
from sparse_jax.data import tokenizer
from sparse_jax.errors import ConfigError

PIECES = 400  # A small vocabulary: 500 ids with the sentinels.
INPUTS, TARGETS, TOKENS = 128, 29, 141  # Span corruption lengths at 15% / 3.
NUM_TRAIN, NUM_EVAL = 1106, 123  # Documents of python_reference_text.
EOS = 1


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """A tiny T5 config like the trainer's; `text_<key>` overrides text.<key>."""
  config = ml_collections.ConfigDict(dict(
      dataset='python_reference_text', data_dir=str(data_dir), seed=0,
      batch_size=8, eval_batch_size=8, model=dict(vocab_size=512),
      text=dict(vocabulary_path='', vocabulary_pieces=PIECES,
                inputs_length=INPUTS, targets_length=TARGETS,
                noise_density=0.15, mean_noise_span_length=3.0,
                shuffle_window=64, eval_max_examples=0)))
  for key, value in overrides.items():
    if key.startswith('text_'):
      config.text[key[len('text_'):]] = value
    else:
      config[key] = value
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'Network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


def reconstruct(inputs: np.ndarray, targets: np.ndarray,
                num_pieces: int = PIECES) -> np.ndarray:
  """The raw chunk: every sentinel in `inputs` replaced by its span of `targets`
  (each ends with the EOS span corruption appends, before any padding; the chunk
  itself may hold EOS tokens that end documents)."""
  inputs = list(np.trim_zeros(inputs, 'b')[:-1])
  targets = list(np.trim_zeros(targets, 'b')[:-1])
  spans, current = {}, None
  for t in targets:
    if t >= num_pieces:
      current = spans[t] = []
    else:
      current.append(t)
  out = []
  for t in inputs:
    out.extend(spans.pop(t) if t >= num_pieces else [t])
  assert not spans, 'targets hold spans the inputs do not mark'
  return np.array(out, np.int64)


def stream_of(batches, num_pieces: int = PIECES) -> np.ndarray:
  """The token stream the (real) examples of `batches` were cut from."""
  chunks = []
  for batch in batches:
    mask = batch.get('mask', np.ones(len(batch['encoder_input_tokens'])))
    for x, y, m in zip(batch['encoder_input_tokens'],
                       batch['decoder_target_tokens'], mask):
      if m:
        chunks.append(reconstruct(x, y, num_pieces))
  return np.concatenate(chunks)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------- fixtures --

@pytest.fixture(scope='module')
def text_dir(tmp_path_factory):
  """A data_dir with the embedded corpus and a trained vocabulary.

  The corpus is written as 4 files per split, so resuming and process shards
  must seek across files, as on C4. Built with the network unreachable.
  """
  path = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as monkeypatch:
    no_network(monkeypatch)
    tfds.builder('python_reference_text', data_dir=path).download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, num_shards=4))
    info = text.prepare_dataset(make_config(path))
  assert info == text.TextInfo(
      vocab_size=PIECES + 100, tokens_length=TOKENS,
      num_train_documents=NUM_TRAIN, num_eval_documents=NUM_EVAL,
      vocabulary_path=os.path.join(path, 'sentencepiece',
                                   f'python_reference_text_{PIECES}.model'))
  return path


@pytest.fixture(scope='module')
def vocab(text_dir):
  return tokenizer.load_vocabulary(text.vocabulary_path(make_config(text_dir)))


@pytest.fixture(scope='module')
def corpus(text_dir):
  """{split: texts in file order}, read with TFDS directly."""
  builder = tfds.builder('python_reference_text', data_dir=text_dir)
  read_config = tfds.ReadConfig(interleave_cycle_length=1)
  return {split: [ex['text'].decode() for ex in tfds.as_numpy(
      builder.as_dataset(split=split, shuffle_files=False,
                         read_config=read_config))]
          for split in ('train', 'validation')}


@pytest.fixture(scope='module')
def doc_ids(corpus, vocab):
  """{split: token ids of each document, file order}."""
  return {split: [np.array(ids) for ids in vocab.encode(texts)]
          for split, texts in corpus.items()}


# ------------------------------------------------------- span corruption --

def test_targets_length_for_matches_t5():
  assert span_corruption.targets_length_for(512, 0.15, 3.0) == (568, 114)
  assert span_corruption.targets_length_for(INPUTS, 0.15, 3.0) == (
      TOKENS, TARGETS)
  with pytest.raises(ValueError):
    span_corruption.targets_length_for(512, 1.0, 3.0)


@pytest.fixture(scope='module')
def corrupted_chunks():
  """2000 random chunks of 568 tokens and their span corruptions."""
  rng = np.random.default_rng(0)
  chunks = rng.integers(3, 32000, size=(2000, 568))
  return chunks, [span_corruption.span_corrupt(
      chunk, np.random.default_rng(i), vocab_size=32100, noise_density=0.15,
      mean_noise_span_length=3.0) for i, chunk in enumerate(chunks)]


def test_span_corruption_lengths_sentinels_and_no_token_lost(corrupted_chunks):
  chunks, pairs = corrupted_chunks
  for i, (chunk, (inputs, targets)) in enumerate(zip(chunks, pairs)):
    assert inputs.shape == (512,) and targets.shape == (114,)
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs[-1] == targets[-1] == EOS
    in_sentinels = inputs[inputs >= 32000]
    # One sentinel per span, counting down from vocab_size - 1, in both.
    np.testing.assert_array_equal(
        in_sentinels, 32099 - np.arange(len(in_sentinels)))
    np.testing.assert_array_equal(targets[targets >= 32000], in_sentinels)
    assert targets[0] == 32099  # Targets start with the first span's sentinel.
    if i < 500:  # (Python-speed check.)
      np.testing.assert_array_equal(reconstruct(inputs, targets, 32000), chunk)


def test_span_corruption_statistics(corrupted_chunks):
  chunks, pairs = corrupted_chunks
  noise, spans, span_lengths = [], [], []
  positions = np.zeros(568)
  for inputs, targets in pairs:
    starts = np.flatnonzero(targets[:-1] >= 32000)
    lengths = np.diff(np.append(starts, len(targets) - 1)) - 1
    noise.append(lengths.sum() / 568)
    spans.append(len(starts))
    span_lengths.extend(lengths)
  assert abs(np.mean(noise) - 0.15) < 0.005
  assert abs(np.sum(noise) * 568 / np.sum(spans) - 3.0) < 0.1
  assert min(span_lengths) == 1 and max(span_lengths) > 8  # Random lengths.
  # Noise is spread over the chunk, not piled at one end.
  for i in range(200):
    mask = span_corruption.noise_mask(568, 0.15, 3.0, np.random.default_rng(i))
    positions += mask
  assert not positions[0] and positions[-1] == 200  # T5: starts non-noise.
  for part in np.split(positions[8:-8], 8):
    assert 0.10 < part.mean() / 200 < 0.20


def test_noise_mask_is_the_one_span_corrupt_uses():
  tokens = np.arange(10, 110)
  mask = span_corruption.noise_mask(100, 0.3, 2.0, np.random.default_rng(7))
  assert mask.dtype == bool and mask.sum() == 30
  inputs, targets = span_corruption.span_corrupt(
      tokens, np.random.default_rng(7), vocab_size=1000, noise_density=0.3,
      mean_noise_span_length=2.0)
  np.testing.assert_array_equal(targets[targets < 900][:-1], tokens[mask])
  np.testing.assert_array_equal(inputs[inputs < 900][:-1], tokens[~mask])
  # Short chunks (final eval chunks) still corrupt losslessly.
  for length in range(2, 30):
    chunk = np.arange(5, 5 + length)
    x, y = span_corruption.span_corrupt(
        chunk, np.random.default_rng(length), vocab_size=1000,
        noise_density=0.15, mean_noise_span_length=3.0)
    np.testing.assert_array_equal(reconstruct(x, y, 900), chunk)


# ---------------------------------------------------------------- corpus --

def test_embedded_corpus_is_english_prose_with_fixed_splits(text_dir, corpus):
  builder = tfds.builder('python_reference_text', data_dir=text_dir)
  assert builder.info.splits['train'].num_examples == NUM_TRAIN
  assert builder.info.splits['validation'].num_examples == NUM_EVAL
  assert builder.info.splits['train'].num_shards == 4
  train, validation = corpus['train'], corpus['validation']
  assert len(train) == NUM_TRAIN and len(validation) == NUM_EVAL
  for doc in train + validation:
    assert len(doc.split()) >= 8 and '\n' not in doc
    assert '::=' not in doc and '>>>' not in doc and 'def ' not in doc
  assert np.mean([' the ' in doc for doc in train]) > 0.5
  assert np.mean([' is ' in doc for doc in validation]) > 0.3
  assert not set(train) & set(validation)
  # The documented split of the deterministic document list.
  docs = text_corpus.documents()
  assert docs == text_corpus.documents() and len(docs) == len(set(docs))
  order = np.random.RandomState(0).permutation(len(docs))
  assert sorted(validation) == sorted(docs[i] for i in order[:NUM_EVAL])
  assert sorted(train) == sorted(docs[i] for i in order[NUM_EVAL:])


def test_paragraph_rules():
  topic = '\n'.join([
      'Title of the topic',
      '******************',
      '',
      'A plain paragraph that is wrapped',
      'over two lines of the help text.',
      '',
      '   assign_stmt ::= (target_list "=")+ expression',
      '',
      '* A list item with more than eight words in',
      '  it, wrapped.',
      '',
      '  The same item goes on in a second paragraph here.',
      '',
      '     for i in range(10):',
      '         print(i)',
      '',
      '   >>> print("an interactive session with many words in it")',
      '',
      'Too short to keep.',
      '',
      'object.__len__(self)',
      '',
      '   Called to implement the built-in function "len()" for the',
      '   object, which is prose even though it is indented.',
  ])
  assert text_corpus.paragraphs(topic) == [
      'A plain paragraph that is wrapped over two lines of the help text.',
      'A list item with more than eight words in it, wrapped.',
      'The same item goes on in a second paragraph here.',
      'Called to implement the built-in function "len()" for the object, '
      'which is prose even though it is indented.',
  ]


# ------------------------------------------------------------- tokenizer --

def test_vocabulary_t5_conventions_and_round_trip(vocab, corpus):
  assert vocab.vocab_size == PIECES + 100 == vocab.num_pieces + 100
  assert (vocab.pad_id, vocab.eos_id) == (0, 1)
  assert vocab.sentinel_id(0) == PIECES + 99 and vocab.sentinel_id(99) == PIECES
  docs = corpus['train']
  ids = vocab.encode(docs)
  flat = np.concatenate([np.array(i) for i in ids])
  assert flat.min() > EOS and flat.max() < vocab.num_pieces  # No sentinels.
  for doc, doc_ids in zip(docs, ids):
    assert vocab.decode(doc_ids) == vocab.normalize(doc)
  # Normalization only folds whitespace (and a few compatibility forms).
  assert np.mean([vocab.normalize(d) == ' '.join(d.split()) for d in docs]) > 0.95
  assert max(vocab.encode(['<extra_id_0> looks like a sentinel'])[0]) < PIECES
  sentence = 'The object is returned.'
  assert vocab.decode(vocab.encode([sentence])[0] + [vocab.sentinel_id(3), EOS]
                      ) == sentence + '<extra_id_3>'


def test_vocabulary_training_is_deterministic(corpus, tmp_path):
  models = []
  for name in ('a', 'b'):
    path = str(tmp_path / name / 'vocab.model')  # Makes the directory.
    vocab = tokenizer.train_vocabulary(corpus['train'][:300], 200, path)
    assert vocab.vocab_size == 300
    with open(path, 'rb') as f:
      models.append(f.read())
    assert os.listdir(tmp_path / name) == ['vocab.model']  # No temporary left.
  assert models[0] == models[1]


def assert_config_error(error, *needles):
  message = str(error.value)
  for needle in needles:
    assert needle in message
  assert message.splitlines()[-1].startswith('Fix: ')


def test_bad_vocabulary_files(tmp_path):
  missing = str(tmp_path / 'missing.model')
  with pytest.raises(ConfigError) as error:
    tokenizer.load_vocabulary(missing)
  assert_config_error(error, missing, 'vocabulary_path')
  corrupt = tmp_path / 'corrupt.model'
  corrupt.write_bytes(os.urandom(2000))
  with pytest.raises(ConfigError) as error:
    tokenizer.load_vocabulary(str(corrupt))
  assert_config_error(error, str(corrupt))


def test_model_vocab_size_must_fit(text_dir, vocab):
  assert tokenizer.model_vocab_size(32100) == 32128
  assert tokenizer.model_vocab_size(1100) == 1152
  assert tokenizer.model_vocab_size(512) == 512
  for good in (500, 512):
    tokenizer.check_model_vocab(good, vocab)
  for bad in (499, 513, 32128):
    with pytest.raises(ConfigError) as error:
      tokenizer.check_model_vocab(bad, vocab)
    assert_config_error(error, f'vocab_size={bad}',
                        'Fix: pass --config.model.vocab_size=512')
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(text_dir, model=dict(vocab_size=1152)))
  assert_config_error(error, '--config.model.vocab_size=512')


# ---------------------------------------------------------------- packing --

def test_train_batches_pack_documents_in_file_order(text_dir, doc_ids):
  # Window 1: file order, so the stream is the documents back to back.
  batches = take(text.train_iterator(make_config(text_dir,
                                                 text_shuffle_window=1)), 6)
  for batch in batches:
    assert batch['encoder_input_tokens'].shape == (8, INPUTS)
    assert batch['decoder_target_tokens'].shape == (8, TARGETS)
    assert batch['decoder_input_tokens'].shape == (8, TARGETS)
    assert batch['decoder_loss_weights'].shape == (8, TARGETS)
    for key in ('encoder_input_tokens', 'decoder_target_tokens',
                'decoder_input_tokens'):
      assert batch[key].dtype == np.int32
    # Full examples: no padding anywhere.
    assert (batch['encoder_input_tokens'] != 0).all()
    assert (batch['decoder_target_tokens'] != 0).all()
    assert (batch['decoder_loss_weights'] == 1.0).all()
    assert batch['decoder_loss_weights'].dtype == np.float32
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:],
                                  batch['decoder_target_tokens'][:, :-1])
    assert (batch['encoder_input_tokens'][:, -1] == EOS).all()
  stream = stream_of(batches)
  assert len(stream) == 6 * 8 * TOKENS
  expected = np.concatenate(doc_ids['train'])[:len(stream)]
  np.testing.assert_array_equal(stream, expected)
  # Documents end inside examples, not only at example boundaries.
  ends = np.cumsum([len(d) for d in doc_ids['train']])
  ends = ends[ends < len(stream)]
  assert np.any(ends % TOKENS != 0) and len(ends) > 10


def test_eos_ends_every_document_before_packing(text_dir, doc_ids):
  """text.document_separator='eos' (the official collator, T5's pipelines): the
  packed stream is the documents each followed by EOS, so every chunk has EOS at
  each document end inside it; train and eval alike, resumable from a state."""
  config = make_config(text_dir, text_shuffle_window=1, text_document_separator='eos')
  iterator = text.train_iterator(config)
  batches = take(iterator, 6)
  state = iterator.state()
  iterator.close()
  stream = stream_of(batches)
  ended = [np.append(d, EOS) for d in doc_ids['train']]
  np.testing.assert_array_equal(stream, np.concatenate(ended)[:len(stream)])
  ends = np.cumsum([len(d) for d in ended])
  ends = ends[ends <= len(stream)]
  assert len(ends) > 10 and np.any(ends % TOKENS != 0)
  np.testing.assert_array_equal(stream[ends - 1], EOS)
  assert np.sum(stream == EOS) == len(ends)  # Nothing else is EOS.
  resumed = text.train_iterator(config, state=state)
  np.testing.assert_array_equal(
      stream_of(take(resumed, 2)), np.concatenate(ended)[len(stream):][:2 * 8 * TOKENS])
  resumed.close()
  evals = list(text.eval_iterator(config))
  eval_stream = stream_of(evals)
  np.testing.assert_array_equal(
      eval_stream, np.concatenate([np.append(d, EOS) for d in doc_ids['validation']]))
  # 'none' (the default here): documents back to back, no EOS inside the stream.
  plain = stream_of(take(text.train_iterator(make_config(text_dir,
                                                         text_shuffle_window=1)), 2))
  assert not np.any(plain == EOS)


def segment(stream: np.ndarray, docs: list[np.ndarray]) -> list[int]:
  """Indices into `docs` whose tokens, in that order, make up `stream` (the
  last one possibly cut short)."""
  by_start = {}
  for i, d in enumerate(docs):
    if len(d):
      by_start.setdefault(tuple(d[:3]), []).append(i)
  out, pos = [], 0
  while pos < len(stream):
    match = [i for i in by_start.get(tuple(stream[pos:pos + 3]), ())
             if np.array_equal(stream[pos:pos + len(docs[i])],
                               docs[i][:len(stream) - pos])]
    assert match, f'no document starts at token {pos}'
    out.append(match[0])
    pos += len(docs[match[0]])
  return out


@pytest.fixture(scope='module')
def shuffled_run(text_dir, doc_ids):
  """An uninterrupted run into the second epoch, with state() after each batch."""
  epoch_tokens = sum(len(d) for d in doc_ids['train'])
  num = -(-(epoch_tokens + 3000) // (8 * TOKENS))
  iterator = text.train_iterator(make_config(text_dir))
  np.testing.assert_array_equal(iterator.state(), [0, 0, 0, 0])
  batches, states = [], []
  for _ in range(num):
    batches.append(next(iterator))
    states.append(iterator.state())
  iterator.close()
  return batches, states


def test_windowed_shuffle_covers_each_window_in_a_new_order(doc_ids,
                                                            shuffled_run):
  batches, _ = shuffled_run
  docs = doc_ids['train']
  epoch_tokens = sum(len(d) for d in docs)
  stream = stream_of(batches)
  first = segment(stream[:epoch_tokens], docs)
  # Every document once, each window of 64 kept together but permuted.
  nonempty = [i for i, d in enumerate(docs) if len(d)]
  assert sorted(first) == nonempty
  windows = [first[i:i + 64] for i in range(0, len(first), 64)]
  for w, order in enumerate(windows):
    assert sorted(order) == list(range(64 * w, min(64 * w + 64, NUM_TRAIN)))
  assert sum(order != sorted(order) for order in windows) == len(windows)
  # The next epoch starts again with window 0, in another order.
  second = segment(stream[epoch_tokens:], docs)[:20]
  assert set(second) <= set(range(64)) and second != windows[0][:20]


def test_resume_from_state_and_from_step(text_dir, shuffled_run):
  batches, states = shuffled_run
  epochs = [int(s[0]) for s in states]
  docs = [int(s[1]) for s in states]
  assert all(int(s[3]) == 8 * (k + 1) for k, s in enumerate(states))
  k_far = next(k for k in range(len(states)) if docs[k] > 300) + 1
  k_epoch = epochs.index(1) + 1
  assert states[k_far - 1][2] > 0  # Resumes inside a document.
  for k in (3, k_far, k_epoch):
    resumed = text.train_iterator(make_config(text_dir), state=states[k - 1])
    np.testing.assert_array_equal(resumed.state(), states[k - 1])
    assert_batches_equal(take(resumed, 3), batches[k:k + 3])
    np.testing.assert_array_equal(resumed.state(), states[k + 2])
    resumed.close()
  # Without a state, start_step regenerates the stream up to that step.
  stepped = text.train_iterator(make_config(text_dir), start_step=k_far)
  np.testing.assert_array_equal(stepped.state(), states[k_far - 1])
  assert_batches_equal(take(stepped, 2), batches[k_far:k_far + 2])
  stepped.close()
  with pytest.raises(ConfigError):
    text.train_iterator(make_config(text_dir), state=np.zeros(3, np.int64))
  with pytest.raises(ConfigError):
    text.train_iterator(make_config(text_dir),
                        state=np.array([0, NUM_TRAIN + 1, 0, 0]))


def test_train_is_seeded(text_dir, shuffled_run):
  batches, _ = shuffled_run
  other = take(text.train_iterator(make_config(text_dir, seed=1)), 1)[0]
  again = take(text.train_iterator(make_config(text_dir)), 1)[0]
  assert_batches_equal([again], batches[:1])
  assert not np.array_equal(other['encoder_input_tokens'],
                            batches[0]['encoder_input_tokens'])


def test_train_process_shards_are_disjoint_halves(text_dir, doc_ids):
  config = make_config(text_dir, text_shuffle_window=1)
  half = -(-NUM_TRAIN // 2)
  docs = doc_ids['train']
  for index, (start, end) in enumerate(((0, half), (half, NUM_TRAIN))):
    iterator = text.train_iterator(config, process_index=index,
                                   process_count=2)
    batches = take(iterator, 3)
    iterator.close()
    assert batches[0]['encoder_input_tokens'].shape == (4, INPUTS)
    stream = stream_of(batches)
    expected = np.concatenate(docs[start:end])[:len(stream)]
    np.testing.assert_array_equal(stream, expected)
    assert len(segment(stream, docs[start:end])) > 5


def test_prefetch_thread_is_a_daemon_and_stops(text_dir):
  iterator = text.train_iterator(make_config(text_dir))
  next(iterator)
  thread = iterator._thread  # pylint: disable=protected-access
  assert thread.daemon
  del iterator
  gc.collect()
  thread.join(10)
  assert not thread.is_alive()


# ------------------------------------------------------------------- eval --

def test_eval_pads_every_process_to_the_same_batches(text_dir, doc_ids):
  config = make_config(text_dir)
  half = -(-NUM_EVAL // 2)  # tfds.even_splits: the first shards get the rest.
  runs = [list(text.eval_iterator(config, process_index=i, process_count=2))
          for i in range(2)]
  assert len(runs[0]) == len(runs[1]) > 2
  expected_counts = []
  for run, (start, end) in zip(runs, ((0, half), (half, NUM_EVAL))):
    tokens = np.concatenate(doc_ids['validation'][start:end])
    full, tail = divmod(len(tokens), TOKENS)
    expected_counts.append(full + (tail >= 4))
    masks = np.concatenate([b['mask'] for b in run])
    assert masks.dtype == np.float32 and run[0]['mask'].shape == (4,)
    np.testing.assert_array_equal(
        masks, np.arange(len(masks)) < expected_counts[-1])
    # The real examples are the shard's documents back to back, tail included.
    np.testing.assert_array_equal(stream_of(run), tokens[:len(tokens) - (
        tail if tail < 4 else 0)])
    rows = {key: np.concatenate([b[key] for b in run]) for key in run[0]}
    for key, value in rows.items():
      if key != 'mask':
        assert not value[masks == 0].any(), key  # Padding is all zeros.
    last = int(masks.sum()) - 1  # The partial chunk: corrupted, zero-padded.
    if tail >= 4:
      inputs = rows['encoder_input_tokens'][last]
      length = list(inputs).index(EOS) + 1
      assert length < INPUTS and not inputs[length:].any()
      weights = rows['decoder_loss_weights'][last]
      assert 0 < weights.sum() < TARGETS
  assert len(runs[0]) == -(-max(expected_counts) // 4)
  again = list(text.eval_iterator(config, process_index=1, process_count=2))
  assert_batches_equal(again, runs[1])


def test_eval_max_examples(text_dir):
  config = make_config(text_dir, text_eval_max_examples=10)
  runs = [list(text.eval_iterator(config, process_index=i, process_count=2))
          for i in range(2)]
  assert [len(r) for r in runs] == [2, 2]  # ceil(10 / 8) batches of 4.
  assert sum(b['mask'].sum() for r in runs for b in r) == 10
  whole = list(text.eval_iterator(make_config(text_dir), process_index=0,
                                  process_count=2))
  np.testing.assert_array_equal(runs[0][0]['encoder_input_tokens'],
                                whole[0]['encoder_input_tokens'])


# ------------------------------------------------------------- bad input --

def test_config_errors(text_dir):
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(text_dir, dataset='wikipedia'))
  assert_config_error(error, 'wikipedia', '--config.dataset=')
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(text_dir, text_targets_length=30))
  assert_config_error(error, 'targets_length=30',
                      f'--config.text.targets_length={TARGETS}')
  with pytest.raises(ConfigError) as error:
    text.train_iterator(make_config(text_dir, batch_size=7), process_count=2)
  assert_config_error(error, 'batch_size=7')


def test_c4_errors_before_anything_slow(tmp_path, monkeypatch):
  no_network(monkeypatch)
  data_dir = tmp_path / 'tfds'
  c4 = dict(dataset='c4/en', text_eval_max_examples=100,
            text_vocabulary_path='/some/sentencepiece.model')
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(data_dir, **{**c4,
                                                  'text_vocabulary_path': ''}))
  assert_config_error(error, 'c4/en', 'vocabulary_path')
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(data_dir, **{**c4,
                                                  'text_eval_max_examples': 0}))
  assert_config_error(error, 'eval_max_examples')
  start = time.time()
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(data_dir, **c4))
  assert time.time() - start < 30
  assert_config_error(error, 'c4/en is not prepared', str(data_dir),
                      '--config.data_dir=gs://bucket/tfds where c4/en:3.x')
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(make_config(data_dir, **{**c4,
                                                  'dataset': 'c4/en:9.9.9'}))
  assert_config_error(error, 'c4/en:9.9.9')
  assert not data_dir.exists() or not list(data_dir.rglob('*.tfrecord*'))


class EmptyTextForTest(tfds.core.GeneratorBasedBuilder):
  """Documents that are all blank."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(3),
            'validation': self._generate_examples(2)}

  def _generate_examples(self, num):
    for i in range(num):
      yield i, {'text': ' ' * i}


def test_corpus_without_text(tmp_path, monkeypatch, text_dir):
  monkeypatch.setitem(text.DATASETS, 'empty_text_for_test',
                      text.Spec(embedded=True))
  config = make_config(tmp_path, dataset='empty_text_for_test')
  with pytest.raises(ConfigError) as error:
    text.prepare_dataset(config)
  assert_config_error(error, 'empty_text_for_test', 'has no text')
  # With a vocabulary the train stream finds out after one empty epoch.
  config.text.vocabulary_path = text.vocabulary_path(make_config(text_dir))
  with pytest.raises(ConfigError) as error:
    next(text.train_iterator(config))
  assert_config_error(error, 'has no text')
