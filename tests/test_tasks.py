"""The task registry: names, the task of a run config (old run folders included), and
best-checkpoint keeping by a task's primary metric and direction."""

import json
import types

import ml_collections
import numpy as np
import pytest

from trainbig_jax import tasks
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.train import checkpoint
from trainbig_jax.train.best import BestCheckpoint


def test_registry_names_and_primary_metrics():
  assert set(tasks.TASKS) >= {'mlm', 'classify'}
  for name in tasks.TASKS:
    task = tasks.get_task(name)
    assert task.NAME == name
    assert task.PRIMARY_MODE in ('max', 'min')
    assert task.PRIMARY_METRIC.startswith('eval_')
    # Every member of the Task protocol (evaluate and the sweep call them all).
    methods = [m for m, v in vars(tasks.Task).items() if callable(v) and not m.startswith('_')]
    assert 'per_example_metrics_fn' in methods
    for member in [*tasks.Task.__annotations__, *methods]:
      assert hasattr(task, member), (name, member)
  assert (tasks.get_task('mlm').PRIMARY_METRIC, tasks.get_task('mlm').PRIMARY_MODE) == (
      'eval_loss', 'min')
  assert (tasks.get_task('classify').PRIMARY_METRIC,
          tasks.get_task('classify').PRIMARY_MODE) == ('eval_accuracy', 'max')


def test_unknown_task_is_one_clear_error():
  with pytest.raises(tasks.UnknownTaskError, match=r"task_kind='summarize' is unknown; "
                                                   r'allowed: mlm, classify'):
    tasks.get_task('summarize')


def _as_saved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as a run folder's config.json gives it back."""
  return ml_collections.ConfigDict(json.loads(config.to_json()))


def test_task_of_new_and_old_run_configs():
  pre, ft = pretrain_configs.get_config('tiny'), finetune_configs.get_config('demo')
  assert tasks.task_name(_as_saved(pre)) == 'mlm'
  assert tasks.task_name(_as_saved(ft)) == 'classify'
  # Folders written before `task_kind` existed: a pretraining config has no task field, a
  # fine-tuning one names its dataset in `task`.
  old_pre, old_ft = _as_saved(pre).to_dict(), _as_saved(ft).to_dict()
  del old_pre['task_kind'], old_ft['task_kind']
  assert old_ft['task'] == 'rotten_tomatoes'
  assert tasks.task_of(ml_collections.ConfigDict(old_pre)).NAME == 'mlm'
  assert tasks.task_of(ml_collections.ConfigDict(old_ft)).NAME == 'classify'


@pytest.mark.parametrize('mode, kept', [('max', 2), ('min', 3)])
def test_best_checkpoint_keeps_the_best_in_the_metrics_direction(tmp_path, mode, kept):
  best = BestCheckpoint(tmp_path, 'eval_bleu', mode)
  scores = {1: 10.0, 2: 30.0, 3: 5.0, 4: 20.0}
  for step, score in scores.items():
    state = types.SimpleNamespace(params={'w': np.full((2,), float(step), np.float32)})
    best.consider(step, state, {'eval_bleu': score, 'eval_loss': 1.0, 'step': step})
  best.close()
  step_dir = checkpoint.params_step_dir(tmp_path)
  assert step_dir.parent.name == checkpoint.BEST_DIR and int(step_dir.name) == kept
  assert json.loads((step_dir / 'metrics' / 'metrics').read_text())['eval_bleu'] == scores[kept]
  np.testing.assert_array_equal(checkpoint.restore_params(tmp_path)['w'], [kept, kept])


def test_best_checkpoint_rejects_an_unknown_direction(tmp_path):
  with pytest.raises(ValueError, match="mode='up' is invalid; allowed: max, min"):
    BestCheckpoint(tmp_path, 'eval_bleu', 'up')
