"""Fault tolerance: non-finite steps, one writer per folder, damaged files, full disks, kills."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from damage import largest_array_file, truncate_array_files

from trainbig_jax.compress import storage
from trainbig_jax.compress.checkpoints import compress_checkpoint, load_checkpoint_params
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.experiments import sweep
from trainbig_jax.train import checkpoint, loop, runlock
from trainbig_jax.tasks.classify import finetune
from trainbig_jax.train.metrics import read_metrics
from trainbig_jax.tasks.mlm import pretrain

ROOT = Path(__file__).resolve().parents[1]


def tiny(**train):
  c = pretrain_configs.get_config('tiny')
  c.train.update(dict(total_steps=8, checkpoint_every=4, eval_every=4, log_every=1,
                      keep_checkpoints=5))
  c.train.update(train)
  return c


@pytest.fixture(scope='module')
def run(tiny_run):
  """A finished 8-step run with checkpoints at steps 4 and 8 (copied, never changed)."""
  return tiny_run


def _copy(run, tmp_path) -> Path:
  target = tmp_path / 'run'
  shutil.copytree(run, target)
  return target


def _saved_params(workdir: Path) -> dict[int, dict]:
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  return {s: checkpoint._restore_params(workdir / 'checkpoints' / str(s) / 'state')
          for s in steps}


def _cli(args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, '-m', 'trainbig_jax.cli', *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, **kwargs)


def _error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith('trainbig: error')]


# ------------------------------------------------------------------ numeric blow-ups


def test_non_finite_step_stops_with_its_number_and_saves_nothing_non_finite(run, tmp_path):
  c = tiny(learning_rate=1e30, warmup_steps=0, checkpoint_every=1, total_steps=20)
  c.data.tokenizer_path = str(run / 'tokenizer.model')
  with pytest.raises(loop.NonFiniteError, match=r'step (\d+) is not finite.*stopped without '
                     r'saving it, its last checkpoint \(step \d+\) is kept') as e:
    pretrain(c, tmp_path)
  saved = _saved_params(tmp_path)
  stopped_at = int(str(e.value).split()[1])
  assert saved and max(saved) == stopped_at - 1
  for params in saved.values():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_non_finite_steps_are_skipped_and_counted_up_to_k_in_a_row(run, tmp_path):
  c = tiny(learning_rate=1e30, warmup_steps=0, checkpoint_every=1, total_steps=20,
           max_nonfinite_skips=2)
  c.data.tokenizer_path = str(run / 'tokenizer.model')
  with pytest.raises(loop.NonFiniteError, match=r'after 2 skipped in a row'):
    pretrain(c, tmp_path)
  rows = [r for r in read_metrics(tmp_path) if 'train_loss' in r]
  skipped = [r for r in rows if r.get('skipped_steps')]
  assert [r['skipped_steps'] for r in skipped] == [1, 2]
  assert all(not np.isfinite(r['train_loss']) or not np.isfinite(r['grad_norm'])
             for r in skipped)
  saved = _saved_params(tmp_path)
  # A skipped step keeps the parameters: the checkpoints of skipped steps equal the one before.
  last_good = skipped[0]['step'] - 1
  for step in (skipped[0]['step'], skipped[1]['step']):
    jax.tree.map(np.testing.assert_array_equal, saved[step], saved[last_good])
  for params in saved.values():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ------------------------------------------------------------------ one writer per folder


def _hold_lock(folder: Path) -> subprocess.Popen:
  code = ('import sys, time\nfrom trainbig_jax.train import runlock\n'
          'with runlock.hold(sys.argv[1]):\n  print("held", flush=True)\n  time.sleep(600)\n')
  proc = subprocess.Popen([sys.executable, '-c', code, str(folder)], stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_writer_is_refused_and_a_stale_lock_does_not_block(run, tmp_path):
  workdir = _copy(run, tmp_path)
  sweep_dir = tmp_path / 'sweep'
  metrics_before = (workdir / 'metrics.jsonl').read_bytes()
  holders = [_hold_lock(workdir), _hold_lock(sweep_dir)]
  try:
    with pytest.raises(runlock.RunFolderBusyError,
                       match=rf'being written by another live process \(pid {holders[0].pid} '):
      pretrain(tiny(total_steps=12), workdir)
    with pytest.raises(runlock.RunFolderBusyError, match=rf'pid {holders[1].pid} '):
      sweep.run_sweep(sweep_configs.get_config('tiny'), sweep_dir, progress=lambda _: None)
  finally:
    for proc in holders:
      proc.kill()  # SIGKILL: the lock file stays behind, naming a dead process
      proc.wait()
  assert (workdir / 'metrics.jsonl').read_bytes() == metrics_before
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['4', '8']
  assert not (sweep_dir / sweep.SWEEP_FILE).exists()
  assert str(holders[0].pid) in (workdir / runlock.LOCK_FILE).read_text()
  with runlock.hold(workdir):  # the stale lock does not block
    assert f'pid {os.getpid()} ' in (workdir / runlock.LOCK_FILE).read_text()


# ------------------------------------------------------------------ damaged files


def _garble_data_position(step_dir: Path) -> None:
  (step_dir / 'data' / 'metadata').write_text('{"torn')


@pytest.mark.parametrize('damage', [truncate_array_files, _garble_data_position])
def test_resume_falls_back_past_a_damaged_checkpoint(run, tmp_path, caplog, damage):
  workdir = _copy(run, tmp_path)
  damage(workdir / 'checkpoints' / '8')
  with caplog.at_level(logging.WARNING):
    summary = pretrain(tiny(), workdir)
  assert summary.step == 8
  warnings = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  assert len(warnings) == 1 and f'{workdir}/checkpoints/8 does not restore' in warnings[0]
  assert f'moved to {workdir / checkpoint.DAMAGED_DIR / "8"};' in warnings[0]  # where to look
  assert (workdir / checkpoint.DAMAGED_DIR / '8').is_dir()
  jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(workdir),
               checkpoint.restore_params(run))
  assert [r['step'] for r in read_metrics(workdir) if 'train_loss' in r] == list(range(1, 9))


@pytest.fixture(scope='module')
def damaged(run, tmp_path_factory):
  """A copy of the run whose newest step has its array files truncated (damage.py: why
  truncated, and why all of them)."""
  workdir = tmp_path_factory.mktemp('damaged') / 'run'
  shutil.copytree(run, workdir)
  truncate_array_files(workdir / 'checkpoints' / '8')
  return workdir


def test_eval_of_a_damaged_checkpoint_is_one_line(damaged):
  result = _cli(['eval', f'--checkpoint={damaged}'])
  assert result.returncode == 2, result.stderr
  assert _error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]]
  assert f'{damaged}/checkpoints/8/state is damaged' in _error_lines(result.stderr)[0]
  assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr


def test_compress_and_finetune_of_a_damaged_checkpoint_fail_naming_it(damaged, tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(checkpoint.CheckpointError, match=f'{damaged}/checkpoints/8/state is '
                     'damaged'):
    compress_checkpoint(damaged, compress_configs.get_config('int8'), out)
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(checkpoint.CheckpointError, match=f'{damaged}/checkpoints/8/state is '
                     'damaged'):
    finetune(finetune_configs.get_config('demo'), damaged, out)
  assert list(tmp_path.iterdir()) == []


def test_a_garbled_config_names_the_file(run, tmp_path):
  workdir = _copy(run, tmp_path)
  (workdir / 'config.json').write_text('{"model": ')
  with pytest.raises(checkpoint.CheckpointError, match=f'{workdir}/config.json is damaged'):
    checkpoint.read_config(workdir)


def test_altered_compressed_payload_fails_its_checksum(run, tmp_path):
  out = tmp_path / 'int8'
  compress_checkpoint(run, compress_configs.get_config('int8'), out)
  manifest = json.loads((out / 'compressed' / storage.MANIFEST_FILE).read_text())
  assert all(len(info['sha256']) == 64 for leaf in manifest['leaves']
             for info in leaf['arrays'].values())
  load_checkpoint_params(out)  # intact: loads
  # Rewrite one payload array with one code changed: a well-formed file, altered bytes.
  import orbax.checkpoint as ocp
  arrays_dir = out / 'compressed' / storage.ARRAYS_DIR
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    arrays = ckptr.restore(arrays_dir)
  values = arrays['layers_0']['attention']['query']['kernel']['values']
  values = np.asarray(values).copy()
  values.flat[0] ^= 1
  arrays['layers_0']['attention']['query']['kernel']['values'] = values
  shutil.rmtree(arrays_dir)
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
    ckptr.save(arrays_dir, args=ocp.args.StandardSave(arrays))
  with pytest.raises(storage.CompressedCheckpointError,
                     match=r"'values' of 'layers_0/attention/query/kernel' .* does not match "
                           r'its checksum'):
    load_checkpoint_params(out)


def test_sweep_cuts_a_torn_results_line_before_appending(tmp_path):
  path = tmp_path / sweep.RESULTS_FILE
  path.write_text(json.dumps({'cell': 'a'}) + '\n' + '{"cell": "b", "acc')
  sweep._append_result(tmp_path, {'cell': 'b'})
  assert [json.loads(l)['cell'] for l in path.read_text().splitlines()] == ['a', 'b']


# ------------------------------------------------------------------ full disk, no permission


def _no_space(workdir: Path, unprivileged: list[str] | None) -> list[str]:
  """A file size limit (RLIMIT_FSIZE, set by the shell: no fork-time code in this
  multithreaded process) of half the step's largest array file: that file cannot be written
  again, while metrics lines and small metadata files fit."""
  limit_kib = largest_array_file(workdir / 'checkpoints' / '8').stat().st_size // 2048
  assert limit_kib > 16
  return ['bash', '-c', f'ulimit -f {limit_kib} && exec "$@"', 'bash']


def _no_permission(workdir: Path, unprivileged: list[str] | None) -> list[str]:
  """checkpoints/ without write permission (the run folder itself stays writable)."""
  if unprivileged is None:
    pytest.skip('running as root without setpriv: permission bits cannot stop a write')
  (workdir / 'checkpoints').chmod(0o555)
  return unprivileged


@pytest.mark.parametrize('limit,reason', [(_no_space, 'File too large'),
                                          (_no_permission, 'Permission denied')])
def test_a_save_that_cannot_be_written_stops_in_one_line_and_keeps_the_previous(
    run, tmp_path, unprivileged, limit, reason):
  workdir = _copy(run, tmp_path)
  prefix = limit(workdir, unprivileged)
  # The first save (step 9) fails; no evaluation comes before it (nothing else to compile).
  args = ['train', '--config=configs/pretrain.py:tiny', f'--workdir={workdir}',
          '--config.train.total_steps=9', '--config.train.checkpoint_every=1',
          '--config.train.eval_every=1000', '--config.train.log_every=1',
          '--config.train.keep_checkpoints=5']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  try:
    result = subprocess.run([*prefix, sys.executable, '-m', 'trainbig_jax.cli', *args], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
  finally:
    (workdir / 'checkpoints').chmod(0o755)
  assert result.returncode == 2, result.stderr
  # The one line is all: the save's abandoned writes report nothing, before it or after
  # (an 'Event loop is closed' traceback, asyncio's 'exception was never retrieved').
  line, = _error_lines(result.stderr)
  assert result.stderr.strip().splitlines()[-1] == line, result.stderr
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved'):
    assert noise not in result.stderr, result.stderr
  assert f'Saving checkpoint step 9 in {workdir}/checkpoints failed ({reason}); checkpoint ' \
      'step 8 is intact' in line
  assert checkpoint.params_step_dir(workdir).name == '8'
  jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(workdir),
               checkpoint.restore_params(run))


# ------------------------------------------------------------------ SIGKILL harness


def test_fault_harness_short_mode(tmp_path):
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  try:
    import faults
  finally:
    sys.path.pop(0)
  status = faults.main(['--scenario=train,compress', '--kills=3', '--short',
                        f'--workdir={tmp_path}'])
  assert status == 0
