"""Multi-process training through jax.distributed: 2 local processes x 4 CPU devices each.

launch/local_multiprocess.py starts the processes; they form one 8-device job over loopback.
Checks: the run finishes with both processes agreeing, metrics are written once, checkpoints
hold each process's own data position and restore, a resumed run is exact, and on batches that
do not depend on the process count the result equals a 1-process x 8-device run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from trainbig_jax.data import sources
from trainbig_jax.train import checkpoint
from trainbig_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / 'launch' / 'local_multiprocess.py'
WORKER = ROOT / 'tests' / 'multiprocess_worker.py'
TINY = ['--config=configs/pretrain.py:tiny', '--config.train.total_steps=6',
        '--config.train.eval_every=3', '--config.train.checkpoint_every=3',
        '--config.train.log_every=1', '--config.train.keep_checkpoints=5', '--json']


def launch(*args: str, processes: int = 2, devices: int = 4) -> list[dict]:
  """Runs the launcher; returns the JSON line each process printed, by process index."""
  cmd = [sys.executable, str(LAUNCHER), f'--processes={processes}',
         f'--devices_per_process={devices}', *args]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=os.environ.copy())
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  summaries = {}
  for line in result.stdout.splitlines():
    match = re.match(r'\[p(\d+)\] (\{.*\})$', line)
    if match:
      summaries[int(match.group(1))] = json.loads(match.group(2))
  assert sorted(summaries) == list(range(processes)), result.stdout[-4000:]
  return [summaries[k] for k in range(processes)]


def max_abs_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def without_wall_time(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if k != 'wall_time_s'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  # Prepared here, once: processes of a fresh job would otherwise all build it at once.
  sources.prepare('trainbig_sotu')
  workdir = tmp_path_factory.mktemp('mp') / 'run'
  return workdir, launch('--', 'train', *TINY, f'--workdir={workdir}')


def test_two_processes_train_agree_and_write_metrics_once(trained):
  workdir, (p0, p1) = trained
  assert without_wall_time(p0) == without_wall_time(p1)  # one job, not two
  assert p0['step'] == 6 and p0['stopped_by'] == 'steps'
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows if 'train_loss' in r] == [1, 2, 3, 4, 5, 6]
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 3, 6]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss']
  assert evals[-1]['eval_loss'] == pytest.approx(p0['eval_loss'])
  train_rows = [r for r in rows if 'train_loss' in r]
  assert train_rows[-1]['tokens'] == p0['tokens'] == 6 * 16 * 32  # every row of the global batch


def test_checkpoint_holds_each_process_position_and_restores(trained):
  workdir, _ = trained
  step_dir = workdir / 'checkpoints' / '6'
  for k in range(2):
    assert json.loads((step_dir / 'data' / f'process_{k}-of-2.json').read_text())
  params = checkpoint.restore_params(workdir)  # this single process reads the 2-process save
  assert params['embed']['token']['embedding'].shape[1] == 32
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  # Resuming the run with another process count cannot continue its data: a clear refusal.
  with pytest.raises(checkpoint.CheckpointError, match='another number of processes'):
    checkpoint.restore(checkpoint.manager(workdir), target_state=None)


def test_resumed_two_process_run_is_exact(trained, tmp_path):
  full_dir, (full, _) = trained
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(full_dir, resumed_dir)
  shutil.rmtree(resumed_dir / 'checkpoints' / '6')  # as if stopped right after step 3
  p0, p1 = launch('--', 'train', *TINY, f'--workdir={resumed_dir}')
  assert without_wall_time(p0) == without_wall_time(p1)
  assert p0['eval_loss'] == full['eval_loss']
  assert max_abs_diff(checkpoint.restore_params(resumed_dir),
                      checkpoint.restore_params(full_dir)) == 0.0
  losses = lambda d: [(r['step'], r['train_loss']) for r in read_metrics(d) if 'train_loss' in r]
  assert losses(resumed_dir) == losses(full_dir)


def test_same_global_batches_give_the_one_process_result(tmp_path):
  """2 processes x 4 devices == 1 process x 8 devices when the global batches are equal; a
  2-process run resumed mid-way (each process restoring its own data state) is exact too."""
  sys.path.insert(0, str(WORKER.parent))
  import multiprocess_worker

  two = tmp_path / 'two'
  p0, p1 = launch(f'--script={WORKER}', '--', str(two), '6', '3')
  assert without_wall_time(p0) == without_wall_time(p1)

  resumed = tmp_path / 'resumed'
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  launch(f'--script={WORKER}', '--', str(resumed), '6', '3')
  assert max_abs_diff(checkpoint.restore_params(resumed), checkpoint.restore_params(two)) == 0.0

  one = multiprocess_worker.train(tmp_path / 'one', 6, 3)  # this pytest process: 8 devices
  assert jax.process_count() == 1 and jax.device_count() == 8
  assert one.eval_loss == pytest.approx(p0['eval_loss'], abs=1e-5)
  diff = max_abs_diff(checkpoint.restore_params(tmp_path / 'one'),
                      checkpoint.restore_params(two))
  assert diff < 1e-5, diff
