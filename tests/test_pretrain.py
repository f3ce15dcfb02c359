"""End-to-end MLM pretraining on the embedded corpus: learning, resuming, stopping, errors."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.tasks.mlm import pretrain
from trainbig_jax.train import checkpoint, partitioning
from trainbig_jax.train.checks import ConfigError
from trainbig_jax.train.metrics import read_metrics


def tiny(**train):
  c = pretrain_configs.get_config('tiny')
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  summary = pretrain(tiny(total_steps=8, checkpoint_every=4, eval_every=4, log_every=1,
                          keep_checkpoints=5), workdir)
  return workdir, summary


def test_loss_falls_on_embedded_corpus(tmp_path):
  summary = pretrain(tiny(total_steps=60, eval_every=30, learning_rate=3e-3, warmup_steps=5),
                     tmp_path)
  evals = [r for r in read_metrics(tmp_path) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 30, 60]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss'] - 0.3
  assert summary.stopped_by == 'steps'
  train_rows = [r for r in read_metrics(tmp_path) if 'train_loss' in r]
  assert all({'step', 'wall_time_s', 'tokens', 'train_loss'} <= set(r) for r in train_rows)
  assert np.all(np.diff([r['wall_time_s'] for r in train_rows]) > 0)
  assert np.all(np.diff([r['tokens'] for r in train_rows]) > 0)


def test_resume_is_bit_exact_and_sees_the_same_batches(uninterrupted, tmp_path, caplog):
  full_dir, full_summary = uninterrupted
  assert full_summary.step == 8
  # An interruption right after the step-4 checkpoint: the step-8 checkpoint never existed.
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(full_dir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '8')
  with caplog.at_level(logging.INFO, logger='absl'):
    summary = pretrain(tiny(total_steps=8, checkpoint_every=4, eval_every=4, log_every=1,
                            keep_checkpoints=5), resumed_dir)
  assert summary.step == 8
  # It resumed from step 4 (a run restarted from step 0 ends with the same state, so the
  # checks below alone would not tell), and set nothing aside as damaged.
  assert f'Resumed from step 4 of {resumed_dir}.' in caplog.messages
  assert not (resumed_dir / checkpoint.DAMAGED_DIR).exists()
  full = checkpoint.restore_params(full_dir)
  resumed = checkpoint.restore_params(resumed_dir)
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  # Same batches after the resume point: identical per-step losses, logged once each.
  losses = lambda d: [(r['step'], r['train_loss']) for r in read_metrics(d) if 'train_loss' in r]
  assert losses(resumed_dir) == losses(full_dir)
  assert [r['step'] for r in read_metrics(resumed_dir) if 'train_loss' in r] == list(range(1, 9))


def test_wall_clock_budget_stops_the_run(tmp_path):
  summary = pretrain(tiny(total_steps=100_000, budget_s=0.5, eval_every=10_000), tmp_path)
  assert summary.stopped_by == 'budget'
  assert 0.5 <= summary.wall_time_s < 5.0
  assert 0 < summary.step < 100_000
  assert checkpoint.params_step_dir(tmp_path).name == str(summary.step)


def test_changed_model_config_refuses_to_resume(uninterrupted):
  c = tiny(total_steps=8)
  c.model.hidden = 64
  with pytest.raises(checkpoint.CheckpointError, match='other model settings.*hidden'):
    pretrain(c, uninterrupted[0])


@pytest.mark.parametrize('field, value, message', [
    ('model.hidden', -64, r'model.hidden=-64 is invalid'),
    ('model.num_heads', 3, r'model.num_heads=3 does not divide model.hidden=32'),
    ('mesh.shape', (3, 1, 1), r'mesh.shape=\(3, 1, 1\) needs 3 devices'),
    ('data.dataset', 'no_such_corpus', r"Unknown dataset 'no_such_corpus'"),
    ('data.seq_len', 64, r'data.seq_len=64 exceeds model.max_len=34'),
    ('train.batch_size', 12, r'train.batch_size=12 .* not divisible by the 8'),
])
def test_bad_config_is_one_clear_error(tmp_path, field, value, message):
  c = tiny()
  section, name = field.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=message):
    pretrain(c, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()


def _cli(args, env_extra=None, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **(env_extra or {}))
  return subprocess.run([sys.executable, '-m', 'trainbig_jax.cli', *args], env=env,
                        capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_errors_are_one_line(tmp_path):
  for args, message in [
      (['train', '--config=configs/pretrain.py:nope', f'--workdir={tmp_path}'],
       "Unknown pretrain preset 'nope'"),
      (['train', '--config=configs/pretrain.py:tiny', f'--workdir={tmp_path}',
        '--config.model.hidden=-8'], 'model.hidden=-8 is invalid'),
      (['fly', f'--workdir={tmp_path}'], "Unknown command 'fly'"),
  ]:
    result = _cli(args, cwd=Path(__file__).parents[1])
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith('trainbig: error')]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert 'Traceback' not in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'trainbig_jax.cli', 'train', '--config=configs/pretrain.py:tiny',
       f'--workdir={workdir}', '--config.train.total_steps=100000',
       '--config.train.eval_every=100000', '--config.train.checkpoint_every=100000',
       '--config.train.log_every=1'],
      cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not any('train_loss' in r for r in read_metrics(workdir)):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert 'stopped by signal' in out
  step = max(r['step'] for r in read_metrics(workdir))
  assert int(checkpoint.params_step_dir(workdir).name) == step
