"""Small prepared copies of public TFDS datasets, written by their real builders.

Offline tests cannot download GLUE, Wikipedia or WMT14. `tfds.testing.mock_data` (tfds
4.9.10) mocks `as_data_source` inside one process only, and with its default policy accepts
any split name and leaves the builder unprepared, so it can neither serve the CLI in a
subprocess nor show a missing split. Instead, the real builder class (its name, config,
version, features and split names) writes array_record files into a test data folder, with
only its download-and-parse step (`_split_generators`) replaced by the given examples, or by
TFDS's own mock-example generator. Readers then open the folder
exactly as they open a real prepared dataset.
"""

from __future__ import annotations

import random
from typing import Any, Sequence
from unittest import mock

import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from trainbig_jax.data import sources

WORDS = ('the river city king law army people paper music film night story house garden '
         'bridge school winter summer ocean mountain village market church station '
         'north south east west old new small great long short early late first last '
         'built opened named found moved wrote played ruled crossed joined left held '
         'and of in on with from by for to at').split()


def sentences(count: int, seed: int, words: int = 12) -> list[str]:
  """`count` pseudo-English sentences of a fixed word list (some structure to learn)."""
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(words)).capitalize() + '.'
          for _ in range(count)]


def prepare_copy(name: str, data_dir: str,
                 splits: dict[str, int | Sequence[dict[str, Any]]]) -> tfds.core.DatasetBuilder:
  """Prepares `name` in `data_dir` with the given examples per split (a count: TFDS mock
  examples of the builder's own features)."""
  builder = sources.tfds_builder(name, data_dir)

  def split_generators(self, dl_manager):
    del dl_manager
    out = {}
    for split, examples in splits.items():
      if isinstance(examples, int):
        examples = list(mocking.RandomFakeGenerator(self.info.features, examples))
      out[split] = ((f'{split}-{i}', ex) for i, ex in enumerate(examples))
    return out

  with mock.patch.object(type(builder), '_split_generators', split_generators):
    builder.download_and_prepare(file_format='array_record')
  return sources.prepare(name, data_dir)
