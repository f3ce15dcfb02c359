"""`trainbig train` of the tiny MLM preset (tasks.mlm.pretrain, the real data pipeline) as
one process of a job, with a fault injected on request and every batch it draws recorded.

Run as a script, one per process (`launch`, i.e. launch/local_multiprocess.py `--script`, or
started one by one by a test), or call `train` in the test's own process for a
single-process run:

  python tests/multiprocess_worker.py WORKDIR TOTAL_STEPS CHECKPOINT_EVERY MESH RUN [FAULT]

  python tests/multiprocess_worker.py vanish

makes process 1 SIGKILL itself as soon as the job has formed while the others wait for it at
a barrier, which only the distributed runtime's heartbeats can end.

MESH is the mesh shape, e.g. 1,8,1. RUN names this run of the folder in the record.
FAULT=SIGNAL:P:N (SIGTERM or SIGKILL) makes process P send itself SIGNAL while fetching the
(N+1)-th batch of this run (read-ahead off: the batch of step N+1 of a fresh run), as a
preempted or lost host would. Each process appends a
digest of every row of every batch it draws to WORKDIR.batches/process_P-of-N.jsonl;
`read_global_batches` puts the processes' blocks back together, so a test can check which
examples each run saw, in which order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainbig_jax.train import distributed

if __name__ == '__main__':  # before any other JAX call
  distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainbig_jax.configs import pretrain as pretrain_configs  # noqa: E402
from trainbig_jax.data import mlm  # noqa: E402
from trainbig_jax.tasks import mlm as mlm_task  # noqa: E402
from trainbig_jax.train import loop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / 'launch' / 'local_multiprocess.py'
WORKER = Path(__file__).resolve()


def row_digests(batch: dict[str, np.ndarray]) -> list[str]:
  """One short digest per row over everything the step reads (inputs, targets, weights)."""
  keys = sorted(batch)
  return [hashlib.sha1(b''.join(np.ascontiguousarray(batch[k][i]).tobytes() for k in keys))
          .hexdigest()[:16] for i in range(len(batch[keys[0]]))]


def record_dir(workdir: str | Path) -> Path:
  return Path(f'{workdir}.batches')


class RecordedBatches:
  """The train iterator, recording each batch drawn and signalling itself on request; its
  state is the pipeline's own, so any run (the CLI's too) resumes a folder it wrote."""

  def __init__(self, inner, record_path: Path, run: str,
               signal_at: tuple[int, int] | None = None):
    self._inner, self._drawn = inner, 0
    self._record_path, self._run, self._signal_at = record_path, run, signal_at

  def __next__(self) -> dict[str, np.ndarray]:
    if self._signal_at is not None and self._drawn == self._signal_at[1]:
      os.kill(os.getpid(), self._signal_at[0])
    batch = next(self._inner)
    self._drawn += 1
    with open(self._record_path, 'a') as f:
      f.write(json.dumps({'run': self._run, 'rows': row_digests(batch)}) + '\n')
    return batch

  def get_state(self) -> Any:
    return self._inner.get_state()

  def set_state(self, state: Any) -> None:
    self._inner.set_state(state)


def read_global_batches(workdir: str | Path) -> dict[str, list[list[str]]]:
  """run -> the global batches it drew, in order (row digests, the processes' blocks put
  together); a batch that not every process of the run drew (a crash) is left out."""
  by_run: dict[str, dict[int, list[list[str]]]] = {}
  counts = {}
  for path in sorted(record_dir(workdir).glob('process_*-of-*.jsonl')):
    index, count = (int(x) for x in path.stem[len('process_'):].split('-of-'))
    for line in path.read_text().splitlines():
      record = json.loads(line)
      counts.setdefault(record['run'], count)
      assert counts[record['run']] == count, f'run {record["run"]} reused'
      by_run.setdefault(record['run'], {}).setdefault(index, []).append(record['rows'])
  return {run: [[d for block in blocks for d in block]
                for blocks in zip(*(processes.get(i, []) for i in range(counts[run])))]
          for run, processes in by_run.items()}


def config(total_steps: int, checkpoint_every: int, mesh: tuple[int, ...]):
  c = pretrain_configs.get_config('tiny')
  c.train.total_steps = total_steps
  c.train.checkpoint_every = c.train.eval_every = checkpoint_every
  c.train.log_every = 1
  c.train.keep_checkpoints = 5
  c.mesh.shape = tuple(mesh)
  return c


def train(workdir: str | Path, total_steps: int, checkpoint_every: int,
          mesh: tuple[int, ...], run: str, fault: str | None = None) -> loop.Summary:
  """Trains (or resumes) the run in `workdir` on this process's job, recording its batches."""
  c = config(total_steps, checkpoint_every, mesh)
  signal_at = None
  if fault:
    name, process, drawn = fault.split(':')
    c.train.prefetch = 0  # the signal is timed by batch fetches, which read-ahead moves earlier
    if int(process) == jax.process_index():
      signal_at = (getattr(signal, name), int(drawn))
  records = record_dir(workdir)
  records.mkdir(parents=True, exist_ok=True)
  record_path = records / f'process_{jax.process_index()}-of-{jax.process_count()}.jsonl'
  make_iterator = mlm.pretrain_train_iterator

  def recorded_iterator(*args, **kwargs):
    return RecordedBatches(make_iterator(*args, **kwargs), record_path, run, signal_at)

  with contextlib.ExitStack() as stack:
    mlm.pretrain_train_iterator = recorded_iterator
    stack.callback(setattr, mlm, 'pretrain_train_iterator', make_iterator)
    return mlm_task.pretrain(c, workdir)


def launch(*args: str, processes: int = 2, devices: int = 4) -> list[dict]:
  """Runs launch/local_multiprocess.py with `args`; returns the JSON line each process
  printed last, by process index (the launch must succeed)."""
  cmd = [sys.executable, str(LAUNCHER), f'--processes={processes}',
         f'--devices_per_process={devices}', *args]
  # The timeout guards against a hang; a loaded machine can take minutes.
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ.copy())
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  summaries = {}
  for line in result.stdout.splitlines():
    match = re.match(r'\[p(\d+)\] (\{.*\})$', line)
    if match:
      summaries[int(match.group(1))] = json.loads(match.group(2))
  assert sorted(summaries) == list(range(processes)), result.stdout[-4000:]
  return [summaries[k] for k in range(processes)]


def without_wall_time(summary: dict) -> dict:
  return {k: v for k, v in summary.items() if k != 'wall_time_s'}


def max_abs_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def vanish() -> None:
  if jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
  distributed.barrier('trainbig_test:wait_for_process_1')


if __name__ == '__main__' and sys.argv[1:] == ['vanish']:
  vanish()
elif __name__ == '__main__':
  workdir, total_steps, checkpoint_every, mesh, run = sys.argv[1:6]
  summary = train(workdir, int(total_steps), int(checkpoint_every),
                  tuple(int(x) for x in mesh.split(',')), run, *sys.argv[6:7])
  print(json.dumps(summary.__dict__))
