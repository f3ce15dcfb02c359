"""The training clock, resuming, and fine-tuning's starting point and best evaluation.

The clock is checked with a fake `time` in the loop: each training step takes exactly one
fake second, while compilation, evaluation and checkpointing each jump the fake clock by a
large, distinct amount. So `wall_time_s` equals the step count exactly when (and only when)
none of them is counted, whatever the machine's speed.

This is the one test module that names the task entry points (pretrain, finetune,
BestCheckpoint); if they move, only the imports below change.
"""

from __future__ import annotations

import os
import signal
import time as real_time

import jax
import numpy as np
import pytest

from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.train import checkpoint, loop
from trainbig_jax.train.metrics import read_metrics

# The task entry points: the only imports to change when they move.
from trainbig_jax.tasks.classify import finetune
from trainbig_jax.tasks.mlm import pretrain
from trainbig_jax.train.best import BestCheckpoint as _BestCheckpoint


def BestCheckpoint(workdir, min_step=0):
  """Fine-tuning's best-checkpoint keeper: by accuracy, highest first."""
  return _BestCheckpoint(workdir, 'eval_accuracy', 'max', min_step=min_step)

COMPILE_S, EVAL_S, SAVE_S = 1e6, 1e4, 1e3


class FakeClock:
  """`time` for the loop: perf_counter reads a clock that only the hooks below advance."""

  def __init__(self):
    self.now = 0.0
    self.steps = 0
    self.signal_at_step = None
    self.counted = {'compile': 0, 'eval': 0, 'save': 0}

  def perf_counter(self):
    return self.now

  def __getattr__(self, name):  # anything else from the real module
    return getattr(real_time, name)


class _TimedStep:
  def __init__(self, compiled, clock):
    self._compiled, self._clock = compiled, clock

  def __call__(self, *args, **kwargs):
    out = self._compiled(*args, **kwargs)
    clock = self._clock
    clock.now += 1.0
    clock.steps += 1
    if clock.steps == clock.signal_at_step:
      os.kill(os.getpid(), signal.SIGTERM)  # a preemption during this step
    return out


def install_clock(monkeypatch) -> FakeClock:
  c = FakeClock()
  monkeypatch.setattr(loop, 'time', c)
  original_compile = jax.stages.Lowered.compile

  def compile_(self, *args, **kwargs):
    c.now += COMPILE_S
    c.counted['compile'] += 1
    return _TimedStep(original_compile(self, *args, **kwargs), c)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_)
  original_eval, original_save = loop.evaluate, checkpoint.save

  def slow_eval(*args, **kwargs):
    c.now += EVAL_S
    c.counted['eval'] += 1
    return original_eval(*args, **kwargs)

  def slow_save(*args, **kwargs):
    c.now += SAVE_S
    c.counted['save'] += 1
    return original_save(*args, **kwargs)

  monkeypatch.setattr(loop, 'evaluate', slow_eval)
  monkeypatch.setattr(checkpoint, 'save', slow_save)
  return c


def tiny(**train):
  c = pretrain_configs.get_config('tiny')
  c.train.update(dict(total_steps=10, eval_every=1000, eval_every_s=3.0, checkpoint_every=4,
                      log_every=1, keep_checkpoints=5))
  c.train.update(train)
  return c


def train_rows(workdir):
  return [r for r in read_metrics(workdir) if 'train_loss' in r]


def eval_steps(workdir):
  return [r['step'] for r in read_metrics(workdir) if 'eval_loss' in r]


def _run_with_clock(workdir, config, signal_at_step=None):
  """pretrain under a fresh fake clock; returns (summary, clock)."""
  mp = pytest.MonkeyPatch()
  try:
    c = install_clock(mp)
    c.signal_at_step = signal_at_step
    summary = pretrain(config, workdir)
  finally:
    mp.undo()
  return summary, c


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  summary, c = _run_with_clock(workdir, tiny())
  return workdir, summary, c


def test_clock_excludes_compilation_evaluation_and_checkpointing(full_run):
  workdir, summary, c = full_run
  # Everything slow happened, under the fake clock ...
  assert c.counted['compile'] >= 1 and c.counted['eval'] >= 4 and c.counted['save'] >= 2
  assert c.now > COMPILE_S + 4 * EVAL_S
  # ... and none of it is on the training clock: one fake second per step, exactly.
  assert summary.step == 10 and summary.stopped_by == 'steps'
  assert summary.wall_time_s == 10.0
  rows = train_rows(workdir)
  assert [r['step'] for r in rows] == list(range(1, 11))
  assert [r['wall_time_s'] for r in rows] == [float(s) for s in range(1, 11)]
  assert np.all(np.diff([r['tokens'] for r in rows]) > 0)
  assert summary.tokens == rows[-1]['tokens']


def test_evaluations_by_training_clock_time(full_run):
  workdir, _, _ = full_run
  # eval_every_s=3: at 0 (start), after 3, 6 and 9 s of training, and at the end (10).
  assert eval_steps(workdir) == [0, 3, 6, 9, 10]
  evals = [r for r in read_metrics(workdir) if 'eval_loss' in r]
  assert [r['wall_time_s'] for r in evals] == [0.0, 3.0, 6.0, 9.0, 10.0]


def test_sigterm_and_resume_carry_the_clock_and_tokens_over(full_run, tmp_path):
  full_dir, _, _ = full_run
  full_tokens = {r['step']: r['tokens'] for r in train_rows(full_dir)}
  # Preempted during step 4: a checkpoint at step 4 with 4 s of training on its clock.
  first, _ = _run_with_clock(tmp_path, tiny(budget_s=7.0), signal_at_step=4)
  assert (first.stopped_by, first.step, first.wall_time_s) == ('signal', 4, 4.0)
  assert first.tokens == full_tokens[4]
  # The rerun resumes with the same clock and token count: the 7 s budget is the whole
  # run's, not 7 fresh seconds, and the evals follow the clock (6 s, then the end).
  second, c = _run_with_clock(tmp_path, tiny(budget_s=7.0))
  assert (second.stopped_by, second.step, second.wall_time_s) == ('budget', 7, 7.0)
  assert second.tokens == full_tokens[7]
  rows = train_rows(tmp_path)
  assert [r['step'] for r in rows] == list(range(1, 8))
  assert [r['wall_time_s'] for r in rows] == [float(s) for s in range(1, 8)]
  assert [r['tokens'] for r in rows] == [full_tokens[s] for s in range(1, 8)]
  assert eval_steps(tmp_path) == [0, 3, 6, 7]


# ----------------------------------------------------------------------------- config on resume

@pytest.mark.parametrize('field, value, allowed', [
    ('train.total_steps', 99, True),
    ('train.budget_s', 30.0, True),
    ('train.eval_every', 7, True),
    ('train.learning_rate', 1e-4, True),
    ('train.grad_accum_steps', 2, True),  # the same gradient, in more pieces
    ('train.batch_size', 32, False),  # the data position and token clock would not fit
    ('data.mask_rate', 0.2, False),
    ('data.seq_len', 16, False),
    ('data.num_eval_batches', 3, False),
    ('model.hidden', 64, False),
])
def test_resume_refuses_or_allows_config_changes_as_documented(tmp_path, field, value, allowed):
  old = tiny()
  checkpoint.write_config(tmp_path, old)
  new = tiny()
  section, name = field.split('.')
  new[section][name] = value
  if allowed:
    checkpoint.write_config(tmp_path, new)
    assert checkpoint.read_config(tmp_path)[section][name] == value
  else:
    before = (tmp_path / checkpoint.CONFIG_FILE).read_text()
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf'other {section} settings \({name}\); use a new --workdir'):
      checkpoint.write_config(tmp_path, new)
    assert (tmp_path / checkpoint.CONFIG_FILE).read_text() == before


# ----------------------------------------------------------------------------- fine-tuning

class _State:
  def __init__(self, value):
    self.params = {'w': np.full((3,), value, np.float32)}


def test_best_checkpoint_keeps_the_most_accurate_evaluation_not_the_latest(tmp_path):
  best = BestCheckpoint(tmp_path)
  for step, acc in ((0, 0.5), (10, 0.9), (20, 0.7), (30, 0.6)):
    best.consider(step, _State(float(step)), {'eval_accuracy': acc, 'eval_loss': 1.0,
                                              'step': step})
  best.close()
  assert checkpoint.params_step_dir(tmp_path).name == '10'
  np.testing.assert_array_equal(checkpoint.restore_params(tmp_path)['w'], [10.0] * 3)


def test_best_checkpoint_ignores_evaluations_before_min_step(tmp_path):
  best = BestCheckpoint(tmp_path, min_step=20)
  for step, acc in ((10, 0.99), (20, 0.6), (30, 0.7)):
    best.consider(step, _State(float(step)), {'eval_accuracy': acc, 'step': step})
  best.close()
  assert checkpoint.params_step_dir(tmp_path).name == '30'


def test_finetuning_starts_from_the_pretrained_encoder(full_run, tmp_path):
  pretrained_dir, _, _ = full_run
  c = finetune_configs.get_config('demo')
  c.max_len = 32
  c.train.update(dict(batch_size=16, total_steps=1, warmup_steps=5, eval_every=1,
                      checkpoint_every=1, budget_s=0.0))
  c.model.dropout = c.model.attention_dropout = 0.0
  finetune(c, pretrained_dir, tmp_path)
  pretrained = checkpoint.restore_params(pretrained_dir)
  # The schedule's first step has learning rate 0, so every kept checkpoint holds the
  # starting point: the encoder exactly as pretrained, plus a fresh classifier head.
  tuned = checkpoint.restore_params(tmp_path)
  assert 'classifier' in tuned and 'classifier' not in pretrained
  encoder = {k: v for k, v in tuned.items() if k != 'classifier'}
  for key in ('embed', 'layers_0', 'layers_1'):
    jax.tree.map(np.testing.assert_array_equal, encoder[key], pretrained[key])
  assert np.abs(np.asarray(pretrained['layers_0']['attention']['query']['kernel'])).max() > 0


def test_eval_step_runs_the_model_deterministically():
  from trainbig_jax.train.steps import make_eval_step
  calls = []

  def sums_fn(params, batch, rng, train):
    calls.append((train, np.asarray(jax.random.key_data(rng)).tolist()))
    return {'loss': params * batch}

  step = make_eval_step(sums_fn)
  assert step(2.0, 3.0) == {'loss': 6.0}
  step(2.0, 3.0)
  assert calls[0][0] is False  # no dropout at evaluation
  assert calls[0] == calls[1]  # and the same key every time


def test_non_finite_steps_are_counted_and_the_error_says_what_is_kept(caplog):
  import logging
  progress = {}
  metrics = {'train_loss': float('nan'), 'grad_norm': 1.5}
  with caplog.at_level(logging.WARNING):
    loop._count_nonfinite(7, metrics, progress, max_skips=2, last_checkpoint=4)
    loop._count_nonfinite(8, metrics, progress, max_skips=2, last_checkpoint=4)
  assert progress == {'nonfinite_in_a_row': 2, 'skipped_steps': 2}
  assert [r.getMessage() for r in caplog.records if 'not finite' in r.getMessage()] == [
      f'Step {n} is not finite (train_loss nan, grad_norm 1.5): update skipped ({n - 6} in a '
      f'row, {n - 6} in all).' for n in (7, 8)]
  with pytest.raises(loop.NonFiniteError) as err:
    loop._count_nonfinite(9, metrics, progress, max_skips=2, last_checkpoint=4)
  assert str(err.value) == (
      'step 9 is not finite (train_loss nan, grad_norm 1.5) after 2 skipped in a row; stopped '
      'without saving it, its last checkpoint (step 4) is kept. Lower train.learning_rate, or '
      'set train.max_nonfinite_skips to skip such steps.')
  with pytest.raises(loop.NonFiniteError, match=r'\(train_loss nan, grad_norm 1.5\); stopped '
                     r'without saving it, no checkpoint was saved yet\. Lower'):
    loop._count_nonfinite(1, metrics, {}, max_skips=0, last_checkpoint=None)


def test_progress_bar_on_a_terminal_counts_steps_and_clears_itself(monkeypatch):
  import io

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  monkeypatch.setattr('sys.stderr', Terminal())
  bar = loop._progress_bar(total=10, initial=3)
  try:
    assert not bar.disable and bar.unit == 'step' and bar.n == 3 and bar.total == 10
    assert bar.leave is False  # the evaluations' log lines follow, not a finished bar
    assert callable(bar.dynamic_ncols)  # its width follows the terminal's when resized
  finally:
    bar.close()


def test_damaged_steps_are_set_aside_under_fresh_names(tmp_path):
  steps = tmp_path / 'checkpoints'
  for attempt in range(3):
    (steps / '6').mkdir(parents=True)
    (steps / '6' / 'marker').write_text(str(attempt))
    aside = checkpoint._set_aside(steps / '6')
    assert aside == tmp_path / checkpoint.DAMAGED_DIR / ('6' if attempt == 0 else f'6.{attempt}')
    assert (aside / 'marker').read_text() == str(attempt) and not (steps / '6').exists()


def test_a_step_with_per_process_data_positions_is_refused_naming_the_counts(tmp_path):
  data = tmp_path / '6' / 'data'
  data.mkdir(parents=True)
  checkpoint._check_not_per_process(data)  # no data positions at all: nothing to refuse
  for name in ('process_0-of-2.json', 'process_1-of-2.json', 'process_0-of-4.json'):
    (data / name).write_text('{}')
  with pytest.raises(checkpoint.CheckpointError,
                     match=f'^{tmp_path / "6"} was written by 2 or 4 processes with one data '
                           'position per process'):
    checkpoint._check_not_per_process(data)
  (data / checkpoint.DATA_STATE_FILE).write_text('{}')
  checkpoint._check_not_per_process(data)  # the global stream's state: readable


def test_abandoned_read_errors_are_dropped_and_every_other_error_reaches_the_old_hook(
    monkeypatch):
  import sys
  seen = []
  monkeypatch.setattr(sys, 'excepthook', lambda *args: seen.append(args))
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(u))
  checkpoint.ignore_abandoned_reads()
  hooks = sys.excepthook, sys.unraisablehook
  # Every save and failed restore calls it: the hooks are wrapped once, not once per call
  # (a long run would otherwise nest them past Python's recursion limit).
  checkpoint.ignore_abandoned_reads()
  assert (sys.excepthook, sys.unraisablehook) == hooks
  other = ValueError('real')
  sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)
  sys.excepthook(ValueError, other, None)
  assert seen == [(ValueError, other, None)]


def test_abandoned_read_errors_are_dropped_while_the_restore_runs(tmp_path, monkeypatch,
                                                                  caplog):
  """The reports of a failed restore's other reads can be printed before the failure reaches
  the caller, so the hooks must be in place before each restore starts, not after."""
  import logging
  import sys
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # undone after the test
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  hooked_during = []

  def failing_read(*args, **kwargs):
    hooked_during.append(getattr(sys.excepthook, 'ignores_abandoned_reads', False))
    raise ValueError('OUT_OF_RANGE: torn file')

  def hooks_of_a_fresh_process():
    for hook in ('excepthook', 'unraisablehook'):
      monkeypatch.setattr(sys, hook, getattr(sys, f'__{hook}__'))

  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 1, {'w': np.ones(3, np.float32)}, {'pos': 1}, {'step': 1})
  hooks_of_a_fresh_process()
  monkeypatch.setattr(checkpoint, '_restore_params', failing_read)
  state_dir = tmp_path / 'checkpoints' / '1' / 'state'
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.restore_params(tmp_path)
  assert str(err.value) == (f'{state_dir} is damaged and cannot be read (OUT_OF_RANGE: torn '
                            'file); restore it from a copy or remove that step folder.')
  hooks_of_a_fresh_process()
  monkeypatch.setattr(checkpoint, '_restore_step', failing_read)
  with caplog.at_level(logging.WARNING):
    assert checkpoint.restore(mngr, {'w': np.zeros(3, np.float32)}) is None  # moved aside
  mngr.close()
  assert hooked_during == [True, True]
  (warning,) = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  assert f'checkpoints/1 does not restore (OUT_OF_RANGE: torn file): moved to' in warning
  # A step folder without its state item is named as incomplete.
  import shutil
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 2, {'w': np.ones(3, np.float32)}, {'pos': 2}, {'step': 2})
  mngr.close()
  shutil.rmtree(tmp_path / 'checkpoints' / '2' / 'state')
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.restore_params(tmp_path)
  assert str(err.value) == (f'{tmp_path}/checkpoints/2 is not a complete checkpoint: no state '
                            'item.')


def test_restore_falls_back_past_a_damaged_step_and_says_where_it_moved(tmp_path, caplog):
  import logging
  mngr = checkpoint.manager(tmp_path)
  for step in (1, 2):
    checkpoint.save(mngr, step, {'w': np.full(3, step, np.float32)}, {'pos': step},
                    {'step': step})
  (tmp_path / 'checkpoints' / '2' / 'data' / checkpoint.DATA_STATE_FILE).write_text('{"torn')
  with caplog.at_level(logging.WARNING):
    state, data_state, progress = checkpoint.restore(mngr, {'w': np.zeros(3, np.float32)})
  mngr.close()
  np.testing.assert_array_equal(state['w'], np.full(3, 1, np.float32))
  assert data_state == {'pos': 1} and progress == {'step': 1}
  warnings = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
  aside = tmp_path / checkpoint.DAMAGED_DIR / '2'
  assert len(warnings) == 1 and warnings[0].startswith(f'Checkpoint {tmp_path}/checkpoints/2 ')
  assert f'moved to {aside}; resuming from the previous checkpoint.' in warnings[0]
  assert aside.is_dir() and not (tmp_path / 'checkpoints' / '2').exists()


@pytest.mark.parametrize('mine,other,expected', [
    ((False, False), (False, False), (False, False)),
    ((False, False), (True, False), (True, False)),   # the other process is over its budget
    ((False, True), (False, False), (False, True)),   # this one was signalled
    ((True, False), (False, True), (True, True)),
])
def test_processes_stop_together_when_any_one_has_a_reason(monkeypatch, mine, other, expected):
  from jax.experimental import multihost_utils
  sent = []

  def allgather(x):  # two processes: this one's vote and the other's, stacked
    sent.append(np.asarray(x).tolist())
    return np.stack([np.asarray(x), np.array(other, np.int32)])

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  assert loop._agree_to_stop(*mine) == expected
  assert sent == [list(map(int, mine))]


def test_restore_of_a_named_step_and_the_params_as_host_arrays(tmp_path):
  mngr = checkpoint.manager(tmp_path)
  for step in (1, 2):  # device arrays, as training saves them
    checkpoint.save(mngr, step, {'params': {'w': jax.numpy.full(3, step, np.float32)}}, {}, {})
  target = {'params': {'w': np.zeros(3, np.float32)}}
  state, _, _ = checkpoint.restore(mngr, target, step=1)  # not the latest
  mngr.close()
  np.testing.assert_array_equal(state['params']['w'], np.full(3, 1, np.float32))
  params = checkpoint.restore_params(tmp_path)  # the run's latest step, as numpy arrays
  assert type(params['w']) is np.ndarray
  np.testing.assert_array_equal(params['w'], np.full(3, 2, np.float32))


def test_a_failed_save_says_why_and_which_checkpoint_is_intact(tmp_path, monkeypatch):
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 2, {'w': np.zeros(3, np.float32)}, {}, {})

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(mngr, 'save', disk_full)
  with pytest.raises(checkpoint.CheckpointSaveError) as err:
    checkpoint.save(mngr, 3, {'w': np.ones(3, np.float32)}, {}, {})
  mngr.close()
  assert str(err.value) == (
      f'Saving checkpoint step 3 in {tmp_path}/checkpoints failed (No space left on device); '
      'checkpoint step 2 is intact: free space or fix permissions, then rerun to resume.')


def test_the_jitted_train_step_lays_out_its_inputs_whatever_they_arrive_as():
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from trainbig_jax.train import partitioning
  from trainbig_jax.train.state import TrainState
  mesh = partitioning.make_mesh((-1, 1, 1))
  tx = optax.sgd(0.1)
  sums_fn = lambda p, b, rng, train: {'loss': jnp.sum(p['w'] * b['x']), 'correct': 0.0,
                                      'weight': 1.0, 'tokens': 1.0}
  params = {'w': jnp.ones(4, jnp.float32)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  step = loop.jit_train_step(sums_fn, tx, 1, shardings, mesh)
  # Abstract inputs without shardings: the step's own in_shardings decide the layout, so a
  # host batch is split over the devices, not copied whole onto each.
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  compiled = step.lower(abstract(state), abstract({'x': np.ones((8, 4), np.float32)}),
                        jax.random.key(0)).compile()
  (_, batch_in, _), _ = compiled.input_shardings
  assert batch_in['x'].is_equivalent_to(partitioning.batch_sharding(mesh), 2)
  assert not batch_in['x'].is_fully_replicated and len(jax.devices()) == 8


def test_only_the_abandoned_writes_of_an_unfinished_save_are_dropped_from_asyncio_logs(
    monkeypatch):
  import logging
  import sys
  import orbax.checkpoint as ocp
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # the reads' hook, undone after
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  asyncio_logger = logging.getLogger('asyncio')
  before = list(asyncio_logger.filters)
  # As before any save of this process (earlier tests' saves installed it already).
  others = [f for f in before if not isinstance(f, checkpoint._AbandonedWriteFilter)]
  asyncio_logger.filters[:] = others
  try:
    checkpoint.ignore_abandoned_writes()
    checkpoint.ignore_abandoned_writes()  # installed once, however often a save runs
    (added,) = [f for f in asyncio_logger.filters if f not in others]
    tmp = '/run/checkpoints/7' + ocp.path.atomicity.TMP_DIR_SUFFIX + '1'

    def record(msg, exc):
      info = (type(exc), exc, None) if exc is not None else None
      return logging.LogRecord('asyncio', logging.ERROR, __file__, 1, msg, None, info)

    assert not added.filter(record('Task exception was never retrieved',
                                   OSError(f'No space left on device: {tmp}/state')))
    assert added.filter(record('Task exception was never retrieved',
                               OSError('No space left on device: /run/other')))
    assert added.filter(record('Unclosed client session', OSError(f'{tmp}/state')))
    assert added.filter(record('Task exception was never retrieved', None))
  finally:
    asyncio_logger.filters[:] = before


def test_the_params_of_a_run_are_its_best_step_else_its_newest_and_none_is_an_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.params_step_dir(tmp_path)
  assert str(err.value) == (f'{tmp_path} has no complete checkpoint under '
                            f'{tmp_path}/checkpoints.')
  mngr = checkpoint.manager(tmp_path)
  for step in (3, 5):
    checkpoint.save(mngr, step, {'w': np.zeros(2, np.float32)}, {}, {})
  mngr.close()
  assert checkpoint.params_step_dir(tmp_path) == tmp_path / 'checkpoints' / '5'
  best = BestCheckpoint(tmp_path)
  best.consider(4, type('State', (), {'params': {'w': np.ones(2, np.float32)}})(),
                {'eval_accuracy': 0.5})
  best.close()
  assert checkpoint.params_step_dir(tmp_path) == tmp_path / checkpoint.BEST_DIR / '4'


def test_failure_gist_keeps_the_status_line_or_the_first_200_characters():
  gist = checkpoint.failure_gist
  tensorstore = ValueError(
      'Error opening "zarr" driver: DATA_LOSS: Error reading local file "/run/x/0.0": '
      'Unexpected end of data [source locations=\'tensorstore/a.cc:1\'] {"driver": "zarr"}')
  assert gist(tensorstore) == 'DATA_LOSS: Error reading local file "/run/x/0.0": Unexpected end of data'
  assert gist(RuntimeError('wrapped UNKNOWN:   no\n detail [at]')) == 'UNKNOWN: no detail'
  assert gist(OSError('[Errno 28] No space left on device: /run/x')) == 'No space left on device'
  long = 'x' * 150 + ' ' + 'y' * 150
  assert gist(ValueError(long)) == long[:200]
  assert gist(KeyError()) == 'KeyError'  # no text at all: the exception's type


def test_evaluation_sums_are_averaged_over_their_weight_and_an_empty_split_is_an_error():
  assert loop.summed_metrics({'loss': 3.0, 'correct': 1.0, 'weight': 1.0}) == {
      'eval_loss': 3.0, 'eval_accuracy': 1.0}
  assert loop.summed_metrics({'loss': 6.0, 'correct': 3.0, 'weight': 4.0}) == {
      'eval_loss': 1.5, 'eval_accuracy': 0.75}
  assert loop.summed_metrics({'loss': 0.0, 'correct': 0.0, 'weight': 0.0}) == {
      'eval_loss': 0.0, 'eval_accuracy': 0.0}  # nothing weighed: no division by zero
  with pytest.raises(ValueError) as err:
    loop.evaluate(lambda params, batch: {}, None, [], mesh=None)
  assert str(err.value) == 'The evaluation split gave no batches.'


def test_a_refused_resume_names_every_changed_setting_of_the_section(tmp_path):
  checkpoint.write_config(tmp_path, tiny())
  new = tiny()
  new.data.mask_rate, new.data.seq_len = 0.2, 16
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.write_config(tmp_path, new)
  assert str(err.value) == (f'{tmp_path} holds a run with other data settings (mask_rate, '
                            'seq_len); use a new --workdir or the same config.')


def test_the_checkpoint_manager_keeps_only_the_newest_steps(tmp_path):
  mngr = checkpoint.manager(tmp_path, keep=2)
  for step in range(1, 6):
    checkpoint.save(mngr, step, {'w': np.full(2, step, np.float32)}, {}, {})
  mngr.close()
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [4, 5]


def test_a_save_that_returns_has_written_its_step_even_an_older_one(tmp_path):
  # Orbax skips, without a word, a step its save policy does not want (one older than the
  # newest); a save that returns must have written the step it was given.
  mngr = checkpoint.manager(tmp_path)
  for step in (5, 3):
    checkpoint.save(mngr, step, {'w': np.full(2, step, np.float32)}, {}, {})
  assert sorted(mngr.all_steps()) == [3, 5]
  state, _, _ = checkpoint.restore(mngr, {'w': np.zeros(2, np.float32)}, step=3)
  mngr.close()
  np.testing.assert_array_equal(state['w'], np.full(2, 3, np.float32))


def test_all_finite_is_true_without_floating_point_leaves():
  from trainbig_jax.train.steps import all_finite
  assert bool(all_finite({})) and bool(all_finite({'n': np.int32(3)}))
  assert bool(all_finite({'n': np.int32(3), 'x': np.ones(2, np.float32)}))
  assert not bool(all_finite({'n': np.int32(3), 'x': np.array([1.0, np.inf], np.float32)}))


def test_the_train_step_trains_in_training_mode_and_reports_the_gradient_norm():
  import jax.numpy as jnp
  import optax
  from trainbig_jax.train.state import TrainState
  from trainbig_jax.train.steps import make_train_step
  modes = []

  def sums_fn(params, batch, rng, train):
    modes.append(train)
    return {'loss': jnp.sum(params['w'] * batch['x']), 'correct': jnp.float32(1.0),
            'weight': jnp.float32(2.0), 'tokens': jnp.float32(8.0)}

  tx = optax.sgd(0.5)
  params = {'w': jnp.zeros(2, jnp.float32)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  x = np.array([3.0, 4.0], np.float32)
  new, metrics = make_train_step(sums_fn, tx, 1)(state, {'x': x}, jax.random.key(0))
  assert modes == [True]  # dropout on: the model is called for training
  grad = x / 2.0  # the loss sum's gradient over its weight
  assert float(metrics['grad_norm']) == pytest.approx(float(np.linalg.norm(grad)))
  np.testing.assert_allclose(new.params['w'], -0.5 * grad)
  assert bool(metrics['finite']) and int(new.step) == 1
