"""Test setup: 8 simulated CPU devices (so sharded code runs on every test) and a
session-wide data folder where the embedded corpora are prepared once."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import pytest  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def data_dir(tmp_path_factory):
  """TRAINBIG_DATA_DIR for the whole session (unless the caller set one to reuse)."""
  path = os.environ.get('TRAINBIG_TEST_DATA_DIR') or str(tmp_path_factory.mktemp('tfds'))
  old = os.environ.get('TRAINBIG_DATA_DIR')
  os.environ['TRAINBIG_DATA_DIR'] = path
  yield path
  if old is None:
    os.environ.pop('TRAINBIG_DATA_DIR', None)
  else:
    os.environ['TRAINBIG_DATA_DIR'] = old


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, data_dir):
  """A finished 8-step tiny pretraining run, checkpoints at steps 4 and 8; copy before changing."""
  from trainbig_jax.configs import pretrain as pretrain_configs
  from trainbig_jax.tasks.mlm import pretrain
  c = pretrain_configs.get_config('tiny')
  c.train.update(dict(total_steps=8, checkpoint_every=4, eval_every=4, log_every=1,
                      keep_checkpoints=5))
  workdir = tmp_path_factory.mktemp('tiny_run')
  pretrain(c, workdir)
  return workdir
