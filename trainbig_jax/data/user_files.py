"""The user's own corpus as a TFDS dataset: text, JSON lines, Parquet, CSV/TSV, parallel text.

Dataset names (anywhere a config names a dataset, and in `trainbig prepare`):

  files:GLOB[?label=COLUMN]     one format per glob, chosen by the file extension:
      .txt (any other extension too)  one example per non-empty line, feature 'text'
      .jsonl / .json                  one example per JSON object line, its fields as features
      .parquet                        one example per row, its columns as features
      .csv / .tsv                     one example per row after the header row
    String, integer and float fields become Text, int64 and float32 features; other types are
    left out. The label column ('label' unless `?label=` names another) becomes a ClassLabel:
    its values are class indices when they are all integers >= 0, else class names (sorted).
  parallel:SRC_FILE,TGT_FILE[?langs=en,fr]   two line-aligned files, one sentence per line
  parallel:GLOB.tsv[?langs=en,fr]            'source<TAB>target' lines
    Features are named by language code (default 'en' and 'fr', as TFDS wmt14_translate/fr-en);
    for two files whose extensions are language codes (train.en, train.fr) those are used.

Splits: every HOLDOUT_EVERY-th example (counting across the files in sorted path order,
starting with the first) is in 'validation', the rest in 'train'.

A name is prepared once into DATA_DIR/trainbig_files/<key>/, where key = hash of the name
with its options + hash of the file set (paths, sizes, modification times): different globs
never share a folder, and a changed file set is prepared anew (with a warning naming the
older copy) instead of being read stale.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

FILES_PREFIX = 'files:'
PARALLEL_PREFIX = 'parallel:'
BUILDER_NAME = 'trainbig_files'
HOLDOUT_EVERY = 20
DEFAULT_LANGS = ('en', 'fr')
_TEXT_EXTS = ('.txt',)
_JSON_EXTS = ('.jsonl', '.json')
_PARQUET_EXTS = ('.parquet',)
_CSV_DELIMITERS = {'.csv': ',', '.tsv': '\t'}
_LANG_CODE = re.compile(r'^[a-z]{2,3}$')


class UserFilesError(ValueError):
  """A files:/parallel: dataset name names no usable files."""


def is_user_files_name(name: str) -> bool:
  return name.startswith((FILES_PREFIX, PARALLEL_PREFIX))


@dataclasses.dataclass(frozen=True)
class FilesSpec:
  """What a files:/parallel: name says: the kind, the files (sorted) and the options."""

  name: str
  kind: str  # 'text' | 'json' | 'parquet' | 'csv' | 'parallel_files' | 'parallel_tsv'
  paths: tuple[str, ...]
  label: str = 'label'
  langs: tuple[str, str] = DEFAULT_LANGS

  def manifest(self) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file: what decides that the file set changed."""
    out = []
    for path in self.paths:
      st = os.stat(path)
      out.append((path, st.st_size, st.st_mtime_ns))
    return out

  @property
  def name_key(self) -> str:
    options = json.dumps([self.kind, self.name.split('?')[0], self.label, self.langs])
    return hashlib.sha256(options.encode()).hexdigest()[:12]

  def key(self) -> str:
    files = hashlib.sha256(json.dumps(self.manifest()).encode()).hexdigest()[:12]
    return f'n{self.name_key}_f{files}'


def _options(query: str, name: str) -> dict[str, str]:
  options = {}
  for part in filter(None, query.split('&')):
    key, sep, value = part.partition('=')
    if not sep or key not in ('label', 'langs', 'text'):
      raise UserFilesError(f'Bad option {part!r} in dataset {name!r}; allowed: label=COLUMN, '
                           'text=COLUMN[,COLUMN], langs=SRC,TGT.')
    options[key] = value
  return options


def _glob(pattern: str, name: str) -> list[str]:
  paths = sorted(str(Path(p).absolute()) for p in glob.glob(os.path.expanduser(pattern),
                                                            recursive=True))
  paths = [p for p in paths if os.path.isfile(p)]
  if not paths:
    raise UserFilesError(f'Dataset {name!r}: no file matches {pattern!r}.')
  return paths


def _format_of(path: str) -> str:
  ext = Path(path).suffix.lower()
  if ext in _JSON_EXTS:
    return 'json'
  if ext in _PARQUET_EXTS:
    return 'parquet'
  if ext in _CSV_DELIMITERS:
    return 'csv'
  return 'text'


def parse_name(name: str) -> FilesSpec:
  """The spec of a files:/parallel: dataset name; one error line when it names no files."""
  body, _, query = name.partition('?')
  options = _options(query, name)
  if name.startswith(PARALLEL_PREFIX):
    target = body[len(PARALLEL_PREFIX):]
    if ',' in target:
      parts = target.split(',')
      if len(parts) != 2:
        raise UserFilesError(f'Dataset {name!r}: give two aligned files, SRC_FILE,TGT_FILE.')
      paths = tuple(_glob(p, name)[0] for p in parts)
      exts = tuple(Path(p).suffix.lstrip('.').lower() for p in paths)
      langs = exts if all(_LANG_CODE.match(e) for e in exts) and exts[0] != exts[1] else None
      kind = 'parallel_files'
    else:
      paths, langs, kind = tuple(_glob(target, name)), None, 'parallel_tsv'
    if 'langs' in options:
      langs = tuple(options['langs'].split(','))
      if len(langs) != 2 or langs[0] == langs[1] or not all(langs):
        raise UserFilesError(f'Dataset {name!r}: langs={options["langs"]!r} must be two '
                             'different language codes, e.g. langs=en,fr.')
    return FilesSpec(name, kind, paths, langs=langs or DEFAULT_LANGS)
  if not name.startswith(FILES_PREFIX):
    raise UserFilesError(f'{name!r} is not a {FILES_PREFIX} or {PARALLEL_PREFIX} dataset name.')
  paths = _glob(body[len(FILES_PREFIX):], name)
  formats = sorted({_format_of(p) for p in paths})
  if len(formats) > 1:
    raise UserFilesError(f'Dataset {name!r} mixes file formats ({", ".join(formats)}); give '
                         'one glob per format.')
  return FilesSpec(name, formats[0], tuple(paths), label=options.get('label', 'label'))


def text_columns_option(name: str) -> tuple[str, ...] | None:
  """The `text=` option of a files: name (the text columns of a classification task)."""
  options = _options(name.partition('?')[2], name)
  return tuple(options['text'].split(',')) if 'text' in options else None


# ---------------------------------------------------------------------------------------
# Reading records, in file order; each yields (key, record dict).

def _read_text(path: str) -> Iterator[dict[str, Any]]:
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.strip()
      if line:
        yield {'text': line}


def _read_json(path: str) -> Iterator[dict[str, Any]]:
  # Streamed, and strict on every line: unlike files.read_jsonl (run logs, whose torn last
  # line is dropped), a corpus may be large and a bad last line is the user's data.
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserFilesError(f'{path}:{number} is not a JSON object line ({e.msg}).') from None
      if not isinstance(record, dict):
        raise UserFilesError(f'{path}:{number} is a JSON {type(record).__name__}, not an object.')
      yield record


def _read_parquet(path: str) -> Iterator[dict[str, Any]]:
  import pyarrow.parquet as pq  # a tfds dependency; imported only for Parquet files
  for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
    yield from batch.to_pylist()


def _read_csv(path: str) -> Iterator[dict[str, Any]]:
  delimiter = _CSV_DELIMITERS[Path(path).suffix.lower()]
  with open(path, encoding='utf-8', newline='') as f:
    yield from csv.DictReader(f, delimiter=delimiter)


def _read_parallel_tsv(path: str, langs: tuple[str, str]) -> Iterator[dict[str, Any]]:
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      parts = line.split('\t')
      if len(parts) != 2:
        raise UserFilesError(f'{path}:{number} has {len(parts)} tab-separated fields; a '
                             'parallel TSV line is source<TAB>target.')
      yield dict(zip(langs, (parts[0].strip(), parts[1].strip())))


def _read_parallel_files(paths: tuple[str, ...], langs: tuple[str, str]
                         ) -> Iterator[dict[str, Any]]:
  with open(paths[0], encoding='utf-8') as src, open(paths[1], encoding='utf-8') as tgt:
    for number, (a, b) in enumerate(itertools.zip_longest(src, tgt), 1):
      if a is None or b is None:
        raise UserFilesError(f'{paths[0]} and {paths[1]} are not line-aligned: '
                             f'{paths[1] if a is None else paths[0]} has more lines (the other '
                             f'ends after line {number - 1}).')
      if a.strip() or b.strip():
        yield {langs[0]: a.strip(), langs[1]: b.strip()}


def read_records(spec: FilesSpec) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, record) of every example of `spec`, in sorted-file order."""
  if spec.kind == 'parallel_files':
    try:
      for i, record in enumerate(_read_parallel_files(spec.paths, spec.langs)):
        yield f'{i}', record
    except UnicodeDecodeError:
      raise _not_utf8(*spec.paths) from None
    return
  for path in spec.paths:
    if spec.kind == 'parallel_tsv':
      records = _read_parallel_tsv(path, spec.langs)
    else:
      records = {'text': _read_text, 'json': _read_json, 'parquet': _read_parquet,
                 'csv': _read_csv}[spec.kind](path)
    try:
      for i, record in enumerate(records):
        yield f'{path}:{i}', record
    except UnicodeDecodeError:
      raise _not_utf8(path) from None


def _not_utf8(*paths: str) -> UserFilesError:
  """The error for text that failed to decode: the first of `paths` with a line that is not
  UTF-8, by line number (the decoder's own position counts from a read buffer, not the file)."""
  for path in paths:
    with open(path, 'rb') as f:
      for number, line in enumerate(f, 1):
        try:
          line.decode('utf-8')
        except UnicodeDecodeError as e:
          return UserFilesError(
              f'{path}:{number} is not UTF-8 text (byte 0x{line[e.start]:02x} at column '
              f'{e.start + 1}); convert the file to UTF-8, e.g. with iconv.')
  return UserFilesError(f'{", ".join(paths)}: not UTF-8 text; convert to UTF-8, e.g. with '
                        'iconv.')


# ---------------------------------------------------------------------------------------
# Features, inferred once before preparing.

def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _label_feature(values: list[Any], spec: FilesSpec) -> tfds.features.ClassLabel:
  if not values:
    raise UserFilesError(f'Dataset {spec.name!r} has no values in label column {spec.label!r}.')
  as_ints = []
  for v in values:
    if _is_int(v) or (isinstance(v, str) and v.strip().isdigit()):
      as_ints.append(int(v))
    else:
      break
  if len(as_ints) == len(values):
    return tfds.features.ClassLabel(num_classes=max(as_ints) + 1)
  return tfds.features.ClassLabel(names=sorted({str(v).strip() for v in values}))


def infer_features(spec: FilesSpec) -> dict[str, Any]:
  """Feature name -> TFDS feature, from the first record (and every label value)."""
  if spec.kind.startswith('parallel'):
    return {lang: tfds.features.Text() for lang in spec.langs}
  records = read_records(spec)
  first = next(records, None)
  if first is None:
    raise UserFilesError(f'Dataset {spec.name!r}: its {len(spec.paths)} file(s) hold no '
                         'examples.')
  features: dict[str, Any] = {}
  for column, value in first[1].items():
    if column == spec.label:
      continue
    if isinstance(value, str):
      features[column] = tfds.features.Text()
    elif _is_int(value) or isinstance(value, bool):
      features[column] = tfds.features.Scalar(dtype=np.int64)
    elif isinstance(value, float):
      features[column] = tfds.features.Scalar(dtype=np.float32)
  if spec.label in first[1]:
    labels = [first[1][spec.label]] + [r.get(spec.label) for _, r in records]
    features[spec.label] = _label_feature([v for v in labels if v is not None], spec)
  if not features:
    raise UserFilesError(f'Dataset {spec.name!r}: its first record has no text, integer or '
                         f'float field ({", ".join(first[1]) or "no fields"}).')
  return features


def _encode_record(record: dict[str, Any], features: dict[str, Any],
                   spec: FilesSpec) -> dict[str, Any]:
  out = {}
  for column, feature in features.items():
    value = record.get(column)
    if isinstance(feature, tfds.features.ClassLabel):
      if value is None:
        raise UserFilesError(f'Dataset {spec.name!r}: a record has no {column!r} value.')
      value = int(value) if feature.names == [str(i) for i in range(feature.num_classes)] \
          else str(value).strip()
    elif isinstance(feature, tfds.features.Text):
      value = '' if value is None else str(value)
    elif value is None:
      value = -1 if feature.dtype == np.int64 else float('nan')
    out[column] = value
  return out


class UserFilesConfig(tfds.core.BuilderConfig):
  """One files:/parallel: name: its spec and the features inferred from it."""

  def __init__(self, *, spec: FilesSpec, features: dict[str, Any]):
    super().__init__(name=spec.key(), version='1.0.0',
                     description=f'Prepared from {spec.name!r} ({len(spec.paths)} files).')
    self.spec = spec
    self.features = features


class UserFiles(tfds.core.GeneratorBasedBuilder):
  """The user's files, one example per line/record/row; see the module docstring."""

  name = BUILDER_NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Text, JSON lines, Parquet, CSV/TSV and parallel text.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # see sotu.SotuCorpus.code_path

  def _info(self) -> tfds.core.DatasetInfo:
    config: UserFilesConfig = self.builder_config
    return self.dataset_info_from_configs(
        description=f'{config.description} Files: {", ".join(config.spec.paths[:20])}'
                    f'{" ..." if len(config.spec.paths) > 20 else ""}',
        features=tfds.features.FeaturesDict(config.features),
        metadata=tfds.core.MetadataDict(source=config.spec.name,
                                        manifest=config.spec.manifest()),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # the files are local
    return {'train': self._generate_examples(holdout=False),
            'validation': self._generate_examples(holdout=True)}

  def _generate_examples(self, holdout: bool) -> Iterator[tuple[str, dict]]:
    config: UserFilesConfig = self.builder_config
    for index, (key, record) in enumerate(read_records(config.spec)):
      if (index % HOLDOUT_EVERY == 0) == holdout:
        yield key, _encode_record(record, config.features, config.spec)


def builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of a files:/parallel: name: the prepared copy if it is current, else a new
  UserFiles builder (call download_and_prepare on it)."""
  spec = parse_name(name)
  root = Path(data_dir) / BUILDER_NAME
  folder = root / spec.key() / '1.0.0'
  if (folder / 'dataset_info.json').exists():
    return tfds.builder_from_directory(str(folder))
  older = sorted(p.name for p in root.glob(f'n{spec.name_key}_f*') if p.is_dir())
  if older:
    logging.warning('The files of %s changed since they were prepared into %s; preparing them '
                    'anew (the older copy may be deleted).', name, root / older[-1])
  return UserFiles(config=UserFilesConfig(spec=spec, features=infer_features(spec)),
                   data_dir=data_dir, file_format='array_record')
