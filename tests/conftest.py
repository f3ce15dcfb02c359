"""Test setup: 8 simulated CPU devices (so sharded code runs on every test) and a
session-wide data folder where the embedded corpora are prepared once.

`make test` runs the files on 2 pytest-xdist workers (`--dist loadfile`: a file's tests,
which share module fixtures, stay on one worker); the longest files are handed out first.
"""

import contextlib
import os
import shutil

# The tests' models are tiny: most of their time is XLA compiling, not running, and LLVM's
# lowest optimisation level compiles about a quarter faster (numerics are unchanged: no
# fast-math either way; matmuls are library calls). Commands the tests start inherit both.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'

import pytest  # noqa: E402


# The files that take longest (measured with --durations), first: the workers then finish
# at about the same time instead of one running the last long file alone.
LONGEST_FIRST = ('test_notebooks.py', 'test_sweep.py', 'test_faults.py',
                 'test_sweep_translate.py', 'test_finetune.py', 'test_elastic.py',
                 'test_real_data_train.py', 'test_teeth_train.py', 'test_errors.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


@pytest.fixture(scope='session', autouse=True)
def data_dir(tmp_path_factory):
  """TRAINBIG_DATA_DIR for the whole session (unless the caller set one to reuse).

  Under pytest-xdist the workers share one folder (beside their own temporary folders), so
  each corpus is prepared once; preparation holds a file lock (data/sources.py).
  """
  path = os.environ.get('TRAINBIG_TEST_DATA_DIR')
  if not path and os.environ.get('PYTEST_XDIST_WORKER'):
    shared = tmp_path_factory.getbasetemp().parent / 'tfds'
    shared.mkdir(exist_ok=True)
    path = str(shared)
  path = path or str(tmp_path_factory.mktemp('tfds'))
  old = os.environ.get('TRAINBIG_DATA_DIR')
  os.environ['TRAINBIG_DATA_DIR'] = path
  yield path
  if old is None:
    os.environ.pop('TRAINBIG_DATA_DIR', None)
  else:
    os.environ['TRAINBIG_DATA_DIR'] = old


@pytest.fixture(scope='session')
def unprivileged() -> list[str] | None:
  """A command prefix under which permission bits stop writes, or None where there is none.
  Root ignores them (its CAP_DAC_OVERRIDE capability): as root, commands run without it
  through setpriv; callers skip when it is None."""
  if os.geteuid() != 0:
    return []
  if shutil.which('setpriv') is None:
    return None
  caps = '-dac_override,-dac_read_search'
  return ['setpriv', f'--bounding-set={caps}', f'--inh-caps={caps}']


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


@pytest.fixture(scope='session')
def compilation_cache(tmp_path_factory):
  """A context manager: inside it, compiled XLA programs are kept in a folder of this session
  and reused, in this process and in the processes it starts. Runs that repeat a program
  (another seed, a compressed cell of the same shapes, the next CLI call of a notebook) then
  load it instead of compiling it again; results are unchanged (same program, same inputs).
  Opt-in: tests that count or inspect compilations keep compiling as they always did."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  # Every program is kept, however small or quick to compile.
  settings = {'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('xla_cache')),
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': -1}

  @contextlib.contextmanager
  def enabled():
    old = {name: getattr(jax.config, name) for name in settings}
    with pytest.MonkeyPatch.context() as mp:
      for name, value in settings.items():
        jax.config.update(name, value)
        mp.setenv(name.upper(), str(value))  # read by JAX in processes started from here
      cc.reset_cache()  # initialised again from the settings above at the next compile
      try:
        yield settings['jax_compilation_cache_dir']
      finally:
        for name, value in old.items():
          jax.config.update(name, value)
        cc.reset_cache()

  return enabled
