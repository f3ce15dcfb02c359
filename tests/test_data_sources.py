"""Dataset names and preparation: TFDS names, the user's files, parallel text, start checks.

Data only (no model): every test here takes a second or less after the imports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.tfds_fixtures import WORDS, prepare_copy, sentences
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.data import checks, classification, mlm, sources, user_files
from trainbig_jax.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  lines = iter(sentences(400, seed=0) + [' '.join(WORDS)])
  return train_tokenizer(lines, 120, tmp_path_factory.mktemp('tok') / 'tokenizer.model')


@pytest.fixture
def data_dir(tmp_path):
  return str(tmp_path / 'tfds')


def cli(*args, data_dir=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  if data_dir:
    env['TRAINBIG_DATA_DIR'] = data_dir
  return subprocess.run([sys.executable, '-m', 'trainbig_jax.cli', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.startswith('trainbig: error:')]
  assert len(lines) == 1, stderr
  return lines[0]


# ------------------------------------------------------------------------ TFDS names


@pytest.mark.parametrize('name, features', [
    ('glue/sst2', {'sentence', 'label', 'idx'}),
    ('glue/mnli', {'premise', 'hypothesis', 'label', 'idx'}),
    ('wikipedia/20230601.en', {'text', 'title'}),
    ('wmt14_translate/fr-en', {'en', 'fr'}),
    ('c4/en', {'text', 'url', 'timestamp', 'content-length', 'content-type'}),
])
def test_paper_datasets_resolve_without_tensorflow(name, features, data_dir):
  builder = sources.tfds_builder(name, data_dir)
  assert set(builder.info.features) == features
  assert not builder.is_prepared()


@pytest.mark.parametrize('name, suggestion', [
    ('wikipeda/20230601.en', 'wikipedia'),
    ('glue/mnlii', 'mnli'),
    ('wmt14_translat/fr-en', 'wmt14_translate'),
])
def test_misspelled_names_get_the_closest_names(name, suggestion, data_dir):
  with pytest.raises(sources.DatasetError, match=f'did you mean .*{suggestion}') as e:
    sources.tfds_builder(name, data_dir)
  assert '\n' not in str(e.value)


def test_unprepared_dataset_names_trainbig_prepare(data_dir):
  with pytest.raises(sources.DatasetError) as e:
    sources.data_source('glue/sst2', 'train', data_dir)
  assert str(e.value) == (f"Dataset 'glue/sst2' is not prepared in {data_dir}; prepare it once "
                          f"with `trainbig prepare --dataset=glue/sst2 --data_dir={data_dir}`.")


def test_missing_extra_is_one_line_before_any_download(data_dir):
  """Wikipedia is an Apache Beam builder: its extra is named before anything is fetched."""
  result = cli('prepare', '--dataset=wikipedia/20230601.en', f'--data_dir={data_dir}')
  assert result.returncode == 2
  line = one_error_line(result.stderr)
  assert 'apache_beam' in line and "pip install 'trainbig_jax[wikipedia]'" in line
  assert not (Path(data_dir) / 'downloads').exists()
  assert not list(Path(data_dir).glob('wikipedia/*/*/*.array_record*'))


def test_required_modules_name_what_builders_import_lazily(data_dir):
  assert sources.required_modules(sources.tfds_builder('wikipedia/20230601.en', data_dir)) == [
      'apache_beam', 'mwparserfromhell', 'mwxml']
  assert sources.required_modules(sources.tfds_builder('glue/sst2', data_dir)) == []
  assert sources.required_modules(sources.tfds_builder('wmt14_translate/fr-en', data_dir)) == []
  assert 'tensorflow' in sources.required_modules(sources.tfds_builder('pg19', data_dir))


def test_wmt14_copy_yields_aligned_pairs(data_dir):
  pairs = [{'en': f'the house number {i}', 'fr': f'la maison numero {i}'} for i in range(30)]
  prepare_copy('wmt14_translate/fr-en', data_dir, {'train': pairs, 'validation': pairs[:5]})
  source = sources.data_source('wmt14_translate/fr-en', 'train', data_dir)
  got = [source[i] for i in range(len(source))]
  assert len(got) == 30
  for ex in got:
    number = ex['en'].decode().split()[-1]
    assert ex['fr'].decode() == f'la maison numero {number}'
  assert sorted(ex['en'].decode() for ex in got) == sorted(p['en'] for p in pairs)


def test_missing_split_is_one_line(data_dir):
  prepare_copy('wikipedia/20230601.en', data_dir, {'train': 5})
  with pytest.raises(sources.DatasetError) as e:
    sources.data_source('wikipedia/20230601.en', 'validation', data_dir)
  assert str(e.value) == ("Dataset 'wikipedia/20230601.en' has no split 'validation'; it has: "
                          "train.")
  assert len(sources.data_source('wikipedia/20230601.en', 'train[:2]', data_dir)) == 2


# ------------------------------------------------------------------------ the user's files


def _texts(source, key='text'):
  return [source[i][key].decode() for i in range(len(source))]


def test_text_files_become_train_and_validation(tmp_path, data_dir):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  lines = sentences(60, seed=1)
  (folder / 'a.txt').write_text('\n'.join(lines[:30]) + '\n\n')
  (folder / 'b.txt').write_text('\n'.join(lines[30:]))
  name = f'files:{folder}/*.txt'
  train = _texts(sources.data_source(name, 'train', data_dir))
  validation = _texts(sources.data_source(name, 'validation', data_dir))
  # Every 20th line (from the first, across files in sorted order) is held out.
  assert sorted(validation) == sorted(lines[0::20])
  assert sorted(train + validation) == sorted(lines)


def test_file_sets_are_keyed_and_changes_are_noticed(tmp_path, data_dir, caplog):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  (folder / 'a.txt').write_text('\n'.join(sentences(25, seed=2)))
  (folder / 'b.txt').write_text('\n'.join(sentences(25, seed=3)))
  first = sources.prepare(f'files:{folder}/a.txt', data_dir)
  both = sources.prepare(f'files:{folder}/*.txt', data_dir)
  assert first.data_dir != both.data_dir
  assert sources.prepare(f'files:{folder}/*.txt', data_dir).data_dir == both.data_dir
  (folder / 'c.txt').write_text('\n'.join(sentences(25, seed=4)))
  caplog.set_level('WARNING')
  grown = sources.prepare(f'files:{folder}/*.txt', data_dir)
  assert grown.data_dir != both.data_dir
  assert 'changed since they were prepared' in caplog.text
  assert grown.info.splits['train'].num_examples + grown.info.splits[
      'validation'].num_examples == 75


def _write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def _write_parquet(path, records):
  pq.write_table(pa.Table.from_pylist(records), path)


def _write_csv(path, records):
  import csv
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)


def _labelled(count, seed):
  """Sentences whose label says whether they mention the river (learnable by a tiny model)."""
  out = []
  for i, s in enumerate(sentences(count, seed)):
    body = s.replace('river', 'stream')
    if i % 2:
      body = 'The river ' + body
    out.append({'text': body, 'label': ['dry', 'wet'][i % 2], 'source': 'fixture', 'n': i})
  return out


@pytest.mark.parametrize('ext, write', [('jsonl', _write_jsonl), ('parquet', _write_parquet),
                                        ('csv', _write_csv)])
def test_records_pretrain_and_classify(ext, write, tmp_path, data_dir, tokenizer):
  """JSON lines, Parquet and CSV: MLM batches from the text field, classification batches
  from the text and label columns (string labels become sorted class indices)."""
  records = _labelled(80, seed=5)
  write(tmp_path / f'part1.{ext}', records[:40])
  write(tmp_path / f'part2.{ext}', records[40:])
  name = f'files:{tmp_path}/*.{ext}'

  c = pretrain_configs.get_config('tiny')
  c.data.dataset, c.data.data_dir, c.data.seq_len = name, data_dir, 16
  c.train.batch_size = 4
  batch = next(mlm.pretrain_train_iterator(c, tokenizer))
  assert batch['inputs'].shape == (4, 16) and batch['weights'].sum() > 0

  task = classification.get_task(name, data_dir)
  assert (task.text_keys, task.label_key, task.num_classes) == (('text',), 'label', 2)
  batches = list(classification.classification_iterator(
      name, 'validation', tokenizer, max_len=24, batch_size=4, data_dir=data_dir))
  labels = np.concatenate([b['labels'][b['weights'] > 0] for b in batches])
  held_out = records[0::20]
  assert sorted(labels.tolist()) == sorted(['dry', 'wet'].index(r['label']) for r in held_out)


def test_sentence_pairs_from_jsonl(tmp_path, data_dir, tokenizer):
  records = [{'premise': p, 'hypothesis': h, 'label': i % 3}
             for i, (p, h) in enumerate(zip(sentences(40, 6), sentences(40, 7)))]
  _write_jsonl(tmp_path / 'nli.jsonl', records)
  name = f'files:{tmp_path}/nli.jsonl'
  task = classification.get_task(name, data_dir)
  assert (task.text_keys, task.num_classes) == (('premise', 'hypothesis'), 3)
  batch = next(classification.classification_iterator(
      name, 'train', tokenizer, max_len=40, batch_size=4, data_dir=data_dir))
  # <s> A </s></s> B </s>: two separators back to back in every row.
  assert all(any(r[i] == r[i + 1] == tokenizer.eos_id for i in range(39)) for r in batch['inputs'])


@pytest.mark.parametrize('layout', ['two_files', 'tsv'])
def test_parallel_text_has_language_features(layout, tmp_path, data_dir):
  en = [f'the garden number {i}' for i in range(40)]
  fr = [f'le jardin numero {i}' for i in range(40)]
  if layout == 'two_files':
    (tmp_path / 'train.en').write_text('\n'.join(en) + '\n')
    (tmp_path / 'train.fr').write_text('\n'.join(fr) + '\n')
    name = f'parallel:{tmp_path}/train.en,{tmp_path}/train.fr'
  else:
    (tmp_path / 'train.tsv').write_text(''.join(f'{a}\t{b}\n' for a, b in zip(en, fr)))
    name = f'parallel:{tmp_path}/train.tsv'
  builder = sources.prepare(name, data_dir)
  assert set(builder.info.features) == {'en', 'fr'}
  pairs = [(ex['en'].decode(), ex['fr'].decode())
           for split in ('train', 'validation')
           for ex in map(sources.data_source(name, split, data_dir).__getitem__,
                         range(builder.info.splits[split].num_examples))]
  assert sorted(pairs) == sorted(zip(en, fr))


def test_misaligned_parallel_files_are_one_line(tmp_path, data_dir):
  (tmp_path / 'a.en').write_text('one\ntwo\nthree\n')
  (tmp_path / 'a.fr').write_text('un\ndeux\n')
  with pytest.raises(user_files.UserFilesError, match='not line-aligned'):
    sources.prepare(f'parallel:{tmp_path}/a.en,{tmp_path}/a.fr', data_dir)


def test_unmatched_glob_is_one_line(tmp_path, data_dir):
  with pytest.raises(user_files.UserFilesError, match='no file matches'):
    sources.prepare(f'files:{tmp_path}/nothing/*.txt', data_dir)


# ------------------------------------------------------------------------ start checks


def _pretrain_config(name, data_dir, **data):
  c = pretrain_configs.get_config('tiny')
  c.data.dataset, c.data.data_dir = name, data_dir
  c.data.seq_len, c.train.batch_size = 16, 4
  for k, v in data.items():
    c.data[k] = v
  return c


def test_empty_text_field_is_one_line(tmp_path, data_dir, tokenizer):
  _write_jsonl(tmp_path / 'x.jsonl', [{'text': '', 'body': s} for s in sentences(40, 8)])
  c = _pretrain_config(f'files:{tmp_path}/x.jsonl', data_dir)
  with pytest.raises(checks.DataCheckError) as e:
    checks.check_pretrain_data(c, tokenizer, process_count=1)
  assert str(e.value).startswith("Text field 'text' of split 'train' of ")
  assert str(e.value).endswith('is empty in all 38 examples read.')
  with pytest.raises(checks.DataCheckError, match="no text field 'txt'; it has: body, text"):
    checks.check_pretrain_data(_pretrain_config(f'files:{tmp_path}/x.jsonl', data_dir,
                                                text_key='txt'), tokenizer, process_count=1)
  checks.check_pretrain_data(_pretrain_config(f'files:{tmp_path}/x.jsonl', data_dir,
                                              text_key='body'), tokenizer, process_count=1)


def test_too_few_examples_and_missing_split_are_found_at_start(tmp_path, data_dir, tokenizer):
  (tmp_path / 'small.txt').write_text('\n'.join(sentences(25, seed=9)))
  name = f'files:{tmp_path}/small.txt'
  c = _pretrain_config(name, data_dir)
  with pytest.raises(checks.DataCheckError, match="'validation' .* has 2 examples; reading by "
                                                  '4 processes needs at least 4'):
    checks.check_pretrain_data(c, tokenizer, process_count=4)
  c.train.batch_size = 256
  with pytest.raises(checks.DataCheckError, match='fewer than one global batch of 256 x 14'):
    checks.check_pretrain_data(c, tokenizer, process_count=1)
  c.data.eval_split = 'test'
  with pytest.raises(sources.DatasetError, match="no split 'test'; it has: train, validation"):
    checks.check_pretrain_data(c, tokenizer, process_count=1)


def test_unknown_token_rate_is_logged_and_warned(tmp_path, data_dir, tokenizer, caplog):
  (tmp_path / 'en.txt').write_text('\n'.join(sentences(40, seed=10)))
  caplog.set_level('INFO')
  caplog.set_level('INFO', logger='absl')  # an earlier test may have quieted absl's logger
  stats = checks.check_split(f'files:{tmp_path}/en.txt', 'train', data_dir, ('text',),
                             tokenizer, min_examples=1, what='a test')
  assert stats['unk_rate'] == 0.0 and 'unknown-token rate 0.000%' in caplog.text
  assert not any('<unk>' in r.getMessage() for r in caplog.records)
  (tmp_path / 'el.txt').write_text('\n'.join(['Καλημέρα κόσμε, τι κάνεις σήμερα'] * 40))
  stats = checks.check_split(f'files:{tmp_path}/el.txt', 'train', data_dir, ('text',),
                             tokenizer, min_examples=1, what='a test')
  assert stats['unk_rate'] > 0.3
  assert any(r.levelname == 'WARNING' and '<unk>' in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ many processes


def test_processes_read_disjoint_shares_of_a_prepared_folder(data_dir, tokenizer):
  examples = [{'sentence': s, 'label': i % 2, 'idx': i}
              for i, s in enumerate(sentences(37, seed=11))]
  prepare_copy('glue/sst2', data_dir, {'train': examples, 'validation': examples[:9]})
  seen = []
  for index in range(3):
    batches = classification.classification_iterator(
        'sst2', 'train', tokenizer, max_len=24, batch_size=4, data_dir=data_dir,
        process_index=index, process_count=3)
    rows = [tuple(r) for b in batches for r, w in zip(b['inputs'], b['weights']) if w > 0]
    seen.append(rows)
  assert sum(map(len, seen)) == 37
  assert len(set().union(*map(set, seen))) == 37  # disjoint, and together the whole split


def test_tfds_mock_data_feeds_the_pipeline(data_dir, tokenizer):
  """tfds.testing.mock_data mocks data sources in tfds 4.9.10, but with its default policy a
  builder stays unprepared; given the metadata of a prepared copy (USE_FILES) the pipeline
  reads TFDS's mock examples through the real split names."""
  import tensorflow_datasets as tfds
  prepare_copy('wikipedia/20230601.en', data_dir, {'train': 3})
  c = pretrain_configs.get_config('tiny')
  c.data.dataset, c.data.data_dir, c.data.seq_len = 'wikipedia/20230601.en', data_dir, 16
  c.train.batch_size = 4
  with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=data_dir):
    assert len(sources.data_source('wikipedia/20230601.en', 'train', data_dir)) == 50
    batch = next(mlm.pretrain_train_iterator(c, tokenizer))
  assert batch['inputs'].shape == (4, 16) and batch['weights'].sum() > 0
