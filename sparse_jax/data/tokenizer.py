"""SentencePiece vocabularies with T5's conventions.

T5 ids: pad 0, eos 1, unk 2, no bos; after the SentencePiece pieces come 100
"extra ids", the span-corruption sentinels, numbered down from the end: with
T5's 32,000-piece model `<extra_id_0>` is 32099 and `<extra_id_99>` 32000, and
the vocabulary has 32,100 ids (the model's embedding table is padded to 32,128).
"""

import io
import os
import uuid
from typing import Iterable, Sequence

import sentencepiece as spm
import tensorflow as tf

from sparse_jax.data import sources

EXTRA_IDS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_ROUND_TO = 128  # Embedding rows: a multiple of 128 tiles well on TPUs/GPUs.
_T5_MODEL = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
_PATH_FIX = (f'pass --config.text.vocabulary_path=... (T5\'s public model is '
             f'{_T5_MODEL}) or leave it empty to train one on the dataset')


class Vocabulary:
  """A SentencePiece model plus T5's 100 sentinel ids after its pieces."""

  def __init__(self, model_proto: bytes, path: str = ''):
    """Loads a serialized SentencePiece model.

    Args:
      model_proto: the bytes of a `.model` file.
      path: where they came from, for messages.

    Raises:
      RuntimeError: the bytes are not a SentencePiece model.
    """
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._num_pieces = self._sp.get_piece_size()

  @property
  def num_pieces(self) -> int:
    """Number of SentencePiece pieces (ids below this come from `encode`)."""
    return self._num_pieces

  @property
  def vocab_size(self) -> int:
    """Pieces plus sentinels: every id `encode` or span corruption emits."""
    return self._num_pieces + EXTRA_IDS

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_{i}>`, the sentinel of the i-th corrupted span."""
    if not 0 <= i < EXTRA_IDS:
      raise ValueError(f'Sentinel index {i} is not in [0, {EXTRA_IDS}).')
    return self.vocab_size - 1 - i

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without EOS; never produces sentinels."""
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`.

    Sentinels are rendered as `<extra_id_i>`; pad, eos and ids outside the
    vocabulary are dropped.
    """
    parts, run = [], []
    for i in ids:
      i = int(i)
      if 0 <= i < self._num_pieces:
        run.append(i)
      elif self._num_pieces <= i < self.vocab_size:
        parts.append(self._sp.decode(run))
        run = []
        parts.append(f'<extra_id_{self.vocab_size - 1 - i}>')
    parts.append(self._sp.decode(run))
    return ''.join(parts)

  def normalize(self, text: str) -> str:
    """`text` as SentencePiece normalizes it.

    That is what decode(encode(text)) gives when every character of `text` is
    in the vocabulary.
    """
    # SentencePiece writes spaces as U+2581 and adds one in front of the text.
    return self._sp.normalize(text).replace('\u2581', ' ').lstrip(' ')


def load_vocabulary(path: str) -> Vocabulary:
  """Loads a SentencePiece model from a local or `gs://` path.

  Args:
    path: the `.model` file.

  Returns:
    The vocabulary.

  Raises:
    ConfigError: the file is missing or unreadable, not a SentencePiece model,
      or its special ids differ from T5's (pad 0, eos 1).
  """
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      proto = f.read()
  except (tf.errors.OpError, OSError) as e:
    raise sources.error(
        f'Cannot read the SentencePiece vocabulary {path!r}: '
        f'{type(e).__name__}: {e}.', _PATH_FIX) from None
  try:
    vocab = Vocabulary(proto, path)
  except RuntimeError as e:
    raise sources.error(
        f'{path!r} is not a SentencePiece model ({e}).', _PATH_FIX) from None
  if (vocab.pad_id, vocab.eos_id) != (PAD_ID, EOS_ID):
    raise sources.error(
        f'The vocabulary {path!r} has pad id {vocab.pad_id} and eos id '
        f'{vocab.eos_id}; T5 models need pad 0 and eos 1.', _PATH_FIX)
  return vocab


def train_vocabulary(texts: Iterable[str], num_pieces: int,
                     model_path: str) -> Vocabulary:
  """Trains a unigram SentencePiece model with T5's special ids.

  Deterministic: the same texts give the same bytes, so processes sharing a
  path may all train and the last atomic write wins harmlessly.

  Args:
    texts: training documents, one "sentence" each.
    num_pieces: pieces in the model (the vocabulary adds 100 sentinels).
    model_path: where the `.model` file goes (local or `gs://`); written
      atomically, so a reader never sees a partial file.

  Returns:
    The trained vocabulary.

  Raises:
    ConfigError: the texts are empty or too small for `num_pieces` pieces.
  """
  model = io.BytesIO()
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model,
        model_type='unigram', vocab_size=num_pieces,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        # Every character of a small corpus, and whole paragraphs as sentences
        # (the default cap of 4192 bytes would silently skip long ones).
        character_coverage=1.0, max_sentence_length=1 << 20,
        input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=2, minloglevel=2)
  except RuntimeError as e:
    raise sources.error(
        f'Training a {num_pieces}-piece SentencePiece vocabulary failed: {e}',
        'pass a smaller --config.text.vocabulary_pieces (the corpus may be '
        'too small for this many pieces) or a trained model as '
        '--config.text.vocabulary_path') from None
  proto = model.getvalue()
  _write_atomically(model_path, proto)
  return Vocabulary(proto, model_path)


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  # A unique temporary name: several processes may write the same file.
  tmp = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}'
  with tf.io.gfile.GFile(tmp, 'wb') as f:
    f.write(data)
  if '://' in path:  # Object stores: no atomic rename, copy-then-delete.
    tf.io.gfile.rename(tmp, path, overwrite=True)
  else:
    os.replace(tmp, path)


def _round_up(vocab_size: int) -> int:
  return -(-vocab_size // _ROUND_TO) * _ROUND_TO


def model_vocab_size(vocab_size: int) -> int:
  """The model's embedding size for `vocab_size` ids: the next multiple of 128.

  T5: 32100 -> 32128.
  """
  return _round_up(vocab_size)


def check_model_vocab(model_vocab_size: int,  # pylint: disable=redefined-outer-name
                      vocab: Vocabulary) -> None:
  """Checks that the model's vocab_size fits the tokenizer.

  It must cover every id (pieces and sentinels) and be at most the next
  multiple of 128: a larger table would only hold rows never trained.

  Args:
    model_vocab_size: config.model.vocab_size.
    vocab: the tokenizer.

  Raises:
    ConfigError: naming the right value.
  """
  right = _round_up(vocab.vocab_size)
  if not vocab.vocab_size <= model_vocab_size <= right:
    raise sources.error(
        f'config.model.vocab_size={model_vocab_size} does not fit the '
        f'vocabulary {vocab.path!r}: {vocab.num_pieces} pieces + {EXTRA_IDS} '
        f'sentinels = {vocab.vocab_size} ids, which the model needs rounded up '
        f'to a multiple of {_ROUND_TO}.',
        f'pass --config.model.vocab_size={right}')
