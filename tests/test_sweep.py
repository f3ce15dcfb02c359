"""A tiny 2-seed sweep under a FLOP budget end to end: every cell written, an interrupted
sweep resumes, both sizes stop at the same FLOP count, the report gives spreads and intervals."""

import json

import numpy as np

import pytest

from trainbig_jax.configs import sweep as sweep_configs
from trainbig_jax.experiments import report, sweep
from trainbig_jax.experiments.results import load_results


def tiny_sweep():
  c = sweep_configs.get_config('tiny')
  c.sparsities = (0.5,)
  c.bits = (8,)
  c.prune_quantize = ((0.5, 4),)
  c.seeds = 2
  c.budget = 'flops'
  return c


CELLS = ('dense', 'prune50', 'int8', 'prune50_int4')
EXPECTED = [f'{m}/{seed}{c}' for m in ('L1_H32', 'L2_H64') for seed in ('', 'seed1/')
            for c in CELLS]


@pytest.fixture(scope='module', autouse=True)
def reuse_compiled_programs(compilation_cache):
  """Both seeds of a size, and the cells of a size, run the same programs: compiled once."""
  with compilation_cache():
    yield


class Interrupted(Exception):
  pass


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A sweep interrupted after its third cell (and the first pretraining's per-sequence
  evaluation), then resumed to the end."""
  workdir = tmp_path_factory.mktemp('sweep')
  calls = []
  real_evaluate = sweep.evaluate_checkpoint

  def evaluate_then_fail(path, **kw):
    if len(calls) == 4:
      raise Interrupted()
    calls.append(str(path))
    return real_evaluate(path, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sweep, 'evaluate_checkpoint', evaluate_then_fail)
    with pytest.raises(Interrupted):
      sweep.run_sweep(tiny_sweep(), workdir, progress=lambda _: None)
  assert len(load_results(workdir)) == 3

  resumed_calls, trained = [], []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sweep, 'evaluate_checkpoint',
               lambda path, **kw: resumed_calls.append(str(path)) or real_evaluate(path, **kw))
    real_pretrain = sweep.pretrain
    mp.setattr(sweep, 'pretrain', lambda *a: trained.append(a) or real_pretrain(*a))
    sweep.run_sweep(tiny_sweep(), workdir, progress=lambda _: None)
  return workdir, calls, resumed_calls, trained


def test_every_cell_is_written_once(finished):
  workdir, _, _, _ = finished
  rows = load_results(workdir)
  cells = [r['cell'] for r in rows]
  expected = EXPECTED
  assert sorted(cells) == sorted(expected)
  assert sorted({(r['model'], r['seed']) for r in rows}) == [
      ('L1_H32', 0), ('L1_H32', 1), ('L2_H64', 0), ('L2_H64', 1)]
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
  assert len(first_calls) + len(resumed_calls) == 16 + 4  # cells + final pretraining evals
  # The first size's seed 0 was pretrained before the interruption; the rest train now.
  workdir = finished[0]
  assert [str(a[1].relative_to(workdir / 'runs')) for a in trained] == [
      'L1_H32/seed1/pretrain', 'L2_H64/pretrain', 'L2_H64/seed1/pretrain']


def test_seeds_differ_and_every_row_names_its_per_example_file(finished):
  workdir = finished[0]
  rows = load_results(workdir)
  losses = {}
  for r in rows:
    for key in ('examples', 'pretrain_examples'):
      with np.load(workdir / r[key]) as data:
        assert set(data.files) == {'loss', 'weight', 'correct'}
        if key == 'examples':  # the sums' ratio is the row's own metric
          assert data['correct'].sum() / data['weight'].sum() == pytest.approx(r['accuracy'])
          assert len(data['weight']) == 1275
        else:
          losses[r['model'], r['seed']] = data['loss'].sum() / data['weight'].sum()
  # Seeds change initialisation, data order and masking: different final losses.
  assert losses['L1_H32', 0] != losses['L1_H32', 1]
  assert not list(workdir.rglob('*.tmp'))


def test_flop_budget_stops_both_sizes_at_the_same_count_within_one_step(finished):
  rows = load_results(finished[0])
  budget = tiny_sweep().pretrain_budget_flops
  for r in rows:
    assert r['budget_kind'] == 'flops' and r['pretrain_stopped_by'] == 'budget'
    per_step = r['pretrain_flops'] / r['pretrain_steps']
    assert budget <= r['pretrain_flops'] < budget + per_step
    assert r['matmul_flops_per_s'] > 0 and r['pretrain_tokens'] > 0
  steps = {r['model']: r['pretrain_steps'] for r in rows}
  assert steps['L1_H32'] > 3 * steps['L2_H64']  # the same FLOPs buy the small model more steps


def test_report_from_the_sweep(finished):
  workdir = finished[0]
  path = report.write_report(workdir)
  claims = json.loads((workdir / 'claims.json').read_text())
  assert set(claims) == {'bigger_lower_loss_at_equal_time', 'bigger_more_robust_to_compression',
                         'compressed_big_beats_small_at_equal_size'}
  for name in ('loss_vs_time.png', 'prune_accuracy.png', 'quant_accuracy.png', 'frontier.png'):
    assert (workdir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  text = path.read_text()
  assert 'L2_H64' in text
  for key, c in claims.items():
    assert c['verdict'] in ('held', 'not held', 'undecided')
    assert c['budget']['kind'] == 'flops'
  loss = claims['bigger_lower_loss_at_equal_time']
  assert loss['rules'] == 'interval' and loss['interval'][0] <= loss['margin']
  assert loss['evidence']['comparisons'][0]['n_seeds'] == [2, 2]
  # Mean and sd over the two seeds, each cell's interval, and the budget spent.
  dense = next(l for l in text.splitlines() if l.startswith('| L2_H64 |') and '| dense |' in l)
  assert '| 2 |' in dense and dense.count('|') == 13 and '[' in dense
  assert 'Pretraining budget: **flops**' in text and 'GFLOP/s' in text
  strict = report.write_report(workdir, rules='strict')
  assert json.loads((workdir / 'claims.json').read_text())[
      'bigger_lower_loss_at_equal_time']['rules'] == 'strict' and strict == path


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
    ('seeds', 0, 'seeds=0 is invalid'),
    ('budget', 'joules', "budget='joules' is invalid; allowed: time, flops, tokens"),
    ('pretrain_budget_flops', -1.0, 'pretrain_budget_flops=-1.0 must be > 0 FLOPs'),
])
def test_bad_sweep_config(tmp_path, field, value, message):
  c = tiny_sweep()
  if field == 'pretrain_budget_s':
    c.budget = 'time'
  c[field] = value
  with pytest.raises(sweep.SweepError, match=message):
    sweep.run_sweep(c, tmp_path / 'x', progress=lambda _: None)
  assert not (tmp_path / 'x').exists()
