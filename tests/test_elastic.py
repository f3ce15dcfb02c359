"""Elastic resume and a lost process, on the real MLM pipeline: tests/multiprocess_worker.py
runs tasks.mlm.pretrain (what `trainbig train` runs) on the tiny preset and records the rows
of every batch it draws.

Two jobs: 2 local processes x 4 CPU devices with fsdp=8, and this test's own process with its
8 devices as data=2 x fsdp=4. The reference is one uninterrupted 6-step run on 1 process.
- 2 -> 1: process 1 of a 2-process run is SIGKILLed while fetching the batch of step 5, and
  process 0 exits with an error within 60 s (at once: its collective fails). Rerun on 1
  process, the job resumes from its last complete checkpoint (step 3) and goes on to step 6.
  A process waiting at a barrier for one that vanished exits within 60 s too, told by the
  runtime's heartbeats (distributed.HEARTBEAT_TIMEOUT_S).
- 1 -> 2: the reference's checkpoint of step 3 resumes on 2 processes; one of them is
  preempted (SIGTERM) while fetching the batch of step 5, both stop after step 5 with a
  checkpoint, and the run ends on 1 process.
Both give the reference's losses at every step and its final parameters (1e-5), and each run
draws, from the step it resumed at, exactly the reference's global batches (row digests of
inputs, targets and mask weights): no example repeated or skipped, masks included.

About 130 s of CPU time (two 2-process jobs, three short runs in this process; a third job
waits out a heartbeat timeout meanwhile, idle).
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import multiprocess_worker as worker
from trainbig_jax.data import sources
from trainbig_jax.data.tokenizer import train_or_load_tokenizer
from trainbig_jax.train import checkpoint, distributed
from trainbig_jax.train.metrics import read_metrics

sys.path.insert(0, str(worker.LAUNCHER.parent))
import local_multiprocess  # noqa: E402

TOTAL, EVERY = 6, 3
TWO_PROCESSES = '1,8,1'  # fsdp=8 over 2 processes x 4 devices
ONE_PROCESS = (2, 4, 1)  # data=2 x fsdp=4 over this process's 8 devices
# A lost process is noticed after the heartbeat timeout; the rest is the error's way out.
LOST_PROCESS_LIMIT_S = 60
assert distributed.HEARTBEAT_TIMEOUT_S < LOST_PROCESS_LIMIT_S


@pytest.fixture(scope='module')
def tokenizer_file(tmp_path_factory) -> Path:
  # Made once, before any job: the processes of a fresh job would all build them at once.
  sources.prepare('trainbig_sotu')
  folder = tmp_path_factory.mktemp('tokenizer')
  train_or_load_tokenizer(worker.config(TOTAL, EVERY, ONE_PROCESS).data, str(folder))
  return folder / checkpoint.TOKENIZER_FILE


def new_run(folder: Path, tokenizer_file: Path) -> Path:
  workdir = folder / 'run'
  workdir.mkdir()
  shutil.copy(tokenizer_file, workdir / checkpoint.TOKENIZER_FILE)
  return workdir


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tokenizer_file) -> Path:
  workdir = new_run(tmp_path_factory.mktemp('reference'), tokenizer_file)
  summary = worker.train(workdir, TOTAL, EVERY, ONE_PROCESS, 'reference')
  assert summary.step == TOTAL and summary.stopped_by == 'steps'
  return workdir


def losses(workdir: Path) -> dict[tuple[str, int], float]:
  """(metric, step) -> value of every train and eval loss logged; each step once."""
  rows = [(key, r['step'], r[key]) for r in read_metrics(workdir)
          for key in ('train_loss', 'eval_loss') if key in r]
  out = {(key, step): value for key, step, value in rows}
  assert len(out) == len(rows), 'a step was logged twice'
  return out


def assert_same_as_reference(reference: Path, workdir: Path,
                             runs: dict[str, tuple[int, int]]) -> None:
  """`workdir` logged the reference's losses at every step and ended with its parameters, and
  each run (name -> (step it started at, steps it ran)) drew the reference's global batches
  from its start on."""
  want, got = losses(reference), losses(workdir)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-5), key
  diff = worker.max_abs_diff(checkpoint.restore_params(reference),
                             checkpoint.restore_params(workdir))
  assert diff < 1e-5, diff

  expected = worker.read_global_batches(reference)['reference']
  assert len(expected) >= TOTAL
  drawn = worker.read_global_batches(workdir)
  assert sorted(drawn) == sorted(runs)
  for run, (start, steps) in runs.items():
    assert len(drawn[run]) >= steps, run  # read-ahead may draw more than it trains on
    compared = min(len(drawn[run]), len(expected) - start)
    assert drawn[run][:compared] == expected[start:start + compared], run


def start_job(args: list[str], logs: Path, devices: int = 4) -> list[subprocess.Popen]:
  """The worker as the 2 processes of one job, each on its own (no launcher: it would stop
  the other as soon as one fails); their output goes to logs/p0.log and p1.log."""
  port = local_multiprocess.free_port()
  procs = []
  for k in range(2):
    env = local_multiprocess.process_env(os.environ, port=port, num_processes=2,
                                         process_id=k, devices_per_process=devices)
    with open(logs / f'p{k}.log', 'w') as log:
      procs.append(subprocess.Popen([sys.executable, str(worker.WORKER), *args], cwd=worker.ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def stop(*procs: subprocess.Popen) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def test_lost_process_stops_the_job_and_it_resumes_on_one_process(reference, tokenizer_file,
                                                                  tmp_path):
  workdir = new_run(tmp_path, tokenizer_file)
  survivor, lost = start_job([str(workdir), str(TOTAL), str(EVERY), TWO_PROCESSES, 'killed',
                              'SIGKILL:1:4'], tmp_path)
  try:
    lost.wait(timeout=600)  # a guard against a hang, not a measure
    died = time.monotonic()
    survivor.wait(timeout=LOST_PROCESS_LIMIT_S)
    waited = time.monotonic() - died
  finally:
    stop(survivor, lost)
  log = (tmp_path / 'p0.log').read_text()
  assert lost.returncode == -signal.SIGKILL, (tmp_path / 'p1.log').read_text()[-3000:]
  assert survivor.returncode not in (0, None), log[-3000:]
  assert waited < LOST_PROCESS_LIMIT_S
  # It was lost in the middle of the run: step 4 trained, step 3 the last checkpoint.
  assert [r['step'] for r in read_metrics(workdir) if 'train_loss' in r] == [1, 2, 3, 4]
  assert checkpoint.params_step_dir(workdir).name == '3'

  # The rerun, on 1 process with another mesh, continues from step 3.
  summary = worker.train(workdir, TOTAL, EVERY, ONE_PROCESS, 'rerun')
  assert summary.step == TOTAL and summary.stopped_by == 'steps'
  assert_same_as_reference(reference, workdir, {'killed': (0, 4), 'rerun': (3, 3)})


def test_one_process_run_resumes_on_two_processes(reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / 'checkpoints' / str(TOTAL))  # as if it had stopped after step 3
  p0, p1 = worker.launch(f'--script={worker.WORKER}', '--', str(workdir), str(TOTAL),
                         str(EVERY), TWO_PROCESSES, 'two', 'SIGTERM:1:1')  # at step 5
  assert worker.without_wall_time(p0) == worker.without_wall_time(p1)  # one job
  # Only process 1 was preempted; both stopped after the same step, with a checkpoint.
  assert p0['stopped_by'] == 'signal' and p0['step'] == 5
  assert checkpoint.params_step_dir(workdir).name == '5'

  summary = worker.train(workdir, TOTAL, EVERY, ONE_PROCESS, 'one')
  assert summary.step == TOTAL
  assert_same_as_reference(reference, workdir, {'two': (3, 2), 'one': (5, 1)})


@pytest.fixture(scope='module', autouse=True)
def vanishing_job(tmp_path_factory):
  """A 2-process job whose process 1 SIGKILLs itself at once while process 0 waits for it at
  a barrier. Started before this module's first test, it waits out the heartbeat timeout
  while they run; the last test looks at how it ended."""
  logs = tmp_path_factory.mktemp('vanish')
  survivor, lost = start_job(['vanish'], logs, devices=1)
  times = {}

  def watch():
    lost.wait()
    times['died'] = time.monotonic()
    survivor.wait()
    times['noticed'] = time.monotonic()

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  yield survivor, lost, times, logs, watcher
  stop(survivor, lost)


def test_a_vanished_process_is_noticed_by_its_missing_heartbeats(vanishing_job):
  # Outside a collective (here a barrier; on GPU and TPU a collective may simply block) only
  # the runtime's heartbeats tell that a process is gone.
  survivor, lost, times, logs, watcher = vanishing_job
  watcher.join(timeout=LOST_PROCESS_LIMIT_S + 120)  # from the start of the job, at worst
  log = (logs / 'p0.log').read_text()
  assert lost.returncode == -signal.SIGKILL, (logs / 'p1.log').read_text()[-3000:]
  assert 'noticed' in times, 'process 0 still waits for the vanished process'
  assert survivor.returncode != 0 and 'heartbeat' in log, log[-3000:]
  assert times['noticed'] - times['died'] < LOST_PROCESS_LIMIT_S
