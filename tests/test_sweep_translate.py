"""A translation sweep: encoder-decoders trained for one budget, compressed, decided on BLEU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainbig_jax import evaluate
from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.experiments import sweep, uncertainty
from trainbig_jax.experiments.report import write_report
from trainbig_jax.experiments.results import load_examples, load_results
from trainbig_jax.experiments.sweep import SweepError, check_sweep_config, run_sweep
from trainbig_jax.tasks import translate as translate_task
from trainbig_jax.train import loop


@pytest.fixture(scope='module')
def translation_sweep(tmp_path_factory):
  """The sweep's folder, and what its checkpoint evaluations ran: one per evaluated cell,
  each a single per-example pass over the validation split plus one decoding."""
  workdir = tmp_path_factory.mktemp('translate_sweep')
  calls = {'evaluate_checkpoint': 0, 'summed_pass': 0, 'per_example_pass': 0, 'decoding': 0}
  inside = []

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      if inside or name == 'evaluate_checkpoint':
        calls[name] += 1
      return fn(*args, **kwargs)
    return wrapper

  def evaluate_once(*args, **kwargs):
    inside.append(True)
    try:
      return counted('evaluate_checkpoint', evaluate.evaluate_checkpoint)(*args, **kwargs)
    finally:
      inside.pop()

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sweep, 'evaluate_checkpoint', evaluate_once)
    patch.setattr(loop, 'evaluate', counted('summed_pass', loop.evaluate))
    patch.setattr(evaluate, 'per_example_sums', counted('per_example_pass',
                                                        evaluate.per_example_sums))
    patch.setattr(translate_task, 'sentence_bleu_statistics',
                  counted('decoding', translate_task.sentence_bleu_statistics))
    run_sweep(sweep_configs.get_config('translate_tiny'), workdir, progress=lambda _: None)
  return workdir, calls


def test_each_cell_is_evaluated_once(translation_sweep):
  _, calls = translation_sweep
  cells = 2 * 3  # 2 sizes x (dense, prune50, int8); a run's dense cell is its final checkpoint
  assert calls == {'evaluate_checkpoint': cells, 'summed_pass': 0, 'per_example_pass': cells,
                   'decoding': cells}


def test_per_example_values_give_the_row_metrics(translation_sweep):
  workdir, _ = translation_sweep
  rows = {r['cell']: r for r in load_results(workdir)}
  for r in rows.values():
    values = load_examples(workdir, r['examples'])
    # BLEU of the summed per-sentence statistics is the row's (sacreBLEU corpus) BLEU.
    assert values['bleu'].shape == (8, 10)  # data.eval_examples sentences decoded
    assert uncertainty.bleu_statistic(values['bleu']) == pytest.approx(r['metric'], abs=1e-9)
    assert np.sum(values['loss']) / np.sum(values['weight']) == pytest.approx(r['eval_loss'])
  dense = rows['L1_H48/dense']
  assert dense['pretrain_examples'] == dense['examples']
  assert dense['pretrain_metric_name'] == 'eval_bleu'
  # The summed pass alone gives the same numbers the per-example pass derived.
  summed = evaluate.evaluate_checkpoint(workdir / 'runs' / 'L1_H48' / 'pretrain')
  assert summed['eval_loss'] == pytest.approx(dense['eval_loss'], rel=1e-5)
  assert summed['eval_accuracy'] == pytest.approx(dense['accuracy'], rel=1e-5)
  assert summed['eval_bleu'] == dense['metric']


def test_every_size_is_trained_compressed_and_scored_on_bleu(translation_sweep):
  translation_sweep, _ = translation_sweep
  rows = load_results(translation_sweep)
  assert sorted(r['cell'] for r in rows) == sorted(
      f'{m}/{c}' for m in ('L1_H32', 'L1_H48') for c in ('dense', 'prune50', 'int8'))
  for r in rows:
    assert r['task'] == 'translate' and r['metric_name'] == 'eval_bleu'
    assert r['higher_is_better'] and 0.0 <= r['metric'] <= 100.0
    # Rows carry the task's named metrics, not only the primary one.
    assert r['eval_bleu'] == r['metric'] and 0.0 <= r['eval_chrf'] <= 100.0
    assert r['eval_loss'] > 0.0
    assert r['majority_accuracy'] is None
    assert (translation_sweep / r['examples']).exists()
  # No fine-tuning stage: the cells compress the translation run itself.
  run = translation_sweep / 'runs' / 'L1_H48'
  assert not (run / 'finetune').exists()
  assert json.loads((run / 'compressed' / 'int8' / 'config.json').read_text())[
      'task_kind'] == 'translate'
  by_cell = {r['cell']: r for r in rows}
  dense, int8 = by_cell['L1_H48/dense'], by_cell['L1_H48/int8']
  # The shared embedding is quantized with the layer kernels: nearly everything is 8-bit.
  assert int8['stored_bytes'] < 0.35 * dense['stored_bytes']
  assert by_cell['L1_H48/prune50']['nonzero_params'] < dense['nonzero_params']


def test_report_decides_the_claims_on_bleu_with_intervals(translation_sweep):
  workdir, _ = translation_sweep
  write_report(workdir)
  claims = json.loads((workdir / 'claims.json').read_text())
  for key, claim in claims.items():
    assert claim['rules'] == 'interval' and 'rules_note' not in claim, key
    assert claim['verdict'] in ('held', 'not held', 'undecided')
  assert claims['bigger_more_robust_to_compression']['evidence']['metric'] == 'BLEU'
  assert claims['bigger_lower_loss_at_equal_time']['evidence']['metric'] == 'BLEU'
  report = (workdir / 'report.md').read_text()
  assert '| interval;' in report
  assert (workdir / 'frontier.png').exists()


def test_translation_sweep_has_no_flop_budget():
  c = sweep_configs.get_config('translate_tiny')
  c.budget = 'flops'
  c.pretrain_budget_flops = 1e9
  with pytest.raises(SweepError, match="translation sweep takes budget='time' or 'tokens'"):
    check_sweep_config(c)
