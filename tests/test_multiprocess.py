"""Multi-process training through jax.distributed: 2 local processes x 4 CPU devices each.

launch/local_multiprocess.py starts the processes; they form one 8-device job over loopback.
Checks: `trainbig train` finishes with both processes agreeing, metrics are written once,
checkpoints hold one data position (the job's, written once) and restore, and a folder
written with per-process data positions is refused in one line. Resuming on another process
count, a preempted process and a lost one: tests/test_elastic.py.

About 45 s of CPU time (one launch of 2 processes).
"""

import json
import shutil
import sys

import jax
import numpy as np
import pytest

from multiprocess_worker import LAUNCHER, launch, without_wall_time
from trainbig_jax.data import sources
from trainbig_jax.train import checkpoint, distributed
from trainbig_jax.train.metrics import read_metrics

TINY = ['--config=configs/pretrain.py:tiny', '--config.train.total_steps=6',
        '--config.train.eval_every=3', '--config.train.checkpoint_every=3',
        '--config.train.log_every=1', '--config.train.keep_checkpoints=5', '--json']


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


def test_checkpoint_holds_one_data_position_and_restores(trained, tmp_path):
  workdir, _ = trained
  data_dir = workdir / 'checkpoints' / '6' / 'data'
  # One position for the whole job, written by the primary process only.
  written = sorted(p.name for p in data_dir.iterdir() if p.name != 'commit_success.txt')
  assert written == [checkpoint.DATA_STATE_FILE]
  assert json.loads((data_dir / checkpoint.DATA_STATE_FILE).read_text())
  params = checkpoint.restore_params(workdir)  # this single process reads the 2-process save
  assert params['embed']['token']['embedding'].shape[1] == 32
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

  # A folder of an earlier version, one data position per process: refused in one line.
  old = tmp_path / 'old'
  shutil.copytree(workdir / 'checkpoints', old / 'checkpoints')
  for step in (3, 6):
    state = old / 'checkpoints' / str(step) / 'data' / checkpoint.DATA_STATE_FILE
    for k in range(2):
      shutil.copy(state, state.with_name(f'process_{k}-of-2.json'))
    state.unlink()
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'written by 2 processes with one data position per process.*only '
                           r'resume with that process count') as error:
    checkpoint.restore(checkpoint.manager(old), target_state=None)
  assert '\n' not in str(error.value)
  assert (old / 'checkpoints' / '6').is_dir()  # refused, not set aside as damaged


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
