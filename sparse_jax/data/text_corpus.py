"""`python_reference_text`: English prose from the Python docs, as a TFDS dataset.

Python ships the help topics of its Language Reference (`pydoc_data.topics`,
79 topics, ~465 KB of plain text, what `help('assignment')` prints). Their
prose paragraphs make a small, real English corpus that prepares fully
offline, so quick T5 experiments and the tests read text through exactly the
same TFDS code (`builder.as_dataset`, `tfds.even_splits`, split slicing) as C4.

Importing this module registers the builder under the name
`python_reference_text`.
"""

import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

# The split is part of the dataset definition: changing the seed, the share or
# the paragraph rules changes which documents are evaluated on, so it requires a
# new VERSION.
_SPLIT_SEED = 0
_VALIDATION_SHARE = 0.1
_MIN_WORDS = 8

# A list item's marker: "* ", "- ", "1. ", "(a) ".
_BULLET = re.compile(r'^(?:[*+-]|\d+\.|\([a-z0-9]\))\s+')
# Section underlines, table rules and grid-table rows: "=====", "+----+---+".
_RULE = re.compile(r'^[=\-~^*+|\s]{3,}$|^[+|].*[+|]$')
# A whitespace-separated token that reads as an English word, punctuation and
# quotes included: "Return", "(default", "one)", “informal”.
_PROSE_TOKEN = re.compile(
    r"""[(“"‘']*[A-Za-z][a-z]*(?:[-’'][a-z]+)*[)”"’']*[.,;:!?)]*""")
_SENTENCE_END = re.compile(r'[.:?!][)”"’]?$')

_CITATION = r"""
@manual{python_reference,
  author = {{Python Software Foundation}},
  title = {The {P}ython Language Reference},
  howpublished = {\url{https://docs.python.org/3/reference/}},
  note = {Shipped with CPython as \texttt{pydoc\_data.topics}; PSF License},
}
"""

_DESCRIPTION = """\
English prose paragraphs of the Python Language Reference help topics that
ship with CPython (`pydoc_data.topics.topics`, the text `help('TOPIC')` shows;
PSF License). No download is needed.

Each topic is split into paragraphs at blank lines; wrapped lines are joined
with single spaces and list markers are dropped. Code and grammar are left
out: indented paragraphs that do not read as prose (mostly non-word tokens,
no sentence end, or nested indentation, as literal code blocks have), grammar
rules (`::=`), interactive sessions (`>>>`), tables and headings, signatures
(fewer than half of the tokens are words), and every paragraph of fewer than
8 words. Paragraphs repeated across topics are kept
once. Each document is one paragraph, in the feature `text`.

Splits are fixed: a permutation of all distinct paragraphs (in sorted topic
order) drawn with `np.random.RandomState(0)`; its first 10% (rounded) form
`validation`, the rest `train`. With Python 3.11.7 this gives 1,106 train
documents (38,415 words, 243,330 UTF-8 bytes) and 123 validation documents
(4,305 words, 27,122 bytes); other Python releases ship slightly different
topics, so the exact text depends on the Python that prepares the dataset.
"""


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(' '))


def _is_code(lines: list[str]) -> bool:
  """Whether a paragraph is grammar, an example session or a table."""
  return any('::=' in line or line.lstrip().startswith(('>>>', '... '))
             or _RULE.match(line.strip()) for line in lines)


def _word_share(text: str) -> tuple[int, float]:
  """(number of tokens that read as words, their share of all tokens)."""
  tokens = text.split()
  words = sum(bool(_PROSE_TOKEN.fullmatch(t)) for t in tokens)
  return words, words / max(1, len(tokens))


def _reads_as_prose(lines: list[str], text: str) -> bool:
  """Whether an indented paragraph is a description rather than a code block.

  Code has few plain words, rarely ends a sentence, and has nested indentation.
  """
  return (_word_share(text)[1] >= 0.75
          and _SENTENCE_END.search(text) is not None
          and len({_indent(line) for line in lines[1:]}) <= 1)


def paragraphs(topic: str) -> list[str]:
  """The prose paragraphs of one help topic, each joined into one line.

  Literal blocks are the hard part: pydoc renders them indented by 3 spaces
  more than the surrounding text, but prose is indented too: inside list items
  ("* " plus 2), notes ("Note:" plus 2), definition bodies (a term line
  directly followed by its text indented by 3) and method descriptions (a
  signature line, a blank line, then the text indented by 3). A paragraph that
  starts where prose currently lives is kept; any other indented one only if
  it reads as prose (`_reads_as_prose`).

  Args:
    topic: text of one entry of `pydoc_data.topics.topics`.

  Returns:
    The paragraphs kept as documents, in order.
  """
  blocks = re.split(r'\n[ \t]*\n', topic.expandtabs())
  out = []
  prose = [0]  # Indentations at which prose paragraphs may start here.
  for block in blocks:
    lines = [line.rstrip() for line in block.split('\n') if line.strip()]
    if not lines:
      continue
    first = _indent(lines[0])
    bullet = _BULLET.match(lines[0].lstrip())
    is_prose = first in prose
    if is_prose:  # Deeper prose levels (nested items, notes) have ended.
      prose = [i for i in prose if i <= first]
      if bullet:  # The item's text and its later paragraphs are indented more.
        prose.append(first + bullet.end())
      elif len(lines) == 1 and lines[0].endswith(':') and len(
          lines[0].split()) <= 3:  # "Note:", "See also:" headers.
        prose.append(first + 2)
      elif len(lines) > 1 and _indent(lines[1]) > first:  # Definition list.
        prose.append(_indent(lines[1]))
    text = ' '.join(line.strip() for line in lines)
    if _is_code(lines) or not (is_prose or _reads_as_prose(lines, text)):
      continue
    if bullet:
      text = text[bullet.end():]
    words, share = _word_share(text)
    # Signatures ("object.__lt__(self, other) ...") are mostly non-words.
    if words >= _MIN_WORDS and share >= 0.5:
      out.append(text)
  return out


def documents() -> list[str]:
  """All documents, in sorted topic order, before the train/validation split."""
  # Imported here so that merely registering the builder stays cheap.
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  docs = [p for name in sorted(topics.topics)
          for p in paragraphs(topics.topics[name])]
  # Some paragraphs repeat across topics; one copy keeps validation unseen.
  return list(dict.fromkeys(docs))


class PythonReferenceText(tfds.core.GeneratorBasedBuilder):
  """Prose paragraphs of the Python Language Reference help topics."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs(): see digits.py.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage='https://docs.python.org/3/reference/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The text ships with Python.
    docs = documents()
    order = np.random.RandomState(_SPLIT_SEED).permutation(len(docs))
    num_validation = int(round(len(docs) * _VALIDATION_SHARE))
    return {
        'train': self._generate_examples(docs, order[num_validation:]),
        'validation': self._generate_examples(docs, order[:num_validation]),
    }

  def _generate_examples(self, docs: list[str],
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in indices:
      # The paragraph's index in `documents()` is a stable, unique key.
      yield int(i), {'text': docs[i]}
