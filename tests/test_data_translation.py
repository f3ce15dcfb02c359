"""Translation data: the embedded LibreOffice help corpus (parsing, alignment, splits), the
shared tokenizer, packed training batches, eval batches and BLEU/chrF scoring.

Pipeline tests read a small in-memory parallel corpus (swapped in for `sources.data_source`);
only the builder test reads the real corpus, prepared once per session in TRAINBIG_DATA_DIR.
"""

import collections
import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest
import sacrebleu

from trainbig_jax.data import libreoffice_help as lh
from trainbig_jax.data import sources
from trainbig_jax.data import tokenizer as tok_lib
from trainbig_jax.data import translation as tr

FAKE_DATASET = 'fake_enfr'
# Word-for-word glossary of the in-memory corpus; French carries accents that English never
# has, so a tokenizer trained on English alone would map them to <unk>.
GLOSSARY = {
    'the': 'le', 'cat': 'chat', 'eats': 'mange', 'red': 'rouge', 'fish': 'poisson',
    'summer': 'été', 'window': 'fenêtre', 'opens': 'ouvre', 'choose': 'choisissez',
    'format': 'format', 'character': 'caractère', 'dialog': 'boîte', 'click': 'cliquez',
    'on': 'sur', 'button': 'bouton', 'next': 'suivant', 'page': 'page', 'style': 'style',
    'table': 'tableau', 'cell': 'cellule', 'insert': 'insérer', 'delete': 'supprimer',
    'french': 'français', 'text': 'texte', 'and': 'et', 'with': 'avec', 'file': 'fichier',
}


class _FakeSource:
  """A random-access split like TFDS's array_record data source (Text features as bytes)."""

  def __init__(self, pairs):
    self._records = [{'en': en.encode(), 'fr': fr.encode()} for en, fr in pairs]

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]

  def __getitems__(self, indices):
    return [self._records[i] for i in indices]


def _fake_splits():
  rng = np.random.default_rng(0)
  words = sorted(GLOSSARY)
  splits = {}
  for split, count in (('train', 400), ('validation', 50)):
    pairs, seen = [], set()
    while len(pairs) < count:
      # Mostly short pairs, some longer than max_source_len / max_target_len.
      length = int(rng.integers(30, 60)) if rng.random() < 0.05 else int(rng.integers(1, 12))
      en_words = list(rng.choice(words, size=length))
      en = ' '.join(en_words)
      if en in seen:
        continue
      seen.add(en)
      pairs.append((en, ' '.join(GLOSSARY[w] for w in en_words)))
    splits[split] = pairs
  return splits


@pytest.fixture(scope='module')
def fake_splits():
  return _fake_splits()


@pytest.fixture(scope='module', autouse=True)
def fake_dataset(fake_splits):
  """Serves FAKE_DATASET from memory; every other name goes to the real data sources."""
  real = sources.data_source

  def data_source(name, split, data_dir=None):
    if name == FAKE_DATASET:
      return _FakeSource(fake_splits[split])
    return real(name, split, data_dir)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sources, 'data_source', data_source)
    yield


def _config(batch_size=8):
  c = ml_collections.ConfigDict()
  c.data = tr.translation_data_config()
  c.data.dataset = FAKE_DATASET
  c.data.vocab_size = 300
  c.data.max_source_len = 24
  c.data.max_target_len = 20
  c.data.pack_len = 32
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = batch_size
  return c


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  return tok_lib.train_or_load_tokenizer(_config().data, str(tmp_path_factory.mktemp('tok')))


def _expected_ids(tokenizer, text, max_len):
  return tuple(tokenizer.encode(text)[:max_len - 1]) + (tok_lib.EOS_ID,)


def _segments(batch, side):
  """[(row, segment id, ids)] of one side of a packed batch, checking the layout on the way."""
  tokens = batch[side]
  segmentation = batch[f'{side}_segmentation']
  positions = batch[f'{side}_position']
  found = []
  for row in range(tokens.shape[0]):
    padding = segmentation[row] == 0
    assert (tokens[row][padding] == tok_lib.PAD_ID).all()
    assert (positions[row][padding] == 0).all()
    assert (tokens[row][~padding] != tok_lib.PAD_ID).all()
    ids = sorted(set(segmentation[row][~padding].tolist()))
    assert ids == list(range(1, len(ids) + 1))  # segments numbered 1, 2, ... per row
    for segment in ids:
      where = np.flatnonzero(segmentation[row] == segment)
      assert (np.diff(where) == 1).all()  # contiguous
      np.testing.assert_array_equal(positions[row][where], np.arange(len(where)))
      assert tokens[row][where[-1]] == tok_lib.EOS_ID
      found.append((row, segment, tuple(tokens[row][where].tolist())))
  return found


def _packed_pairs(batch):
  """The (source ids, target ids) pairs of a packed batch, by matching segment ids."""
  sources_ = {(r, s): ids for r, s, ids in _segments(batch, 'inputs')}
  targets = {(r, s): ids for r, s, ids in _segments(batch, 'targets')}
  assert sources_.keys() == targets.keys()  # every pair has both sides in the same row
  return [(sources_[k], targets[k]) for k in sorted(sources_)]


# --- the embedded corpus: parsing, alignment, splits -----------------------------------------

_EN_PAGE = """<html><head><title>t</title></head><body><div id="DisplayArea">
<h1 id="hd_id1" dir="auto">Character</h1>
<p id="par_id2" class="paragraph">Press <span id="sw_1" class="switchinline"><span hidden="true"
 id="MACsw_1" class="MAC"><span class="keycode">Command</span></span><span hidden="true"
 id="defaultsw_1"><span class="keycode">Ctrl</span></span></span> + F &amp; type.</p>
<p class="embedded">No id: not aligned.</p>
<p id="par_id3">Line one<br>line two</p>
<p id="par_id4">Untranslated</p>
<p id="par_id5">Twice A</p><p id="par_id5">Twice B</p>
<p id="par_id6">Once in English</p>
<p id="par_id7">   </p>
</div></body></html>"""
_FR_PAGE = """<html><head><title>t</title></head><body><div id="DisplayArea">
<h1 id="hd_id1" dir="auto">Caractère</h1>
<p id="par_id2" class="paragraph">Appuyez sur <span id="sw_1" class="switchinline"><span
 hidden="true" id="MACsw_1" class="MAC"><span class="keycode">Commande</span></span><span
 hidden="true" id="defaultsw_1"><span class="keycode">Ctrl</span></span></span> + F &amp; tapez.</p>
<p id="par_id3">Ligne un<br>ligne deux</p>
<p id="par_id4">Untranslated</p>
<p id="par_id5">Deux fois A</p><p id="par_id5">Deux fois B</p>
<p id="par_id6">Une</p><p id="par_id6">fois</p>
<p id="par_id7">vide en anglais</p>
</div></body></html>"""


def test_paragraphs_align_by_page_and_id(tmp_path):
  for lang, html in (('en', _EN_PAGE), ('fr', _FR_PAGE)):
    (tmp_path / lang / 'swriter').mkdir(parents=True)
    (tmp_path / lang / 'swriter' / 'page.html').write_text(html, encoding='utf-8')
  (tmp_path / 'en' / 'only_english.html').write_text(_EN_PAGE, encoding='utf-8')

  assert lh.read_paragraphs(tmp_path / 'en' / 'swriter' / 'page.html')[:3] == [
      ('hd_id1', 'Character'),
      # The macOS-only variant is dropped, the default one kept; entities decoded.
      ('par_id2', 'Press Ctrl + F & type.'),
      ('par_id3', 'Line one line two'),
  ]
  pairs = list(lh.aligned_pairs(tmp_path / 'en', tmp_path / 'fr'))
  assert pairs == [
      ('swriter/page.html', 'hd_id1', 'Character', 'Caractère'),
      ('swriter/page.html', 'par_id2', 'Press Ctrl + F & type.',
       'Appuyez sur Ctrl + F & tapez.'),
      ('swriter/page.html', 'par_id3', 'Line one line two', 'Ligne un ligne deux'),
      ('swriter/page.html', 'par_id4', 'Untranslated', 'Untranslated'),
      ('swriter/page.html', 'par_id5', 'Twice A', 'Deux fois A'),
      ('swriter/page.html', 'par_id5', 'Twice B', 'Deux fois B'),
      # par_id6 occurs once in English and twice in French: not aligned.
      ('swriter/page.html', 'par_id7', '', 'vide en anglais'),
  ]


def _page_in(split, avoid=()):
  return next(f'p{i}.html' for i in range(10_000)
              if lh.split_of_page(f'p{i}.html') == split and f'p{i}.html' not in avoid)


def test_splits_hold_out_pages_and_drop_bad_and_leaking_pairs():
  train, train2 = _page_in('train'), _page_in('train', avoid={_page_in('train')})
  valid, test = _page_in('validation'), _page_in('test')
  rows = [
      (train, 'a', 'Open', 'Ouvrir'),
      (train, 'b', '', 'vide'),  # empty side
      (train, 'c', 'Same', 'Same'),  # untranslated
      (train2, 'a', 'Open', 'Ouvrir'),  # duplicate pair on another page
      (train2, 'b', 'Close', 'Fermer'),
      (valid, 'a', 'Open', 'Ouvrir'),  # leaks from train
      (valid, 'b', 'Example:', 'Fermer'),  # its French leaks from train
      (valid, 'c', 'Save the file.', 'Enregistrez le fichier.'),
      (valid, 'd', 'Save the file.', 'Enregistrez le fichier.'),  # duplicate in the split
      (test, 'a', 'Save the file.', 'Sauvez le fichier.'),  # English leaks from validation
      (test, 'b', 'Print.', 'Imprimez.'),
  ]
  splits = lh.split_pairs(iter(rows))
  assert [r[1:] for r in splits['train']] == [('a', 'Open', 'Ouvrir'), ('b', 'Close', 'Fermer')]
  assert [r[2:] for r in splits['validation']] == [('Save the file.', 'Enregistrez le fichier.')]
  assert [r[2:] for r in splits['test']] == [('Print.', 'Imprimez.')]
  # The rule depends on the page path alone, and holds out about 1 page in 25 for each.
  pages = [f'text/p{i}.html' for i in range(5000)]
  counts = collections.Counter(lh.split_of_page(p) for p in pages)
  assert [lh.split_of_page(p) for p in pages] == [lh.split_of_page(p) for p in pages]
  for split in ('validation', 'test'):
    assert abs(counts[split] - 200) < 5 * math.sqrt(200)


def test_missing_debian_tools_fail_in_one_line_naming_alternatives(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path / 'empty_bin'))
  with pytest.raises(lh.DebianToolsMissingError) as raised:
    lh.fetch_package('libreoffice-help-fr', tmp_path / 'cache')
  message = str(raised.value)
  assert '\n' not in message and 'apt-get' in message and 'dpkg-deb' in message
  assert 'wmt14_translate/fr-en' in message and 'parallel:' in message
  # The same error reaches a user who names the corpus in a config.
  with pytest.raises(sources.DatasetError, match='wmt14_translate/fr-en'):
    sources.prepare('trainbig_libreoffice_enfr', str(tmp_path / 'tfds'))


def test_missing_package_lists_say_to_run_apt_get_update(tmp_path, monkeypatch):
  # apt-get as on a fresh image without package lists: no .deb, one 'E:' line, status 100.
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool, script in (('apt-get', 'echo "W: a warning" >&2\n'
                                   'echo "E: Unable to locate package $2" >&2\nexit 100\n'),
                       ('dpkg-deb', 'exit 0\n')):
    (bin_dir / tool).write_text('#!/bin/sh\n' + script)
    (bin_dir / tool).chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  with pytest.raises(lh.PackageFetchError) as raised:
    lh.fetch_package('libreoffice-help-fr', tmp_path / 'cache')
  message = str(raised.value)
  assert '\n' not in message and 'apt-get update' in message
  assert 'Unable to locate package libreoffice-help-fr' in message
  assert not list((tmp_path / 'cache').iterdir())


@pytest.mark.skipif(not (shutil.which('apt-get') and shutil.which('dpkg-deb')),
                    reason='the embedded translation corpus needs apt-get and dpkg-deb '
                    '(Debian/Ubuntu); elsewhere use wmt14_translate/fr-en or parallel: files')
def test_embedded_corpus_has_disjoint_splits_of_aligned_pairs(data_dir):
  builder = sources.prepare('trainbig_libreoffice_enfr', data_dir)
  assert builder.info.metadata['debian_fr'].startswith('libreoffice-help-fr=')
  pages, pairs, english = {}, {}, {}
  for split in lh.SPLITS:
    source = sources.data_source('trainbig_libreoffice_enfr', split, data_dir)
    records = source.__getitems__(range(len(source)))
    pages[split] = {r['page'].decode() for r in records}
    pairs[split] = {(r['en'], r['fr']) for r in records}
    english[split] = {r['en'] for r in records}
    assert len(pairs[split]) == len(records)  # no duplicates
    assert all(en.strip() and fr.strip() and en != fr for en, fr in pairs[split])
    assert all(lh.split_of_page(p) == split for p in pages[split])
  assert sum(len(p) for p in pairs.values()) >= 20_000
  assert min(len(pairs['validation']), len(pairs['test'])) >= 500
  for a, b in (('train', 'validation'), ('train', 'test'), ('validation', 'test')):
    assert not pages[a] & pages[b]
    assert not english[a] & english[b]
  # A sentence the README's translation demo uses is in the training data.
  assert (b'Choose Format - Character.', 'Choisissez Format - Caractère.'.encode()) in pairs[
      'train']


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_is_shared_by_both_languages(tokenizer):
  for text in ('le chat mange le poisson en été', 'the red cat eats fish'):
    ids = tokenizer.encode(text)
    assert tok_lib.UNK_ID not in ids and tokenizer.decode(ids) == text
  # Frequent words of both languages are single pieces.
  assert len(tokenizer.encode('fenêtre')) <= 2 and len(tokenizer.encode('window')) <= 2


# --- training batches ------------------------------------------------------------------------

def test_packed_batches_hold_whole_pairs_with_segments_and_positions(tokenizer, fake_splits):
  config = _config()
  expected = {(_expected_ids(tokenizer, en, 24), _expected_ids(tokenizer, fr, 20))
              for en, fr in fake_splits['train']}
  iterator = tr.translation_train_iterator(config, tokenizer)
  seen = []
  for _ in range(60):
    batch = next(iterator)
    assert set(batch) == {'inputs', 'inputs_segmentation', 'inputs_position', 'targets',
                          'targets_segmentation', 'targets_position'}
    assert all(v.shape == (8, 32) and v.dtype == np.int32 for v in batch.values())
    seen += _packed_pairs(batch)
  # Every segment is one whole pair of the corpus (over-long ones truncated, eos kept), and
  # all pairs come through in the first epoch.
  assert set(seen) <= expected
  assert set(seen) == expected
  assert max(len(s) for s, _ in seen) == 24 and max(len(t) for _, t in seen) == 20
  # Rows hold several pairs: packing, not one pair per row.
  assert len(seen) / (60 * 8) > 1.5


def test_train_iterator_resumes_with_the_same_batches(tokenizer):
  config = _config()
  iterator = tr.translation_train_iterator(config, tokenizer)
  for _ in range(7):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(5)]
  restored = tr.translation_train_iterator(config, tokenizer)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_take_their_block_of_the_same_global_batches(tokenizer):
  config = _config(batch_size=8)
  whole = tr.translation_train_iterator(config, tokenizer)
  halves = [tr.translation_train_iterator(config, tokenizer, process_index=index,
                                          process_count=2) for index in range(2)]
  for _ in range(20):
    batch, *blocks = next(whole), *(next(h) for h in halves)
    assert blocks[0]['inputs'].shape == (4, 32)  # batch_size // process_count rows
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), batch[key])
  # The state is the job's: the same on both processes, and it restores on any count.
  state = json.loads(json.dumps(whole.get_state()))
  assert [json.loads(json.dumps(h.get_state())) for h in halves] == [state, state]
  expected = next(whole)
  second = tr.translation_train_iterator(config, tokenizer, process_index=1, process_count=2)
  second.set_state(state)
  got = next(second)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key][4:])


def test_config_checks():
  config = _config()
  config.data.pack_len = 16
  with pytest.raises(ValueError, match='pack_len=16'):
    tr.check_translation_data_config(config.data)
  config = _config()
  config.data.target_lang = 'en'
  with pytest.raises(ValueError, match='two languages'):
    tr.check_translation_data_config(config.data)
  config = _config()
  config.data.target_lang = 'de'
  with pytest.raises(ValueError, match="'de' is not a feature"):
    tr.translation_pairs(config, 'train')


# --- eval batches ----------------------------------------------------------------------------

def test_eval_batches_have_fixed_shapes_and_mark_padding(tokenizer, fake_splits):
  config = _config(batch_size=8)
  pairs = tr.translation_pairs(config)
  assert pairs == fake_splits['validation']
  indices = []
  for index in range(2):
    batches = tr.translation_eval_batches(config, tokenizer, process_index=index,
                                          process_count=2)
    assert len(batches) == math.ceil(50 / 8)  # the same count on every process
    for batch in batches:
      assert batch['inputs'].shape == (4, 24) and batch['targets'].shape == (4, 20)
      assert batch['example_index'].shape == (4,)
      for row, example in enumerate(batch['example_index']):
        if example < 0:
          assert (batch['inputs'][row] == 0).all() and (batch['targets'][row] == 0).all()
          continue
        en, fr = pairs[example]
        for side, text, length in (('inputs', en, 24), ('targets', fr, 20)):
          want = _expected_ids(tokenizer, text, length)
          np.testing.assert_array_equal(batch[side][row][:len(want)], want)
          assert (batch[side][row][len(want):] == 0).all()
        indices.append(int(example))
    assert batches[-1]['example_index'][-1] == -1  # 50 pairs do not fill 7 x 8 rows
  assert sorted(indices) == list(range(50))

  limited = tr.translation_eval_batches(config, tokenizer, limit=10)
  assert len(limited) == 2
  np.testing.assert_array_equal(limited[1]['example_index'], [8, 9, -1, -1, -1, -1, -1, -1])
  assert tr.translation_pairs(config, 'validation', limit=10) == pairs[:10]


# --- scoring ---------------------------------------------------------------------------------

def test_corpus_scores_are_sacrebleu_bleu_and_chrf():
  # By hand: 1- to 4-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty).
  scores = tr.corpus_scores(['the cat sat on the mat'], ['the cat sat on a mat'])
  assert scores['bleu'] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
  hypotheses = ['Choisissez Format - Caractère.', "Ouvre la boîte de dialogue."]
  references = ['Choisissez Format - Caractère.', 'Ouvre la boîte de dialogue Styles.']
  scores = tr.corpus_scores(hypotheses, references)
  assert scores['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
  assert scores['chrf'] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
  assert 0 < scores['bleu'] < 100 and 0 < scores['chrf'] < 100
  assert tr.corpus_scores(references, references) == pytest.approx({'bleu': 100, 'chrf': 100})
  with pytest.raises(ValueError, match='one reference per hypothesis'):
    tr.corpus_scores(hypotheses, references[:1])


def test_copy_source_baseline(fake_splits):
  config = _config()
  pairs = fake_splits['validation'][:10]
  scores = tr.copy_source_scores(config, limit=10)
  assert scores == tr.corpus_scores([en for en, _ in pairs], [fr for _, fr in pairs])
  # Words spelled alike in both languages ('format', 'page', 'style') score above zero.
  assert 0 < scores['chrf'] < 100


def test_detokenize_stops_at_eos(tokenizer):
  ids = tokenizer.encode('le chat rouge')
  generated = [tok_lib.BOS_ID] + ids + [tok_lib.EOS_ID] + ids + [tok_lib.PAD_ID] * 3
  assert tr.detokenize(tokenizer, generated) == 'le chat rouge'
  assert tr.detokenize(tokenizer, np.asarray(ids + [0, 0])) == 'le chat rouge'
