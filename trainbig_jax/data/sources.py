"""Where datasets live and how any of them is opened: one TFDS array_record data source.

Three kinds of dataset name, all read the same way (`data_source`):
  * the embedded corpora (EMBEDDED_BUILDERS), prepared on first use (seconds);
  * the user's own files, `files:GLOB` / `parallel:...` (see data/user_files.py), prepared on
    first use into the data folder;
  * any TFDS dataset (`glue/mnli`, `wikipedia/20230601.en`, `wmt14_translate/fr-en`, ...),
    prepared once with `trainbig prepare --dataset=NAME` (downloads) and then only read, so
    many processes can read one shared folder or mounted bucket.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import functools
import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from trainbig_jax.data import user_files

# TFDS name -> 'module:Class' of the project's own builders for the embedded corpora.
EMBEDDED_BUILDERS = {
    'trainbig_sotu': 'trainbig_jax.data.sotu:SotuCorpus',
    'trainbig_rotten_tomatoes': 'trainbig_jax.data.rotten_tomatoes:RottenTomatoes',
    'trainbig_libreoffice_enfr': 'trainbig_jax.data.libreoffice_help:LibreOfficeHelpEnFr',
}

# TFDS registers a builder when its module is imported; the TensorFlow-free install imports
# only the datasets/ folder, so these packages (which import their builders) are loaded first.
_TFDS_BUILDER_PACKAGES = (
    'audio', 'graphs', 'image', 'image_classification', 'object_detection', 'nearest_neighbors',
    'question_answering', 'd4rl', 'ranking', 'recommendation', 'rl_unplugged', 'robotics',
    'robomimic', 'structured', 'summarization', 'text', 'text_simplification', 'time_series',
    'translate', 'video', 'vision_language')

# Modules some TFDS builders need to prepare (not to read) -> the pyproject extra with them.
EXTRA_OF_MODULE = {
    'apache_beam': 'wikipedia', 'mwparserfromhell': 'wikipedia', 'mwxml': 'wikipedia',
    'tensorflow': 'tensorflow',
}
# Names in `tfds.core.lazy_imports` that differ from the module they import.
_LAZY_IMPORT_MODULES = {'PIL_Image': 'PIL', 'gcsfs_store': 'gcsfs', 'envlogger': 'envlogger'}
# Modules whose PyPI package has another name.
_PIP_NAMES = {'PIL': 'pillow', 'cv2': 'opencv-python', 'bs4': 'beautifulsoup4',
              'skimage': 'scikit-image', 'sklearn': 'scikit-learn'}


class DatasetError(ValueError):
  """A dataset named in a config cannot be opened."""


class MissingExtraError(DatasetError):
  """Preparing a dataset needs packages that are not installed."""


def default_data_dir() -> str:
  return os.environ.get('TRAINBIG_DATA_DIR',
                        str(Path.home() / '.cache' / 'trainbig_jax' / 'tfds'))


def _embedded_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  module_name, class_name = EMBEDDED_BUILDERS[name].split(':')
  builder_cls = getattr(importlib.import_module(module_name), class_name)
  return builder_cls(data_dir=data_dir, file_format='array_record')


@functools.cache
def register_tfds_builders() -> None:
  """Imports the TFDS packages whose import registers the classic builders (glue, ...)."""
  for package in _TFDS_BUILDER_PACKAGES:
    try:
      importlib.import_module(f'tensorflow_datasets.{package}')
    except ImportError:  # a package whose builders need an uninstalled module (h5py, ...)
      pass


def _closest(word: str, choices: list[str]) -> str:
  close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
  return f'; did you mean {", ".join(close)}?' if close else '.'


def tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name` (prepared or not); one line with the closest names if unknown."""
  register_tfds_builders()
  base, _, config = name.split(':')[0].partition('/')
  names = sorted(set(tfds.list_builders(with_community_datasets=False)) | set(EMBEDDED_BUILDERS))
  if base not in names:
    raise DatasetError(f'Unknown dataset {name!r}{_closest(base, names)}')
  config = config.split('/')[0]
  configs = list(tfds.builder_cls(base).builder_configs)
  if config and configs and config not in configs:
    raise DatasetError(f'Dataset {base!r} has no config {config!r}{_closest(config, configs)}')
  try:
    return tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # tfds raises several types for bad versions and configs
    raise DatasetError(f'Cannot open dataset {name!r}: {str(e).splitlines()[0]}') from None


def required_modules(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Modules the builder's code imports lazily to prepare the data (TensorFlow included)."""
  module = inspect.getmodule(type(builder))
  modules = [module]
  # Builders often keep their parsing in a sibling module (c4 -> c4_utils, wmt14 -> wmt).
  for other in list(vars(module).values()):
    if inspect.ismodule(other) and other.__name__.startswith('tensorflow_datasets.') and (
        '.core' not in other.__name__ and 'public_api' not in other.__name__):
      modules.append(other)
  needed = set()
  if isinstance(builder, tfds.core.BeamBasedBuilder):
    needed.add('apache_beam')
  for mod in modules:
    try:
      source = inspect.getsource(mod)
    except (OSError, TypeError):
      continue
    needed.update(_LAZY_IMPORT_MODULES.get(n, n)
                  for n in re.findall(r'lazy_imports\.(\w+)', source))
    if re.search(r'lazy_imports_utils import tensorflow\b|^import tensorflow\b', source, re.M):
      needed.add('tensorflow')
  return sorted(needed)


def check_prepare_requirements(name: str, builder: tfds.core.DatasetBuilder) -> None:
  """One line naming the extra to install when preparing `name` needs missing packages."""
  missing = [m for m in required_modules(builder) if importlib.util.find_spec(m) is None]
  if not missing:
    return
  extras = {EXTRA_OF_MODULE[m] for m in missing if m in EXTRA_OF_MODULE}
  others = [_PIP_NAMES.get(m, m) for m in missing if m not in EXTRA_OF_MODULE]
  commands = []
  if extras:  # one extra when it covers the need; 'prepare' holds every extra's packages
    extra = extras.pop() if len(extras) == 1 else 'prepare'
    commands.append(f"pip install 'trainbig_jax[{extra}]'")
  if others:
    commands.append(f'pip install {" ".join(others)}')
  raise MissingExtraError(f'Preparing {name!r} needs {", ".join(missing)}, not installed; '
                          f'install with: {" && ".join(commands)}.')


@contextlib.contextmanager
def _prepare_lock(data_dir: str, key: str) -> Iterator[None]:
  """Serializes preparation of one dataset between processes sharing a data folder."""
  Path(data_dir).mkdir(parents=True, exist_ok=True)
  with open(Path(data_dir) / f'.{key.replace("/", "_")}.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _open_local(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builder of an embedded corpus or the user's files, prepared if needed (no network)."""
  if user_files.is_user_files_name(name):
    builder = user_files.builder(name, data_dir)
    if not builder.is_prepared():  # (a prepared folder may be read-only: lock only to write)
      with _prepare_lock(data_dir, user_files.BUILDER_NAME):
        builder = user_files.builder(name, data_dir)
        if not builder.is_prepared():
          builder.download_and_prepare(file_format='array_record')
          builder = user_files.builder(name, data_dir)
    return builder
  base = name.split('/')[0].split(':')[0]
  builder = _embedded_builder(base, data_dir)
  if not builder.is_prepared():
    with _prepare_lock(data_dir, base):
      builder = _embedded_builder(base, data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare(file_format='array_record')
  return builder


def _is_local(name: str) -> bool:
  return (user_files.is_user_files_name(name)
          or name.split('/')[0].split(':')[0] in EMBEDDED_BUILDERS)


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of dataset `name`.

  Embedded corpora and the user's files are prepared here when needed; a TFDS dataset that
  is not prepared yet is an error naming the `trainbig prepare` command that downloads it.
  """
  data_dir = data_dir or default_data_dir()
  if _is_local(name):
    return _open_local(name, data_dir)
  builder = tfds_builder(name, data_dir)
  if not builder.is_prepared():
    raise DatasetError(
        f'Dataset {name!r} is not prepared in {data_dir}; prepare it once with '
        f'`trainbig prepare --dataset={name} --data_dir={data_dir}`.')
  return builder


def download_and_prepare(names: Sequence[str], data_dir: str | None = None
                         ) -> list[tfds.core.DatasetBuilder]:
  """`trainbig prepare`: downloads (TFDS datasets) and writes each of `names` as array_record.

  Every name is resolved and every missing package reported before anything is downloaded.
  Interrupted runs resume from the downloads already finished (TFDS keeps them in
  DATA_DIR/downloads); a split's array_record files are written to a temporary folder and
  moved into place when complete, so a reader never sees half a dataset.
  """
  data_dir = data_dir or default_data_dir()
  pending = {}
  for name in names:
    if not _is_local(name):
      builder = tfds_builder(name, data_dir)
      if not builder.is_prepared():
        check_prepare_requirements(name, builder)
        pending[name] = builder
  tfds.display_progress_bar(True)
  prepared = []
  for name in names:
    if _is_local(name):
      prepared.append(_open_local(name, data_dir))
      continue
    if name in pending:
      with _prepare_lock(data_dir, name):
        builder = tfds_builder(name, data_dir)
        if not builder.is_prepared():
          builder.download_and_prepare(file_format='array_record')
    prepared.append(tfds_builder(name, data_dir))
  return prepared


def split_names(split: str) -> list[str]:
  """The named splits of a TFDS split expression: 'train[:1%]+validation' -> train, validation."""
  return [part.split('[')[0].strip() for part in split.split('+')]


def data_source(name: str, split: str, data_dir: str | None = None):
  """A random-access source (len, __getitem__) over one split, read through array_record.

  `split` may be a TFDS split expression ('train[:10000]', 'train[1%:]') when the dataset has
  no held-out split of its own (Wikipedia has only 'train').
  """
  builder = prepare(name, data_dir)
  for base in split_names(split):
    if base not in builder.info.splits:
      raise DatasetError(f'Dataset {name!r} has no split {base!r}; it has: '
                         f'{", ".join(sorted(builder.info.splits))}.')
  return builder.as_data_source(split=split)
