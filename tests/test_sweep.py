"""A tiny sweep end to end: every cell written, an interrupted sweep resumes, the report."""

import json

import pytest

from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.experiments import report, sweep
from trainbig_jax.experiments.results import load_results


def tiny_sweep():
  c = sweep_configs.get_config('tiny')
  c.sparsities = (0.5,)
  c.bits = (8,)
  c.prune_quantize = ((0.5, 4),)
  return c


class Interrupted(Exception):
  pass


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A sweep interrupted after its third cell, then resumed to the end."""
  workdir = tmp_path_factory.mktemp('sweep')
  calls = []
  real_evaluate = sweep.evaluate_checkpoint

  def evaluate_then_fail(path):
    if len(calls) == 3:
      raise Interrupted()
    calls.append(str(path))
    return real_evaluate(path)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sweep, 'evaluate_checkpoint', evaluate_then_fail)
    with pytest.raises(Interrupted):
      sweep.run_sweep(tiny_sweep(), workdir, progress=lambda _: None)
  assert len(load_results(workdir)) == 3

  resumed_calls, trained = [], []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sweep, 'evaluate_checkpoint',
               lambda path: resumed_calls.append(str(path)) or real_evaluate(path))
    real_pretrain = sweep.pretrain
    mp.setattr(sweep, 'pretrain', lambda *a: trained.append(a) or real_pretrain(*a))
    sweep.run_sweep(tiny_sweep(), workdir, progress=lambda _: None)
  return workdir, calls, resumed_calls, trained


def test_every_cell_is_written_once(finished):
  workdir, _, _, _ = finished
  rows = load_results(workdir)
  cells = [r['cell'] for r in rows]
  expected = [f'{m}/{c}' for m in ('L1_H32', 'L2_H64')
              for c in ('dense', 'prune50', 'int8', 'prune50_int4')]
  assert sorted(cells) == sorted(expected)
  lines = (workdir / 'results.jsonl').read_text().splitlines()
  assert len(lines) == len(expected)  # nothing evaluated twice
  by_cell = {r['cell']: r for r in rows}
  for model in ('L1_H32', 'L2_H64'):
    dense, pruned = by_cell[f'{model}/dense'], by_cell[f'{model}/prune50']
    assert dense['stored_bytes'] == dense['dense_fp32_bytes'] == 4 * dense['total_params']
    assert pruned['nonzero_params'] < dense['nonzero_params']
    assert by_cell[f'{model}/int8']['stored_bytes'] < dense['stored_bytes']
    assert 0.0 <= dense['accuracy'] <= 1.0
    # Written by the sweep (not defaulted on load): the task's primary metric.
    assert '"metric_name": "eval_accuracy"' in lines[0] and '"higher_is_better": true' in lines[0]
    assert (dense['metric_name'], dense['metric']) == ('eval_accuracy', dense['accuracy'])
  assert by_cell['L2_H64/dense']['total_params'] > by_cell['L1_H32/dense']['total_params']


def test_resume_skips_finished_cells_and_runs(finished):
  _, first_calls, resumed_calls, trained = finished
  assert not set(first_calls) & set(resumed_calls)
  assert len(first_calls) + len(resumed_calls) == 8
  # The first size was pretrained before the interruption; only the second trains now.
  assert [str(a[1]).split('/')[-2] for a in trained] == ['L2_H64']


def test_report_from_the_sweep(finished):
  workdir = finished[0]
  path = report.write_report(workdir)
  claims = json.loads((workdir / 'claims.json').read_text())
  assert set(claims) == {'bigger_lower_loss_at_equal_time', 'bigger_more_robust_to_compression',
                         'compressed_big_beats_small_at_equal_size'}
  for name in ('loss_vs_time.png', 'prune_accuracy.png', 'quant_accuracy.png', 'frontier.png'):
    assert (workdir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'L2_H64' in path.read_text()


def test_a_changed_sweep_config_refuses_the_folder(finished):
  c = tiny_sweep()
  c.sizes = ((1, 32),)
  with pytest.raises(sweep.SweepError, match='other settings'):
    sweep.run_sweep(c, finished[0], progress=lambda _: None)


@pytest.mark.parametrize('field, value, message', [
    ('sizes', ((2, -1),), 'positive ints'),
    ('sparsities', (1.0,), 'sparsity 1.0'),
    ('bits', (9,), 'bits 9'),
    ('pretrain_budget_s', 0.0, 'must be > 0'),
])
def test_bad_sweep_config(tmp_path, field, value, message):
  c = tiny_sweep()
  c[field] = value
  with pytest.raises(sweep.SweepError, match=message):
    sweep.run_sweep(c, tmp_path / 'x', progress=lambda _: None)
  assert not (tmp_path / 'x').exists()
