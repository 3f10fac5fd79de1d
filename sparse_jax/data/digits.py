"""`sklearn_digits`: the scikit-learn handwritten digits as a TFDS dataset.

The 1,797 8x8 digits ship inside scikit-learn, so this builder prepares fully
offline. Wrapping them as a TFDS builder means the small real dataset used for
quick experiments goes through exactly the same reading code
(`builder.as_dataset`, `tfds.even_splits`, ...) as imagenet2012.

Importing this module registers the builder under the name `sklearn_digits`.
"""

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

# The split is part of the dataset definition: changing either constant changes
# which examples are evaluated on, so it requires a new VERSION.
_SPLIT_SEED = 0
_NUM_TEST = 297

_CITATION = r"""
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}
@article{pedregosa2011scikit,
  author = {Pedregosa, F. and others},
  title = {Scikit-learn: Machine Learning in {P}ython},
  journal = {Journal of Machine Learning Research},
  volume = {12},
  pages = {2825--2830},
  year = {2011},
}
"""

_DESCRIPTION = """\
The test set of the UCI "Optical Recognition of Handwritten Digits" data as
shipped with scikit-learn (`sklearn.datasets.load_digits`): 1,797 real
handwritten digits from 43 writers, each a 32x32 bitmap downsampled to 8x8 by
counting ink pixels in 4x4 blocks (values 0..16). Here the values are rescaled
to 0..255 (rounded) and stored as 8x8x1 uint8 grayscale images, ink bright on a
black background.

Splits are fixed: a permutation of the 1,797 examples drawn with
`np.random.RandomState(0)`; its first 297 examples form `test`, the remaining
1,500 form `train`. No download is needed.
"""


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """8x8 handwritten digits from scikit-learn, with a fixed train/test split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs(): the latter looks for
    # metadata files beside the module by package name, which resolves to the wrong
    # directory when the current directory holds a folder named `sparse_jax`.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ships with scikit-learn.
    order = np.random.RandomState(_SPLIT_SEED).permutation(1797)
    return {
        'train': self._generate_examples(order[_NUM_TEST:]),
        'test': self._generate_examples(order[:_NUM_TEST]),
    }

  def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    # Imported here so that merely registering the builder stays cheap.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i in indices:
      # The index into the original data is a stable, unique key.
      yield int(i), {'image': images[i][..., None], 'label': int(digits.target[i])}
