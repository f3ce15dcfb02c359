"""Where datasets live and how any of them is opened: one TFDS array_record data source.

The embedded corpora are TFDS builders inside this package; they are prepared on first use
(seconds) into the data folder. Any other TFDS dataset must have been prepared there as
array_record beforehand (`tfds build --file_format=array_record`), and is opened the same way.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import tensorflow_datasets as tfds

# TFDS name -> 'module:Class' of the project's own builders for the embedded corpora.
EMBEDDED_BUILDERS = {
    'trainbig_sotu': 'trainbig_jax.data.sotu:SotuCorpus',
    'trainbig_rotten_tomatoes': 'trainbig_jax.data.rotten_tomatoes:RottenTomatoes',
    'trainbig_libreoffice_enfr': 'trainbig_jax.data.libreoffice_help:LibreOfficeHelpEnFr',
}


class DatasetError(ValueError):
  """A dataset named in a config cannot be opened."""


def default_data_dir() -> str:
  return os.environ.get('TRAINBIG_DATA_DIR',
                        str(Path.home() / '.cache' / 'trainbig_jax' / 'tfds'))


def _embedded_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  module_name, class_name = EMBEDDED_BUILDERS[name].split(':')
  builder_cls = getattr(importlib.import_module(module_name), class_name)
  return builder_cls(data_dir=data_dir, file_format='array_record')


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name`, preparing embedded corpora when needed."""
  data_dir = data_dir or default_data_dir()
  base = name.split('/')[0].split(':')[0]
  if base in EMBEDDED_BUILDERS:
    builder = _embedded_builder(base, data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(file_format='array_record')
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    raise DatasetError(
        f'Unknown dataset {name!r}: not an embedded corpus ({", ".join(EMBEDDED_BUILDERS)}) '
        f'nor a TFDS dataset ({type(e).__name__}).') from None
  if not builder.is_prepared():
    raise DatasetError(
        f'Dataset {name!r} is not prepared in {data_dir}; prepare it once with '
        f'`tfds build {name} --data_dir={data_dir} --file_format=array_record`.')
  return builder


def data_source(name: str, split: str, data_dir: str | None = None):
  """A random-access source (len, __getitem__) over one split, read through array_record."""
  builder = prepare(name, data_dir)
  if split not in builder.info.splits:
    raise DatasetError(f'Dataset {name!r} has no split {split!r}; it has: '
                       f'{", ".join(sorted(builder.info.splits))}.')
  return builder.as_data_source(split=split)
