"""T5 span-corruption input pipeline for `python_reference_text` and `c4/en`.

Documents are read through TFDS in file order, tokenized with SentencePiece,
ended with EOS (`text.document_separator='eos'`, as T5's own pipelines and the
official collator; 'none' concatenates them with no separator), concatenated
and cut into chunks of `tokens_length` raw tokens (T5's "packing"), and each chunk is span-corrupted into exactly
`inputs_length` encoder and `targets_length` decoder tokens. Batches are numpy
arrays in the layout of T5X's encoder-decoder models.

Shuffling is windowed so that resuming stays cheap on C4 (365M documents):
each process reads its `tfds.even_splits` shard of `train` in file order and
permutes every window of `text.shuffle_window` consecutive documents with a
seed from (seed, process, epoch, window). A position in the stream is thus
(epoch, document index, token offset), and resuming there reads from the
start of that document's window only, via TFDS split slicing (file
instructions skip whole files). Span corruption is seeded per example by
(seed, process, example counter), so a resumed stream is bit-identical.
"""

import dataclasses
import logging
import math
import os
import queue
import threading
import weakref
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sparse_jax.data import sources
from sparse_jax.data import span_corruption
from sparse_jax.data import text_corpus  # noqa: F401  (registers the builder)
from sparse_jax.data import tokenizer


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the pipeline needs to know about one supported dataset."""
  # Small and built offline on first use; may train its own vocabulary.
  embedded: bool


DATASETS = {
    'python_reference_text': Spec(embedded=True),
    'c4/en': Spec(embedded=False),
}
_TRAIN, _EVAL = 'train', 'validation'
_TEXT = 'text'
# Distinct tags keep the shuffle / train / eval seed streams apart.
_SHUFFLE_TAG, _TRAIN_TAG, _EVAL_TAG = 1, 2, 3
_ENCODE_BATCH = 256  # Documents per SentencePiece call.
_PROBE_DOCUMENTS = 1000  # Documents per split checked for text.
_MIN_TAIL_TOKENS = 4  # Shorter final eval chunks are dropped.
_PREFETCH_BATCHES = 2
STATE_FIELDS = ('epoch', 'document', 'token_offset', 'examples')

_plain = tf.autograph.experimental.do_not_convert
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """Static facts about the configured text data, for the model and trainer."""
  vocab_size: int  # Tokenizer ids: SentencePiece pieces + 100 sentinels.
  tokens_length: int  # Raw tokens per example before span corruption.
  num_train_documents: int
  num_eval_documents: int
  vocabulary_path: str


def _spec(config) -> Spec:
  # 'c4/en:3.0.1' picks a prepared version; the embedded corpus has one.
  name, _, version = config.dataset.partition(':')
  spec = DATASETS.get(name)
  if spec is None or (version and spec.embedded):
    raise sources.error(
        f'Unknown text dataset {config.dataset!r}; supported: '
        f'{", ".join(sorted(DATASETS))} (C4 optionally with a version, '
        'c4/en:3.0.1).',
        f'pass --config.dataset=one of {", ".join(sorted(DATASETS))}')
  return spec


def validate(config, process_count: int = 1) -> tuple[Spec, int]:
  """Checks the config keys this module reads.

  Args:
    config: the experiment ConfigDict.
    process_count: number of processes sharing each global batch.

  Returns:
    The dataset's spec and the raw chunk length (tokens per example before
    span corruption).

  Raises:
    ConfigError: an unknown dataset, batch sizes that do not split over the
      processes, span corruption lengths that do not match, a C4 config
      without vocabulary_path or eval_max_examples, or a bad shuffle window.
  """
  spec = _spec(config)
  text = config.text
  for key in ('batch_size', 'eval_batch_size'):
    value = config[key]
    if value < process_count or value % process_count:
      raise sources.error(
          f'config.{key}={value} is not a positive multiple of the '
          f'{process_count} processes.',
          f'pass --config.{key}=a multiple of {process_count}')
  try:
    tokens_length, targets_length = span_corruption.targets_length_for(
        text.inputs_length, text.noise_density, text.mean_noise_span_length)
  except ValueError as e:
    raise sources.error(
        f'Bad span corruption settings: {e}',
        'pass --config.text.inputs_length>=3, 0 < '
        '--config.text.noise_density < 1 and '
        '--config.text.mean_noise_span_length>=1 (T5: 512, 0.15, 3.0)'
    ) from None
  if text.targets_length != targets_length:
    raise sources.error(
        f'config.text.targets_length={text.targets_length}, but span '
        f'corruption of {tokens_length} tokens into inputs_length='
        f'{text.inputs_length} (noise_density={text.noise_density}, '
        f'mean_noise_span_length={text.mean_noise_span_length}) gives '
        f'{targets_length} targets.',
        f'pass --config.text.targets_length={targets_length}')
  separator = text.get('document_separator', 'none')
  if separator not in ('eos', 'none'):
    raise sources.error(
        f'config.text.document_separator={separator!r} is not one of eos, none.',
        'pass --config.text.document_separator=eos (or none)')
  if text.shuffle_window < 1:
    raise sources.error(
        f'config.text.shuffle_window={text.shuffle_window} must be positive.',
        'pass --config.text.shuffle_window=e.g. 10000 (1 keeps file order)')
  if text.eval_max_examples < 0 or (
      text.eval_max_examples == 0 and not spec.embedded):
    raise sources.error(
        f'config.text.eval_max_examples={text.eval_max_examples}: '
        f'{config.dataset} needs a positive limit (0, the whole split, is '
        'only counted for the embedded corpus).',
        'pass --config.text.eval_max_examples=e.g. 10000')
  if not text.vocabulary_path:
    if not spec.embedded:
      raise sources.error(
          f'config.text.vocabulary_path is empty; a vocabulary is only '
          f'trained on the fly for the embedded corpus, not {config.dataset}.',
          f'pass --config.text.vocabulary_path={tokenizer._T5_MODEL} '  # pylint: disable=protected-access
          '(T5\'s public SentencePiece model)')
    if text.vocabulary_pieces < 1:
      raise sources.error(
          f'config.text.vocabulary_pieces={text.vocabulary_pieces} must be '
          'positive to train a vocabulary.',
          'pass --config.text.vocabulary_pieces=e.g. 1000')
  return spec, tokens_length


def vocabulary_path(config) -> str:
  """config.text.vocabulary_path, or where the trained vocabulary is cached."""
  if config.text.vocabulary_path:
    return config.text.vocabulary_path
  root = config.get('data_dir') or os.path.join(
      os.path.expanduser('~'), '.cache', 'sparse_jax')
  name = config.dataset.replace('/', '_').replace(':', '_')
  return os.path.join(root, 'sentencepiece',
                      f'{name}_{config.text.vocabulary_pieces}.model')


def _no_text(config, split: Any, detail: str) -> Exception:
  return sources.error(
      f'The {config.dataset} corpus has no text in split {split}: {detail}.',
      f'point --config.data_dir at a correctly prepared {config.dataset} '
      f'(data_dir={config.get("data_dir")!r})')


def _builder(config, spec: Spec) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; builds the embedded corpus if needed."""
  try:
    builder = tfds.builder(config.dataset, data_dir=config.get('data_dir'))
  except (AssertionError, ValueError, tfds.core.registered.DatasetNotFoundError
          ) as e:  # E.g. a version neither in the code nor in data_dir.
    raise sources.error(
        f'Cannot open {config.dataset} in data_dir={config.get("data_dir")!r}:'
        f' {e}', 'pass --config.data_dir=gs://bucket/tfds where c4/en:3.x is '
        'prepared, and --config.dataset=c4/en:THAT_VERSION') from None
  if builder.is_prepared():
    return builder
  if spec.embedded:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
    return builder
  # Never download C4 here: its preparation is a large Beam job.
  parent = os.path.dirname(builder.data_dir)
  found = []
  if tf.io.gfile.isdir(parent):
    found = sorted(v for v in tf.io.gfile.listdir(parent) if tf.io.gfile.exists(
        os.path.join(parent, v.rstrip('/'), 'dataset_info.json')))
  hint = (f'; prepared versions there: {", ".join(v.rstrip("/") for v in found)}'
          ' (select one with --config.dataset=c4/en:VERSION)' if found else '')
  raise sources.error(
      f'{config.dataset} is not prepared under data_dir='
      f'{config.get("data_dir")!r} ({builder.data_dir}){hint}.',
      'pass --config.data_dir=gs://bucket/tfds where c4/en:3.x is prepared '
      '(see https://www.tensorflow.org/datasets/catalog/c4)')


def _num_documents(config, builder, split: str) -> int:
  num = builder.info.splits[split].num_examples if split in builder.info.splits else 0
  if not num:
    raise _no_text(config, split, 'it has no documents')
  return num


def _read_texts(config, builder, split: Any, batch: int) -> tf.data.Dataset:
  """Batches of utf-8 `text` of `split`, in file order."""
  read_config = tfds.ReadConfig(
      # One file at a time: the n-th document read is the n-th of the split in
      # file order, wherever reading starts (interleaving would mix files in
      # an order that depends on the starting point).
      interleave_cycle_length=1,
      # Each iterator makes a new dataset: a cache would be thrown away.
      try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=read_config)
  ds = ds.map(_plain(lambda ex: ex[_TEXT])).batch(batch).prefetch(1)
  return ds.with_options(sources.data_options(config))


def _separated(config, vocab: tokenizer.Vocabulary,
               docs: list[list[int]]) -> list[list[int]]:
  """Token ids of documents as they are packed: each ended by EOS with
  `text.document_separator='eos'`, as they are with 'none'."""
  if config.text.get('document_separator', 'none') == 'eos':
    return [list(doc) + [vocab.eos_id] for doc in docs]
  return docs


def _decode(texts: np.ndarray) -> list[str]:
  return [t.decode('utf-8') for t in texts]


def _shard_range(builder, split: str, process_index: int,
                 process_count: int) -> tuple[int, int]:
  """[start, end) of this process's `tfds.even_splits` shard of `split`."""
  shard = tfds.even_splits(split, n=process_count)[process_index]
  (instruction,) = shard.to_absolute(builder.info.splits)
  end = instruction.to
  if end is None:
    end = builder.info.splits[split].num_examples
  return instruction.from_ or 0, end


def _check_has_text(config, builder, split: str) -> None:
  """Reads the first documents of `split`; raises if none has any text."""
  num = min(_PROBE_DOCUMENTS, builder.info.splits[split].num_examples)
  instruction = tfds.core.ReadInstruction(split, from_=0, to=num, unit='abs')
  for texts in _read_texts(config, builder, instruction, num).as_numpy_iterator():
    if any(t.strip() for t in texts):
      return
  raise _no_text(config, split, f'its first {num} documents are all empty')


def _vocabulary(config, builder) -> tokenizer.Vocabulary:
  """Loads config.text.vocabulary_path, or the cached / newly trained one."""
  path = vocabulary_path(config)
  if config.text.vocabulary_path or tf.io.gfile.exists(path):
    return tokenizer.load_vocabulary(path)
  log.info('Training a %d-piece vocabulary on %s to %s.',
               config.text.vocabulary_pieces, config.dataset, path)
  texts = [t for batch in _read_texts(config, builder, _TRAIN, 4096)
           .as_numpy_iterator() for t in _decode(batch)]
  if not any(t.strip() for t in texts):
    raise _no_text(config, _TRAIN, 'all documents are empty')
  return tokenizer.train_vocabulary(texts, config.text.vocabulary_pieces, path)


def _load(config, process_count: int = 1):
  """(spec, tokens_length, builder, vocabulary) after validating `config`."""
  sources.configure_tf()
  spec, tokens_length = validate(config, process_count)
  builder = _builder(config, spec)
  for split in (_TRAIN, _EVAL):
    _num_documents(config, builder, split)
  return spec, tokens_length, builder, _vocabulary(config, builder)


def prepare_dataset(config) -> TextInfo:
  """Validates `config`, prepares the data and the vocabulary.

  `python_reference_text` is built on first use (seconds, offline), and with
  an empty config.text.vocabulary_path a vocabulary of
  config.text.vocabulary_pieces pieces is trained on its train split and
  cached (`vocabulary_path`). `c4/en` must already be prepared in
  config.data_dir; if not, ConfigError is raised before anything slow. Fast
  when everything is cached.

  Args:
    config: the experiment ConfigDict: dataset, data_dir, seed, batch_size,
      eval_batch_size, model.vocab_size and text.* (see `validate`).

  Returns:
    Static facts about the data.

  Raises:
    ConfigError: bad settings, missing data or vocabulary, a corpus without
      text (for large corpora only the first 1,000 documents of each split
      are checked here), or a model.vocab_size that does not fit the
      vocabulary.
  """
  _, tokens_length, builder, vocab = _load(config)
  tokenizer.check_model_vocab(config.model.vocab_size, vocab)
  for split in (_TRAIN, _EVAL):
    _check_has_text(config, builder, split)
  return TextInfo(
      vocab_size=vocab.vocab_size, tokens_length=tokens_length,
      num_train_documents=_num_documents(config, builder, _TRAIN),
      num_eval_documents=_num_documents(config, builder, _EVAL),
      vocabulary_path=vocab.path)


def _seed(config) -> int:
  return int(config.seed) % 2**64  # SeedSequence entropy is non-negative.


def _batch(pairs: list[tuple[np.ndarray, np.ndarray]], size: int,
           inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
  """Stacks (inputs, targets) pairs into a T5X batch, zero-padded to `size`."""
  inputs = np.zeros((size, inputs_length), np.int32)
  targets = np.zeros((size, targets_length), np.int32)
  for row, (x, y) in enumerate(pairs):
    inputs[row, :len(x)] = x
    targets[row, :len(y)] = y
  decoder_inputs = np.zeros_like(targets)  # 0 is T5's decoder start id.
  decoder_inputs[:, 1:] = targets[:, :-1]
  return {'encoder_input_tokens': inputs,
          'decoder_target_tokens': targets,
          'decoder_input_tokens': decoder_inputs,
          'decoder_loss_weights': (targets != 0).astype(np.float32)}


class _TrainStream:
  """One process's endless, exactly positioned stream of train batches.

  The position is (epoch, document, token offset): the next token is at
  `offset` in the `document`-th document of that epoch's shuffled order.
  """

  def __init__(self, config, builder, vocab: tokenizer.Vocabulary,
               tokens_length: int, process_index: int, process_count: int,
               state: np.ndarray):
    self._config = config
    self._builder = builder
    self._vocab = vocab
    self._tokens_length = tokens_length
    self._batch_size = config.batch_size // process_count
    self._process_index = process_index
    self._window = config.text.shuffle_window
    self._seed = _seed(config)
    self._start, end = _shard_range(builder, _TRAIN, process_index,
                                    process_count)
    self._num_docs = end - self._start
    if self._num_docs < 1:
      raise sources.error(
          f'Process {process_index}/{process_count} got no {config.dataset} '
          'training documents.', 'use fewer processes or a larger dataset')
    epoch, doc, offset, self._count = (int(v) for v in state)
    if min(epoch, doc, offset, self._count) < 0 or doc > self._num_docs:
      raise sources.error(
          f'Input state {list(state)} is out of range for a train shard of '
          f'{self._num_docs} documents.', 'resume with the state saved by '
          'the same configuration, or without a state (start_step only)')
    if doc == self._num_docs:
      epoch, doc = epoch + 1, 0
    self._start_epoch(epoch, doc)
    if offset:
      self._next_document()
      if self._doc != doc or offset > len(self._tokens):
        raise sources.error(
            f'Input state {list(state)} points past the end of document {doc} '
            f'({len(self._tokens)} tokens) of the train shard.',
            'resume with the same dataset, vocabulary and shuffle_window, '
            'or without a state (start_step only)')
      self._offset = offset

  def _start_epoch(self, epoch: int, first_doc: int) -> None:
    self._epoch = epoch
    self._docs = self._epoch_documents(epoch, first_doc)
    # "Just finished document first_doc - 1": the next token starts a document.
    self._doc, self._tokens, self._offset = first_doc - 1, np.zeros(0, np.int32), 0
    self._full_epoch = first_doc == 0
    self._epoch_tokens = 0

  def _epoch_documents(self, epoch: int,
                       first_doc: int) -> Iterator[tuple[int, list[int]]]:
    """(index in the epoch's order, token ids) of documents from first_doc on."""
    window = self._window
    first_window = first_doc // window
    split = tfds.core.ReadInstruction(
        _TRAIN, from_=self._start + first_window * window,
        to=self._start + self._num_docs, unit='abs')
    texts = _read_texts(self._config, self._builder, split, window)
    for w, batch in enumerate(texts.as_numpy_iterator(), start=first_window):
      # The window's order depends only on its index, so resuming inside it
      # reproduces the order without reading the windows before it.
      order = np.random.default_rng(
          [self._seed, _SHUFFLE_TAG, self._process_index, epoch, w]
      ).permutation(len(batch))
      first = first_doc - w * window if w == first_window else 0
      for i in range(first, len(batch), _ENCODE_BATCH):
        ids = _separated(self._config, self._vocab, self._vocab.encode(
            _decode(batch[order[i:i + _ENCODE_BATCH]])))
        for j, doc in enumerate(ids):
          yield w * window + i + j, doc

  def _next_document(self) -> None:
    item = next(self._docs, None)
    while item is None:  # End of the epoch.
      if self._full_epoch and not self._epoch_tokens:
        raise _no_text(self._config, _TRAIN,
                       'a whole epoch of this process\'s shard tokenized to '
                       'nothing')
      self._start_epoch(self._epoch + 1, 0)
      item = next(self._docs, None)
    self._doc, ids = item
    self._tokens = np.asarray(ids, np.int32)
    self._offset = 0
    self._epoch_tokens += len(self._tokens)

  def _take(self, n: int) -> np.ndarray:
    """The next n tokens of the stream (documents back to back)."""
    parts = []
    while n:
      if self._offset == len(self._tokens):
        self._next_document()
        continue
      k = min(n, len(self._tokens) - self._offset)
      parts.append(self._tokens[self._offset:self._offset + k])
      self._offset += k
      n -= k
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def skip(self, num_examples: int) -> None:
    """Advances past `num_examples` examples without corrupting them."""
    for _ in range(num_examples):
      self._take(self._tokens_length)
    self._count += num_examples

  def next_batch(self) -> dict[str, np.ndarray]:
    text = self._config.text
    pairs = []
    for _ in range(self._batch_size):
      chunk = self._take(self._tokens_length)
      rng = np.random.default_rng(
          [self._seed, _TRAIN_TAG, self._process_index, self._count])
      pairs.append(span_corruption.span_corrupt(
          chunk, rng, vocab_size=self._vocab.vocab_size,
          noise_density=text.noise_density,
          mean_noise_span_length=text.mean_noise_span_length,
          eos_id=self._vocab.eos_id))
      self._count += 1
    return _batch(pairs, self._batch_size, text.inputs_length,
                  text.targets_length)

  def state(self) -> np.ndarray:
    """The position of the next token, as `STATE_FIELDS`."""
    epoch, doc, offset = self._epoch, self._doc, self._offset
    if offset == len(self._tokens):  # Document used up: start of the next.
      doc, offset = doc + 1, 0
      if doc == self._num_docs:
        epoch, doc = epoch + 1, 0
    return np.array([epoch, doc, offset, self._count], np.int64)


class _Failure:
  """An exception from the producer thread, re-raised by `__next__`."""

  def __init__(self, error: BaseException):
    self.error = error


def _produce(stream: _TrainStream, out: queue.Queue,
             stop: threading.Event) -> None:
  """Thread body: puts (batch, state after it) until `stop` is set."""

  def put(item) -> None:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return
      except queue.Full:
        pass

  try:
    while not stop.is_set():
      put((stream.next_batch(), stream.state()))
  except BaseException as e:  # pylint: disable=broad-except
    put(_Failure(e))


class TrainIterator:
  """Iterator of train batches with an exact, resumable `state()`.

  A daemon thread prepares the next batches; it only holds the stream, not
  this object, so dropping the iterator stops it.
  """

  def __init__(self, stream: _TrainStream, prefetch: int = _PREFETCH_BATCHES):
    self._state = stream.state()
    self._queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=_produce, args=(stream, self._queue, self._stop),
        name='text-train-input', daemon=True)
    self._thread.start()
    weakref.finalize(self, self._stop.set)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _Failure):
      self._stop.set()
      raise item.error
    batch, self._state = item
    return batch

  def state(self) -> np.ndarray:
    """The position right after the last batch returned, to resume from.

    Returns:
      int64 [4]: (epoch, document index in the epoch's shuffled order of this
      process's shard, token offset into that document, examples yielded so
      far); pass it as `train_iterator(..., state=...)`.
    """
    return self._state.copy()

  def close(self) -> None:
    """Stops the prefetching thread."""
    self._stop.set()


def train_iterator(config, *, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1,
                   state: Optional[np.ndarray] = None) -> TrainIterator:
  """Endless iterator over this process's share of each global train batch.

  Every example is a full chunk of `tokens_length` tokens of the shard's
  document stream (no padding; documents are concatenated, each ended by EOS
  with text.document_separator='eos', so an example can span several),
  span-corrupted with a seed
  from (config.seed, process_index, example counter).

  Args:
    config: experiment ConfigDict (see `prepare_dataset`; call it first).
    start_step: first step to yield when `state` is None: the batches from
      step 0 are regenerated and discarded (tokenized, not corrupted), which
      is exact but slow far into C4; pass `state` to resume cheaply.
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    state: `TrainIterator.state()` saved with a checkpoint; resumes exactly
      after the batch it was taken at (`start_step` is then ignored). Valid
      only with the same dataset, vocabulary, seed, shuffle_window,
      tokens_length and process layout.

  Returns:
    A `TrainIterator` of {'encoder_input_tokens': int32 [B, inputs_length],
    'decoder_target_tokens', 'decoder_input_tokens': int32 [B,
    targets_length], 'decoder_loss_weights': float32 [B, targets_length]},
    B = batch_size // process_count. The decoder inputs are the targets
    shifted right, starting with 0.
  """
  _, tokens_length, builder, vocab = _load(config, process_count)
  if state is None:
    position = np.zeros(len(STATE_FIELDS), np.int64)
  else:
    position = np.asarray(state)
    if position.shape != (len(STATE_FIELDS),) or not np.issubdtype(
        position.dtype, np.integer):
      raise sources.error(
          f'Input state has shape {position.shape} and dtype {position.dtype};'
          f' expected int [{len(STATE_FIELDS)}] {STATE_FIELDS}.',
          'pass the array returned by TrainIterator.state()')
    batch = config.batch_size // process_count
    if start_step and position[3] != start_step * batch:
      log.warning(
          'The input state has yielded %d examples, but step %d at %d '
          'examples per step would be %d: batch_size changed? Resuming from '
          'the state.', position[3], start_step, batch, start_step * batch)
  stream = _TrainStream(config, builder, vocab, tokens_length, process_index,
                        process_count, position)
  if state is None and start_step:
    stream.skip(start_step * (config.batch_size // process_count))
  return TrainIterator(stream)


def _eval_chunks(token_batches: Iterator[list[list[int]]],
                 tokens_length: int) -> Iterator[np.ndarray]:
  """Chunks of the concatenated documents, plus the final partial one.

  The partial one is kept if it has at least `_MIN_TAIL_TOKENS` tokens.
  """
  pending, size = [], 0
  for docs in token_batches:
    for doc in docs:
      pending.append(np.asarray(doc, np.int32))
      size += len(doc)
      if size >= tokens_length:
        stream = np.concatenate(pending)
        full = len(stream) // tokens_length * tokens_length
        yield from stream[:full].reshape(-1, tokens_length)
        pending, size = [stream[full:]], len(stream) - full
  if size >= _MIN_TAIL_TOKENS:
    yield np.concatenate(pending)


def _num_chunks(num_tokens: int, tokens_length: int) -> int:
  full, tail = divmod(num_tokens, tokens_length)
  return full + (tail >= _MIN_TAIL_TOKENS)


def eval_iterator(config, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over this process's share of `validation`.

  Documents of the process's `tfds.even_splits` shard are packed in file order
  like the train ones; the final partial chunk is corrupted at its own length
  and zero-padded. Example i is corrupted with a seed from (config.seed,
  process_index, i). Every process yields the same number of batches (so
  collectives stay in step), padding with all-zero examples of mask 0: with
  text.eval_max_examples > 0, ceil(eval_max_examples / eval_batch_size)
  batches holding at most eval_max_examples real examples over all
  processes; with 0, all chunks of the split (the corpus is small then).

  Args:
    config: experiment ConfigDict (see `prepare_dataset`).
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    An iterator of the `train_iterator` arrays plus 'mask': float32 [b], 1.0
    for real examples; b = eval_batch_size // process_count.
  """
  _, tokens_length, builder, vocab = _load(config, process_count)
  text = config.text
  batch = config.eval_batch_size // process_count
  start, end = _shard_range(builder, _EVAL, process_index, process_count)
  limit = text.eval_max_examples
  if limit:
    num_batches = math.ceil(limit / config.eval_batch_size)
    # This process's even share of the limit.
    limit = limit // process_count + (process_index < limit % process_count)
    token_batches = (
        _separated(config, vocab, vocab.encode(_decode(texts)))
        for texts in _read_texts(
            config, builder, tfds.core.ReadInstruction(
                _EVAL, from_=start, to=end, unit='abs'), _ENCODE_BATCH)
        .as_numpy_iterator()) if start < end else iter(())
  else:
    # Every process counts every shard's chunks to agree on the batch count.
    docs = [ids for texts in _read_texts(config, builder, _EVAL, 4096)
            .as_numpy_iterator()
            for ids in _separated(config, vocab, vocab.encode(_decode(texts)))]
    counts = [_num_chunks(sum(len(d) for d in docs[a:b]), tokens_length)
              for a, b in (_shard_range(builder, _EVAL, i, process_count)
                           for i in range(process_count))]
    if not max(counts):
      raise _no_text(config, _EVAL, 'its documents tokenize to nothing')
    num_batches = math.ceil(max(counts) / batch)
    limit = counts[process_index]
    token_batches = iter([docs[start:end]])
  return _eval_batches(config, vocab, _eval_chunks(token_batches, tokens_length),
                       limit, num_batches, batch, process_index)


def _eval_batches(config, vocab: tokenizer.Vocabulary,
                  chunks: Iterator[np.ndarray], limit: int, num_batches: int,
                  batch: int, process_index: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  text = config.text
  seed = _seed(config)
  index = 0
  for _ in range(num_batches):
    pairs = []
    while len(pairs) < batch and index < limit:
      chunk = next(chunks, None)
      if chunk is None:
        limit = index
        break
      rng = np.random.default_rng([seed, _EVAL_TAG, process_index, index])
      pairs.append(span_corruption.span_corrupt(
          chunk, rng, vocab_size=vocab.vocab_size,
          noise_density=text.noise_density,
          mean_noise_span_length=text.mean_noise_span_length,
          eos_id=vocab.eos_id))
      index += 1
    out = _batch(pairs, batch, text.inputs_length, text.targets_length)
    out['mask'] = (np.arange(batch) < len(pairs)).astype(np.float32)
    yield out
