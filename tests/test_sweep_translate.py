"""A translation sweep: encoder-decoders trained for one budget, compressed, decided on BLEU."""

from __future__ import annotations

import json

import pytest

from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.experiments.report import write_report
from trainbig_jax.experiments.results import load_results
from trainbig_jax.experiments.sweep import SweepError, check_sweep_config, run_sweep


@pytest.fixture(scope='module')
def translation_sweep(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('translate_sweep')
  run_sweep(sweep_configs.get_config('translate_tiny'), workdir, progress=lambda _: None)
  return workdir


def test_every_size_is_trained_compressed_and_scored_on_bleu(translation_sweep):
  rows = load_results(translation_sweep)
  assert sorted(r['cell'] for r in rows) == sorted(
      f'{m}/{c}' for m in ('L1_H32', 'L1_H48') for c in ('dense', 'prune50', 'int8'))
  for r in rows:
    assert r['task'] == 'translate' and r['metric_name'] == 'eval_bleu'
    assert r['higher_is_better'] and 0.0 <= r['metric'] <= 100.0
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


def test_report_decides_the_claims_on_bleu(translation_sweep):
  write_report(translation_sweep)
  claims = json.loads((translation_sweep / 'claims.json').read_text())
  assert claims['bigger_more_robust_to_compression']['evidence']['metric'] == 'BLEU'
  assert (translation_sweep / 'frontier.png').exists()


def test_translation_sweep_has_no_flop_budget():
  c = sweep_configs.get_config('translate_tiny')
  c.budget = 'flops'
  c.pretrain_budget_flops = 1e9
  with pytest.raises(SweepError, match="translation sweep takes budget='time' or 'tokens'"):
    check_sweep_config(c)
