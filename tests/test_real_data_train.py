"""The paper's datasets and the user's files, end to end: every command of README's data
section, run through the CLI on copies of Wikipedia, GLUE and WMT14 prepared by their real
TFDS builders (tests/tfds_fixtures.py) and on a folder of files made here.

The README commands run as written, except that their folders become the test's and their
runs are shortened by appended overrides (SHORT)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.tfds_fixtures import prepare_copy, sentences
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.data import checks
from trainbig_jax.data.sotu import speeches_dir
from trainbig_jax.tasks.classify import finetune
from trainbig_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SHORT = ('--config.train.budget_s=0', '--config.train.log_every=1',
         '--config.train.warmup_steps=5')
PREPARE, TRAIN_WIKI, FINETUNE_MNLI, TRAIN_FILES, FINETUNE_FILES = (
    'trainbig prepare --dataset=wikipedia/20230601.en --dataset=glue/sst2 --dataset=glue/mnli '
    '--dataset=wmt14_translate/fr-en --data_dir=/shared/tfds',
    "trainbig train --config=configs/pretrain.py:demo --config.data.dataset=wikipedia/20230601.en "
    "--config.data.train_split='train[1000:]' --config.data.eval_split='train[:1000]' "
    '--config.data.data_dir=/shared/tfds --workdir=runs/wiki',
    'trainbig finetune --config=configs/finetune.py:mnli --config.max_len=64 '
    '--config.data_dir=/shared/tfds --init_checkpoint=runs/wiki --workdir=runs/mnli',
    'trainbig train --config=configs/pretrain.py:demo '
    "--config.data.dataset='files:/some/dir/*.txt' --workdir=runs/mine",
    "trainbig finetune --config=configs/finetune.py:demo "
    "--config.task='files:/some/dir/labelled.jsonl' --init_checkpoint=runs/mine "
    '--workdir=runs/mine_ft',
)


@pytest.fixture(scope='module', autouse=True)
def reuse_compiled_programs(compilation_cache):
  """The commands' evaluations of same-shaped models run one program: compiled once."""
  with compilation_cache():
    yield


def readme_data_commands() -> list[str]:
  section = (REPO / 'README.md').read_text().split('\n### Data\n')[1].split('\n### ')[0]
  return [line.strip() for line in section.splitlines() if line.startswith('trainbig ')]


def test_every_readme_data_command_is_run_here():
  assert readme_data_commands() == [PREPARE, TRAIN_WIKI, FINETUNE_MNLI, TRAIN_FILES,
                                    FINETUNE_FILES]


def trainbig(command: str, places: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
  """Runs a README command with its folders replaced by `places` and `extra` appended."""
  args = shlex.split(command)[1:]
  for old, new in places.items():
    args = [a.replace(old, new) for a in args]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, '-m', 'trainbig_jax.cli', *args, *extra], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)


def error_lines(result) -> list[str]:
  assert result.returncode == 2, result.stderr[-3000:]
  return [l for l in result.stderr.splitlines() if l.startswith('trainbig: error:')]


def eval_losses(workdir) -> list[float]:
  return [r['eval_loss'] for r in read_metrics(workdir) if 'eval_loss' in r]


def _paragraphs(count: int) -> list[str]:
  out = []
  for path in sorted(speeches_dir().glob('19*.txt')):
    out += [p for p in path.read_text().splitlines() if len(p) > 200]
    if len(out) >= count:
      return out[:count]
  raise AssertionError('the embedded corpus has fewer paragraphs than the test needs')


def _sst2(count, seed):
  """SST-2 layout; the label says whether the river is mentioned."""
  out = []
  for i, s in enumerate(sentences(count, seed)):
    s = s.replace('River', 'Stream').replace('river', 'stream')
    out.append({'sentence': f'the river {s}' if i % 2 else s, 'label': i % 2, 'idx': i})
  return out


def _mnli(count, seed):
  return [{'premise': p, 'hypothesis': h, 'label': i % 3, 'idx': i}
          for i, (p, h) in enumerate(zip(sentences(count, seed), sentences(count, seed + 1)))]


@pytest.fixture(scope='module')
def places(tmp_path_factory):
  """The README's folders: a shared data folder with the public datasets' copies, a folder
  of the user's files, and the runs folder."""
  root = tmp_path_factory.mktemp('readme')
  shared, mine = root / 'shared', root / 'mine'
  mine.mkdir()
  for path in sorted(speeches_dir().glob('18[5-6]*.txt'))[:6]:
    shutil.copy(path, mine / path.name)
  rows = [{'text': r['sentence'], 'label': ['no', 'yes'][r['label']]} for r in _sst2(80, 7)]
  (mine / 'labelled.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  articles = [{'title': f'Article {i}', 'text': p} for i, p in enumerate(_paragraphs(1600))]
  prepare_copy('wikipedia/20230601.en', str(shared), {'train': articles})
  prepare_copy('glue/sst2', str(shared), {'train': _sst2(64, 1), 'validation': _sst2(20, 2),
                                          'test': [dict(e, label=-1) for e in _sst2(8, 3)]})
  prepare_copy('glue/mnli', str(shared), {'train': _mnli(48, 1), 'validation_matched': _mnli(
      12, 3), 'validation_mismatched': _mnli(12, 5)})
  pairs = [{'en': f'the house {i}', 'fr': f'la maison {i}'} for i in range(20)]
  prepare_copy('wmt14_translate/fr-en', str(shared), {'train': pairs, 'validation': pairs[:4]})
  return {'/shared/tfds': str(shared), '/some/dir': str(mine), 'runs/': f'{root}/runs/'}


def test_prepare_reports_prepared_datasets_ready(places):
  result = trainbig(PREPARE, places)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for name, splits in [('wikipedia/20230601.en', 'train 1,600'),
                       ('glue/sst2', 'test 8, train 64, validation 20'),
                       ('glue/mnli', 'train 48, validation_matched 12, validation_mismatched 12'),
                       ('wmt14_translate/fr-en', 'train 20, validation 4')]:
    assert any(l.startswith(f'prepare: {name} ready in ') and l.endswith(f'({splits} examples)')
               for l in lines), result.stdout


def test_prepare_names_the_missing_extra_before_downloading(tmp_path):
  result = trainbig(PREPARE, {'/shared/tfds': str(tmp_path)})
  assert error_lines(result) == [
      "trainbig: error: Preparing 'wikipedia/20230601.en' needs apache_beam, mwparserfromhell, "
      "mwxml, not installed; install with: pip install 'trainbig_jax[wikipedia]'."]
  assert not (tmp_path / 'downloads').exists() and not (tmp_path / 'glue').exists()


def test_unprepared_wikipedia_is_one_line_naming_prepare(tmp_path):
  result = trainbig(TRAIN_WIKI, {'/shared/tfds': str(tmp_path), 'runs/': f'{tmp_path}/runs/'})
  assert error_lines(result) == [
      f"trainbig: error: Dataset 'wikipedia/20230601.en' is not prepared in {tmp_path}; "
      f"prepare it once with `trainbig prepare --dataset=wikipedia/20230601.en "
      f"--data_dir={tmp_path}`."]
  assert not (tmp_path / 'runs' / 'wiki' / 'checkpoints').exists()


@pytest.fixture(scope='module')
def wiki_run(places):
  result = trainbig(TRAIN_WIKI, places, '--config.train.total_steps=3',
                    '--config.train.eval_every=3', '--config.data.num_eval_batches=1', *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  return Path(places['runs/']) / 'wiki', result


def test_wikipedia_pretrains(wiki_run):
  workdir, result = wiki_run
  assert 'train: stopped by steps at step 3' in result.stdout
  assert re.search(r"data check: wikipedia/20230601.en split 'train\[1000:\]': 600 examples, "
                   r'unknown-token rate', result.stderr)
  assert len(eval_losses(workdir)) == 2 and np.isfinite(eval_losses(workdir)).all()


def test_mnli_finetunes_from_prepared_glue(wiki_run, places):
  result = trainbig(FINETUNE_MNLI, places, '--config.train.total_steps=3',
                    '--config.train.eval_every=3', '--config.train.batch_size=16',
                    '--config.train.warmup_steps=1', '--config.train.log_every=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'finetune: stopped by steps at step 3' in result.stdout
  for split in ('train', 'validation_matched', 'validation_mismatched'):
    assert f"data check: glue/mnli split '{split}'" in result.stderr
  # Both validation sets are reported: matched as eval_accuracy, mismatched beside it, each
  # over its own 12 examples (so accuracies are multiples of 1/12).
  evals = [r for r in read_metrics(Path(places['runs/']) / 'mnli') if 'eval_loss' in r]
  assert evals and all('eval_accuracy_validation_mismatched' in r for r in evals)
  for r in evals:
    for key in ('eval_accuracy', 'eval_accuracy_validation_mismatched'):
      assert abs(r[key] * 12 - round(r[key] * 12)) < 1e-6
    assert np.isfinite(r['eval_loss_validation_mismatched'])


@pytest.fixture(scope='module')
def files_run(places):
  result = trainbig(TRAIN_FILES, places, '--config.train.total_steps=30',
                    '--config.train.eval_every=15', '--config.data.num_eval_batches=2', *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  return Path(places['runs/']) / 'mine', result


def test_text_files_pretrain_with_eval_loss_falling(files_run):
  workdir, result = files_run
  losses = eval_losses(workdir)
  assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
  assert 'train: stopped by steps at step 30' in result.stdout
  assert 'data check: files:' in result.stderr


def test_jsonl_files_finetune(files_run, places):
  result = trainbig(FINETUNE_FILES, places, '--config.train.total_steps=4',
                    '--config.train.eval_every=4', '--config.train.batch_size=16',
                    '--config.train.warmup_steps=1', '--config.train.budget_s=0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'finetune: stopped by steps at step 4' in result.stdout
  # Too small for the global batch: found before the first step, in one line.
  result = trainbig(FINETUNE_FILES.replace('mine_ft', 'too_small'), places,
                    '--config.train.batch_size=128')
  assert error_lines(result) == [
      f"trainbig: error: Split 'train' of 'files:{places['/some/dir']}/labelled.jsonl' has 76 "
      'examples; one global batch of 128 needs at least 128.']


def test_sst2_finetunes_from_prepared_glue(files_run, places, tmp_path):
  c = finetune_configs.get_config('sst2')
  c.data_dir, c.max_len, c.train.batch_size = places['/shared/tfds'], 32, 16
  c.train.total_steps, c.train.eval_every, c.train.warmup_steps = 4, 4, 1
  summary = finetune(c, files_run[0], tmp_path / 'ft')
  assert summary.step == 4 and 0.0 <= summary.eval_accuracy <= 1.0
  evals = [r for r in read_metrics(tmp_path / 'ft') if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [0, 4]
