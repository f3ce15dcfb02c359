"""The one train loop: every task (trainbig_jax/tasks) runs through `run`.

It stops at `train.total_steps` or when the training clock reaches `train.budget_s`, whichever
comes first (the paper compares model sizes at equal wall-clock); `train.budget_flops` and
`train.budget_tokens` stop it, within one step, at a machine-independent budget instead (the
FLOPs are the task's analytic count, carried in the checkpointed progress). The clock counts
only training steps (data loading included): compilation, evaluation and checkpointing are
excluded. SIGTERM (a preempted job) saves a checkpoint and returns cleanly; a rerun with the
same workdir resumes at the same step and data position.

A step with a non-finite loss, gradient norm or update is never applied (see steps.py): the run
stops there naming the step, keeping its last checkpoint, or with `train.max_nonfinite_skips`
= K it skips such steps, counting them, and stops at the (K+1)-th in a row.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from trainbig_jax.train import checkpoint, distributed, partitioning, runlock
from trainbig_jax.train.metrics import MetricWriter
from trainbig_jax.train.prefetch import DevicePrefetch
from trainbig_jax.train.state import (TrainState, abstract_state, create_sharded_state,
                                      learning_rate_schedule)
from trainbig_jax.train.steps import SumsFn, make_eval_step, make_train_step

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Job:
  """What differs between tasks; the loop does the rest."""
  config: ml_collections.ConfigDict
  workdir: Path
  sums_fn: SumsFn
  init_params: Callable[[jax.Array], Any]  # rng -> boxed params (logical axis names)
  train_iterator: Iterator[Batch]  # grain iterator: get_state() / set_state()
  eval_batches: Callable[[], Iterable[Batch]]
  tx: optax.GradientTransformation
  # Called after each evaluation with (step, state, eval metrics); fine-tuning keeps its best.
  on_eval: Callable[[int, TrainState, dict[str, float]], None] | None = None
  # Task metrics beyond the summed ones (e.g. BLEU from decoding): params -> {name: value},
  # called under the mesh after each evaluation and merged into its metrics.
  extra_metrics: Callable[[Any], dict[str, float]] | None = None
  # Analytic training FLOPs of one optimizer step (train/flops.py); 0 when the task does not
  # count them, which rules out train.budget_flops.
  flops_per_step: float = 0.0


@dataclasses.dataclass
class Summary:
  step: int
  wall_time_s: float
  tokens: float
  eval_loss: float | None
  eval_accuracy: float | None
  stopped_by: str  # 'steps' | 'budget' | 'signal'
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the last evaluation
  flops: float = 0.0  # analytic training FLOPs (0 when the task does not count them)


class NonFiniteError(ValueError):
  """Training produced a non-finite loss, gradient norm or parameter update."""


def _count_nonfinite(step: int, metrics: dict[str, Any], progress: dict[str, Any],
                     max_skips: int, last_checkpoint: int | None) -> None:
  """Counts a skipped non-finite step in `progress`; raises once there were too many in a row."""
  progress['nonfinite_in_a_row'] = progress.get('nonfinite_in_a_row', 0) + 1
  progress['skipped_steps'] = progress.get('skipped_steps', 0) + 1
  what = f'train_loss {metrics["train_loss"]}, grad_norm {metrics["grad_norm"]}'
  if progress['nonfinite_in_a_row'] > max_skips:
    kept = (f'its last checkpoint (step {last_checkpoint}) is kept' if last_checkpoint is not None
            else 'no checkpoint was saved yet')
    in_a_row = (f' after {max_skips} skipped in a row' if max_skips else '')
    raise NonFiniteError(
        f'step {step} is not finite ({what}){in_a_row}; stopped without saving it, {kept}. '
        f'Lower train.learning_rate, or set train.max_nonfinite_skips to skip such steps.')
  logging.warning('Step %d is not finite (%s): update skipped (%d in a row, %d in all).', step,
                  what, progress['nonfinite_in_a_row'], progress['skipped_steps'])


class _StopFlag:
  """Set by SIGTERM/SIGINT so the loop can checkpoint before exiting."""

  def __init__(self):
    self.signal_name = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _progress_bar(total: int, initial: int):
  # A live bar on a terminal, nothing in log files (evaluations are logged instead).
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
              disable=not sys.stderr.isatty(), leave=False)


def _agree_to_stop(over_budget: bool, signalled: bool) -> tuple[bool, bool]:
  """Each process's reasons to stop, OR-ed over all processes.

  Every process times its own steps and gets its own signals; if one left the loop while
  another ran one more step, both would wait forever in mismatched collectives. One tiny
  all-gather a step makes them stop together; a single process skips it.
  """
  if jax.process_count() == 1:
    return over_budget, signalled
  from jax.experimental import multihost_utils
  votes = multihost_utils.process_allgather(np.array([over_budget, signalled], np.int32))
  over_budget, signalled = np.asarray(votes).reshape(-1, 2).any(axis=0)
  return bool(over_budget), bool(signalled)


def evaluate(eval_step, params, batches: Iterable[Batch], mesh) -> dict[str, float]:
  totals = None
  for batch in batches:
    sums = eval_step(params, partitioning.global_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if totals is None:
    raise ValueError('The evaluation split gave no batches.')
  return summed_metrics(jax.device_get(totals))


# The metrics every task's evaluation sums give (the loss and correct sums over their weight).
SUMMED_METRICS = ('eval_loss', 'eval_accuracy')


def summed_metrics(totals: dict[str, Any]) -> dict[str, float]:
  """SUMMED_METRICS of evaluation sums totalled over a split."""
  weight = max(float(totals['weight']), 1.0)
  return {'eval_loss': float(totals['loss']) / weight,
          'eval_accuracy': float(totals['correct']) / weight}


def jit_train_step(sums_fn: SumsFn, tx: optax.GradientTransformation, accum_steps: int,
                   state_shardings: Any, mesh) -> Any:
  """The jitted train step of a run: state in place (donated), batch over data x fsdp."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(
      make_train_step(sums_fn, tx, accum_steps),
      in_shardings=(state_shardings, partitioning.batch_sharding(mesh), replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))


@runlock.holds_run_folder(lambda job: job.workdir)
def run(job: Job) -> Summary:
  config, tc = job.config, job.config.train
  workdir = Path(job.workdir)
  # Processes meet before their first collective, which on CPU gives up after 30 s.
  distributed.barrier(f'trainbig:run:{workdir.absolute()}')
  mesh = partitioning.make_mesh(config.mesh.shape)
  rules = partitioning.LOGICAL_AXIS_RULES
  state, state_shardings = create_sharded_state(
      job.init_params, job.tx, mesh, jax.random.key(config.seed))

  mngr = checkpoint.manager(workdir, keep=tc.keep_checkpoints)
  progress = {'wall_time_s': 0.0, 'tokens': 0.0, 'flops': 0.0}
  budget_flops, budget_tokens = tc.get('budget_flops', 0.0), tc.get('budget_tokens', 0.0)
  if budget_flops and not job.flops_per_step:
    raise ValueError(f'train.budget_flops={budget_flops!r} needs a task that counts its '
                     f'FLOPs (mlm); use train.budget_tokens or train.budget_s.')
  restored = checkpoint.restore(mngr, abstract_state(state_shardings, state))
  if restored is not None:
    state, data_state, progress = restored
    job.train_iterator.set_state(data_state)
    progress.setdefault('flops', 0.0)  # checkpoints written before FLOPs were counted
    logging.info('Resumed from step %d of %s.', int(state.step), workdir)
  step = int(state.step)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0,
                        resume_step=step if restored is not None else None)

  replicated = NamedSharding(mesh, P())
  train_step = jit_train_step(job.sums_fn, job.tx, tc.grad_accum_steps, state_shardings, mesh)
  eval_step = jax.jit(make_eval_step(job.sums_fn),
                      in_shardings=(state_shardings.params, partitioning.batch_sharding(mesh)),
                      out_shardings=replicated)
  dropout_rng = jax.random.key(config.seed + 1)
  schedule_lr = learning_rate_schedule(tc)

  def run_eval(state):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      metrics = evaluate(eval_step, state.params, job.eval_batches(), mesh)
      if job.extra_metrics is not None:
        metrics.update(job.extra_metrics(state.params))
    row = {'step': int(state.step), 'wall_time_s': progress['wall_time_s'], **metrics}
    writer.write(row)
    metrics = {**metrics, 'step': row['step']}
    progress['last_eval'] = metrics  # saved with the next checkpoint
    logging.info('step %d  wall %.1fs  %s', row['step'], row['wall_time_s'],
                 '  '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k != 'step'))
    if job.on_eval is not None:
      job.on_eval(int(state.step), state, metrics)
    return metrics

  # Batches go to the devices while the previous step runs; its state is what was consumed.
  batches = DevicePrefetch(job.train_iterator, mesh, tc.get('prefetch', 2))

  def save(state):
    checkpoint.save(mngr, int(state.step), state, batches.get_state(), progress)

  # The evaluation saved with the restored checkpoint: when it is of that very step (a run
  # killed after its last save), a rerun neither repeats it nor logs that step twice.
  last_eval = progress.get('last_eval')
  stopped_by = 'steps'
  # Evaluations by training-clock time as well as by steps: a learning curve over wall-clock
  # gets evenly spaced points whatever the model's speed.
  eval_every_s = tc.get('eval_every_s', 0.0)
  next_eval_s = eval_every_s * (progress['wall_time_s'] // eval_every_s + 1) if eval_every_s else 0
  with _StopFlag() as stop, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if restored is None:
      last_eval = run_eval(state)
    compiled = None
    bar = _progress_bar(tc.total_steps, step)
    while step < tc.total_steps:
      over_budget, signalled = _agree_to_stop(
          (bool(tc.budget_s) and progress['wall_time_s'] >= tc.budget_s)
          or (bool(budget_flops) and progress['flops'] >= budget_flops)
          or (bool(budget_tokens) and progress['tokens'] >= budget_tokens),
          stop.signal_name is not None)
      if over_budget:
        stopped_by = 'budget'
        break
      if signalled:
        stopped_by = 'signal'
        break
      t0 = time.perf_counter()
      batch = next(batches)
      if compiled is None:  # compile outside the training clock
        compiled = train_step.lower(state, batch, dropout_rng).compile()
        t0 = time.perf_counter()
      state, metrics = compiled(state, batch, dropout_rng)
      metrics = jax.device_get(metrics)  # waits for the step: the clock sees real work
      dt = time.perf_counter() - t0
      step += 1
      progress['wall_time_s'] += dt
      progress['tokens'] += float(metrics['tokens'])
      progress['flops'] += job.flops_per_step
      if not metrics['finite']:
        _count_nonfinite(step, metrics, progress, tc.get('max_nonfinite_skips', 0),
                         mngr.latest_step())
      elif progress.get('nonfinite_in_a_row'):
        progress['nonfinite_in_a_row'] = 0
      bar.update(1)
      bar.set_postfix(loss=f'{metrics["train_loss"]:.3f}',
                      tok_s=f'{metrics["tokens"] / max(dt, 1e-9):,.0f}')
      if step % tc.log_every == 0 or step == tc.total_steps:
        writer.write({'step': step, 'wall_time_s': progress['wall_time_s'],
                      'tokens': progress['tokens'], 'flops': progress['flops'],
                      'train_loss': metrics['train_loss'],
                      'train_accuracy': metrics['train_accuracy'],
                      'grad_norm': metrics['grad_norm'],
                      'learning_rate': float(schedule_lr(step - 1)),
                      **({'skipped_steps': progress['skipped_steps']}
                         if progress.get('skipped_steps') else {})})
      if step % tc.eval_every == 0 or (eval_every_s and progress['wall_time_s'] >= next_eval_s):
        last_eval = run_eval(state)
        if eval_every_s:  # the next multiple of eval_every_s after the clock
          next_eval_s = eval_every_s * (progress['wall_time_s'] // eval_every_s + 1)
      if step % tc.checkpoint_every == 0:
        save(state)
    bar.close()
    evaluated_last_step = last_eval is not None and last_eval.get('step') == step
    if not evaluated_last_step and stopped_by != 'signal':
      last_eval = run_eval(state)
    if mngr.latest_step() != step:
      save(state)
  batches.close()
  mngr.close()
  writer.close()
  if stopped_by == 'signal':
    logging.warning('Stopped by %s at step %d; checkpoint saved, rerun to resume.',
                    stop.signal_name or 'a signal to another process', step)
  return Summary(step=step, wall_time_s=progress['wall_time_s'], tokens=progress['tokens'],
                 eval_loss=last_eval and last_eval.get('eval_loss'),
                 eval_accuracy=last_eval and last_eval.get('eval_accuracy'), stopped_by=stopped_by,
                 metrics={k: v for k, v in (last_eval or {}).items() if k != 'step'},
                 flops=progress['flops'])

