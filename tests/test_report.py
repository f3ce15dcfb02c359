"""Sweep results -> claims verdicts, report, figures and size/compression recommendation.

All data here is synthetic with a known answer, so every verdict is checked in both
directions and the recommendation against a hand-computed choice.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from matplotlib import image as mpl_image

from trainbig_jax.experiments import claims as claims_lib
from trainbig_jax.experiments import plan as plan_lib
from trainbig_jax.experiments import report as report_lib
from trainbig_jax.experiments import results as results_lib
from trainbig_jax.experiments.claims import CLAIM_KEYS, evaluate_claims

LOSS, ROBUST, EQUAL_SIZE = CLAIM_KEYS
SMALL, BIG = 'L2_H32', 'L4_H64'
PARAMS = {SMALL: 100_000, BIG: 800_000}
SPARSITIES = (0.25, 0.5, 0.75, 0.9)
BITS = (8, 4, 2)


def stored_bytes(params: int, sparsity: float, bits: int) -> int:
  """Kept weights at `bits` bits plus a 1-bit mask when pruned."""
  kept = round(params * (1 - sparsity))
  return kept * bits // 8 + (params // 8 if sparsity > 0 else 0)


def make_results(dense=None, prune_drop=None, quant_drop=None, params=None,
                 methods=('dense', 'prune', 'quantize')) -> list[dict]:
  """Rows like `trainbig sweep` writes. Default: the big model is better and more robust."""
  params = params or PARAMS
  dense = dense or {SMALL: 0.80, BIG: 0.90}
  prune_drop = prune_drop or {SMALL: lambda s: 0.3 * s, BIG: lambda s: 0.05 * s}
  quant_drop = quant_drop or {SMALL: lambda b: 0.1 * 8 / b, BIG: lambda b: 0.01 * 8 / b}
  rows = []
  for i, (m, n) in enumerate(params.items()):
    base = dict(model=m, layers=2 * (i + 1), hidden=32 * 2 ** i, total_params=n,
                pretrain_budget_s=60.0, pretrain_steps=1000 // (i + 1), pretrain_wall_s=60.0,
                pretrain_eval_loss=5.0 - i, dense_fp32_bytes=4 * n, eval_loss=None,
                extra_key_from_the_future={'ok': True})
    cells = [('dense', 0.0, 32, dense[m])]
    if 'prune' in methods:
      cells += [('prune', s, 32, dense[m] - prune_drop[m](s)) for s in SPARSITIES]
    if 'quantize' in methods:
      cells += [('quantize', 0.0, b, dense[m] - quant_drop[m](b)) for b in BITS]
    for method, s, b, acc in cells:
      rows.append(base | dict(method=method, sparsity=s, bits=b,
                              nonzero_params=round(n * (1 - s)),
                              stored_bytes=stored_bytes(n, s, b), accuracy=acc,
                              cell=f'{m}/{method}/s{s}/b{b}'))
  return rows


def power_curve(a: float, b: float, c: float, times) -> dict:
  times = [float(t) for t in times]
  return {'step': [10 * (i + 1) for i in range(len(times))], 'wall_time_s': times,
          'eval_loss': [a * t ** -b + c for t in times]}


def make_curves(big_lower: bool = True) -> dict:
  # The small model's evals end earlier (30 s), so that is the common time.
  small = power_curve(2.0, 0.5, 4.0, [10, 20, 30])
  big = power_curve(4.0, 0.5, 3.0 if big_lower else 4.5, [12, 24, 36])
  return {SMALL: small, BIG: big}


def write_sweep(d: Path, rows: list[dict], curves: dict) -> Path:
  d.mkdir(parents=True, exist_ok=True)
  (d / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  for m, c in curves.items():
    run = d / 'runs' / m / 'pretrain'
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, t, loss in zip(c['step'], c['wall_time_s'], c['eval_loss']):
      # Train lines and unknown keys must be ignored by load_curves.
      lines.append({'step': step, 'wall_time_s': t - 0.5, 'tokens': step * 512,
                    'train_loss': loss + 1.0, 'lr': 1e-3})
      lines.append({'step': step, 'wall_time_s': t, 'eval_loss': loss, 'eval_accuracy': 0.3})
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  (d / 'sweep.json').write_text(json.dumps({'name': 'synthetic'}))
  return d


# ----------------------------------------------------------------------------- loading

def test_load_results_ignores_truncated_last_line_and_keeps_extra_keys(tmp_path):
  rows = make_results()
  text = ''.join(json.dumps(r) + '\n' for r in rows) + json.dumps(rows[0])[:37]
  (tmp_path / 'results.jsonl').write_text(text)
  loaded = results_lib.load_results(tmp_path)
  assert len(loaded) == len(rows)
  assert loaded[0]['extra_key_from_the_future'] == {'ok': True}


def test_load_results_missing_key_names_file_line_and_key(tmp_path):
  rows = make_results()[:3]
  del rows[1]['stored_bytes']
  (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  with pytest.raises(results_lib.ResultsError,
                     match=r"results\.jsonl, line 2: missing key 'stored_bytes'"):
    results_lib.load_results(tmp_path)


def test_load_results_broken_middle_line_is_an_error(tmp_path):
  rows = make_results()[:3]
  lines = [json.dumps(r) for r in rows]
  lines[1] = lines[1][:20]
  (tmp_path / 'results.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(results_lib.ResultsError, match='line 2: not valid JSON'):
    results_lib.load_results(tmp_path)


def test_load_results_later_line_of_a_cell_wins(tmp_path):
  rows = make_results()[:2]
  redo = dict(rows[0], accuracy=0.123)
  (tmp_path / 'results.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows + [redo]))
  loaded = results_lib.load_results(tmp_path)
  assert len(loaded) == 2
  assert [r['accuracy'] for r in loaded if r['cell'] == rows[0]['cell']] == [0.123]


def test_load_curves_keeps_only_eval_lines_and_ignores_partial_line(tmp_path):
  curves = make_curves()
  write_sweep(tmp_path, make_results(), curves)
  metrics = tmp_path / 'runs' / BIG / 'pretrain' / 'metrics.jsonl'
  metrics.write_text(metrics.read_text() + '{"step": 40, "wall_time_s": 48.0, "eval_lo')
  loaded = results_lib.load_curves(tmp_path)
  assert set(loaded) == {SMALL, BIG}
  for m in (SMALL, BIG):
    assert loaded[m]['step'] == curves[m]['step']
    np.testing.assert_allclose(loaded[m]['wall_time_s'], curves[m]['wall_time_s'])
    np.testing.assert_allclose(loaded[m]['eval_loss'], curves[m]['eval_loss'])


# ----------------------------------------------------------------------------- claim 1

def test_claim1_holds_when_big_is_lower_at_common_time():
  v = evaluate_claims(make_results(), make_curves(big_lower=True))[LOSS]
  assert v['held'] is True
  ev = v['evidence']
  assert ev['time_s'] == 30.0
  # The big model's last eval at or before 30 s is the one at 24 s (no look-ahead).
  assert ev['eval_time_used_s'] == {SMALL: 30.0, BIG: 24.0}
  assert ev['loss_at_time'][BIG] == pytest.approx(4.0 * 24 ** -0.5 + 3.0)
  assert BIG in v['explanation'] and '30 s' in v['explanation']


def test_claim1_fails_when_small_is_lower():
  v = evaluate_claims(make_results(), make_curves(big_lower=False))[LOSS]
  assert v['held'] is False
  assert v['evidence']['lowest_loss_model'] == SMALL


def test_claim1_uses_the_common_time_not_the_end_of_each_curve():
  # The big model overtakes only after the small run ended: at equal time it is still worse.
  curves = {SMALL: power_curve(1.0, 0.5, 4.0, [10, 20, 30]),
            BIG: power_curve(60.0, 1.0, 3.0, [10, 20, 30, 60, 120])}
  assert curves[BIG]['eval_loss'][-1] < curves[SMALL]['eval_loss'][-1]
  v = evaluate_claims(make_results(), curves)[LOSS]
  assert v['held'] is False


def test_claim1_null_without_curves():
  v = evaluate_claims(make_results(), {SMALL: make_curves()[SMALL]})[LOSS]
  assert v['held'] is None and v['reason']
  # A size interrupted right after its step-0 eval cannot be compared at time 0.
  only_start = {'step': [0], 'wall_time_s': [0.0], 'eval_loss': [10.0]}
  v = evaluate_claims(make_results(), {SMALL: make_curves()[SMALL], BIG: only_start})[LOSS]
  assert v['held'] is None and BIG in v['reason']


# ----------------------------------------------------------------------------- claim 2

def test_claim2_holds_when_big_drops_least_under_both():
  v = evaluate_claims(make_results(), make_curves())[ROBUST]
  assert v['held'] is True
  ev = v['evidence']
  assert ev['prune']['sparsity'] == 0.9 and ev['quantize']['bits'] == 2
  assert ev['prune']['drop'][SMALL] == pytest.approx(0.27)
  assert ev['prune']['drop'][BIG] == pytest.approx(0.045)
  assert ev['quantize']['drop'][BIG] == pytest.approx(0.04)


def test_claim2_is_undecided_when_the_largest_model_learned_nothing():
  # The big model sits at the majority-class baseline: no drop, yet nothing was learned.
  flat = {SMALL: lambda s: 0.3 * s, BIG: lambda s: 0.0}
  rows = [r | {'majority_accuracy': 0.6} for r in
          make_results(dense={SMALL: 0.8, BIG: 0.6}, prune_drop=flat,
                       quant_drop={SMALL: lambda b: 0.1, BIG: lambda b: 0.0})]
  v = evaluate_claims(rows, make_curves())[ROBUST]
  assert v['held'] is None and 'majority-class baseline' in v['reason']
  # The same drops with the big model clearly above the baseline do count.
  rows = [r | {'majority_accuracy': 0.5} for r in rows]
  assert evaluate_claims(rows, make_curves())[ROBUST]['held'] is True


def test_claim2_fails_when_big_prunes_worse():
  rows = make_results(prune_drop={SMALL: lambda s: 0.3 * s, BIG: lambda s: 0.5 * s})
  v = evaluate_claims(rows, make_curves())[ROBUST]
  assert v['held'] is False
  assert v['evidence']['prune']['held'] is False
  assert v['evidence']['quantize']['held'] is True


def test_claim2_fails_when_big_quantizes_worse():
  rows = make_results(quant_drop={SMALL: lambda b: 0.1 * 8 / b, BIG: lambda b: 0.2 * 8 / b})
  v = evaluate_claims(rows, make_curves())[ROBUST]
  assert v['held'] is False
  assert v['evidence']['prune']['held'] is True
  assert v['evidence']['quantize']['held'] is False


def test_claim2_uses_highest_sparsity_shared_by_all_sizes():
  # The small model was not pruned at 90%: compare at 75%, where the big model is worse.
  rows = make_results(prune_drop={SMALL: lambda s: 0.2 * s,
                                  BIG: lambda s: 0.3 * s if s < 0.8 else 0.0})
  rows = [r for r in rows if not (r['model'] == SMALL and r['sparsity'] == 0.9)]
  v = evaluate_claims(rows, make_curves())[ROBUST]
  assert v['evidence']['prune']['sparsity'] == 0.75
  assert v['evidence']['prune']['held'] is False


def test_claim2_decided_by_pruning_alone_without_quantization():
  rows = make_results(methods=('dense', 'prune'))
  v = evaluate_claims(rows, make_curves())[ROBUST]
  assert v['held'] is True and v['evidence']['quantize']['held'] is None
  rows = make_results(methods=('dense',))
  assert evaluate_claims(rows, make_curves())[ROBUST]['held'] is None


# ----------------------------------------------------------------------------- claim 3

def test_claim3_holds_when_compressed_big_beats_small():
  v = evaluate_claims(make_results(), make_curves())[EQUAL_SIZE]
  assert v['held'] is True
  ev = v['evidence']
  # Small dense (0.4 MB) and small prune 25% (0.3125 MB) are comparable; small 8-bit
  # (0.1 MB) is below the big model's smallest cell (2-bit, 0.2 MB).
  assert {c['small_cell'] for c in ev['comparisons']} == {
      f'{SMALL}/dense/s0.0/b32', f'{SMALL}/prune/s0.25/b32'}
  assert ev['not_comparable'] == [f'{SMALL}/quantize/s0.0/b8']
  at_dense = next(c for c in ev['comparisons'] if c['small_cell'].endswith('dense/s0.0/b32'))
  assert at_dense['largest_cell'] == f'{BIG}/quantize/s0.0/b4'
  assert at_dense['largest_accuracy'] == pytest.approx(0.88)


def test_claim3_fails_when_small_is_better_at_equal_size():
  rows = make_results(dense={SMALL: 0.95, BIG: 0.90})
  v = evaluate_claims(rows, make_curves())[EQUAL_SIZE]
  assert v['held'] is False
  assert v['evidence']['won'] < len(v['evidence']['comparisons'])


def test_claim3_null_when_big_cannot_get_small_enough():
  rows = make_results(methods=('dense',))
  v = evaluate_claims(rows, make_curves())[EQUAL_SIZE]
  assert v['held'] is None and 'smallest cell' in v['reason']


def test_one_size_gives_all_null():
  rows = [r for r in make_results() if r['model'] == BIG]
  verdicts = evaluate_claims(rows, make_curves())
  assert list(verdicts) == list(CLAIM_KEYS)
  assert all(v['held'] is None and '1 model size' in v['reason'] for v in verdicts.values())


def test_three_sizes_medium_best_fails_claims_1_and_3():
  params = {SMALL: 100_000, 'L3_H48': 300_000, BIG: 800_000}
  rows = make_results(
      params=params, dense={SMALL: 0.8, 'L3_H48': 0.97, BIG: 0.9},
      prune_drop={SMALL: lambda s: 0.3 * s, 'L3_H48': lambda s: 0.1 * s,
                  BIG: lambda s: 0.05 * s},
      quant_drop={SMALL: lambda b: 0.8 / b, 'L3_H48': lambda b: 0.4 / b,
                  BIG: lambda b: 0.08 / b})
  curves = make_curves()
  curves['L3_H48'] = power_curve(3.0, 0.5, 2.0, [11, 22, 33])
  v = evaluate_claims(rows, curves)
  assert v[LOSS]['held'] is False and v[LOSS]['evidence']['lowest_loss_model'] == 'L3_H48'
  assert v[ROBUST]['held'] is True
  assert v[EQUAL_SIZE]['held'] is False


def _as_metric(rows, name, higher_is_better, value):
  """The rows of another task: quality in `metric` (from the accuracy), no `accuracy`."""
  return [{k: v for k, v in r.items() if k != 'accuracy'}
          | {'metric_name': name, 'higher_is_better': higher_is_better,
             'metric': value(r['accuracy'])} for r in rows]


@pytest.mark.parametrize('make', [
    lambda: make_results(),
    lambda: make_results(prune_drop={SMALL: lambda s: 0.3 * s, BIG: lambda s: 0.5 * s}),
    lambda: make_results(dense={SMALL: 0.95, BIG: 0.90}),
])
def test_claims_and_frontier_follow_the_primary_metric_and_its_direction(make, tmp_path):
  rows = make()
  expected = evaluate_claims(rows, make_curves())
  front = [r['cell'] for r in claims_lib.pareto_frontier(rows)]
  # BLEU-like (higher is better, another scale) and error-like (lower is better) metrics
  # decide exactly as the accuracy they were derived from.
  for name, hib, value in (('eval_bleu', True, lambda a: 100 * a),
                           ('eval_error', False, lambda a: 1 - a)):
    other = _as_metric(rows, name, hib, value)
    got = evaluate_claims(other, make_curves())
    assert {k: v['held'] for k, v in got.items()} == {k: v['held'] for k, v in expected.items()}
    assert got[ROBUST]['evidence']['metric'] == {'eval_bleu': 'BLEU', 'eval_error': 'error'}[name]
    assert [r['cell'] for r in claims_lib.pareto_frontier(other)] == front
  # Written to results.jsonl, rows without `accuracy` load, and the report names the metric.
  write_sweep(tmp_path, _as_metric(rows, 'eval_bleu', True, lambda a: 100 * a), make_curves())
  loaded = results_lib.load_results(tmp_path)
  assert loaded[0]['metric'] == pytest.approx(100 * rows[0]['accuracy'])
  md = report_lib.write_report(tmp_path).read_text()
  assert '| BLEU |' in md and 'BLEU vs nonzero parameters' in md


def test_results_without_metric_keys_use_accuracy(tmp_path):
  write_sweep(tmp_path, make_results(), make_curves())
  row = results_lib.load_results(tmp_path)[0]
  assert (row['metric'], row['metric_name'], row['higher_is_better']) == (
      row['accuracy'], 'eval_accuracy', True)


def test_pareto_frontier_is_monotone_and_dominates():
  rows = make_results()
  front = claims_lib.pareto_frontier(rows)
  sizes = [r['stored_bytes'] for r in front]
  accs = [r['accuracy'] for r in front]
  assert sizes == sorted(sizes) and accs == sorted(accs)
  for r in rows:  # no cell beats the frontier at its own size
    best = max(f['accuracy'] for f in front if f['stored_bytes'] <= r['stored_bytes'])
    assert r['accuracy'] <= best


# ----------------------------------------------------------------------------- report

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def test_write_report_outputs_and_claims_follow_the_data(tmp_path):
  d = write_sweep(tmp_path / 'sweep', make_results(), make_curves())
  report = report_lib.write_report(d)
  assert report == d / 'report.md'
  for name in report_lib.FIGURES:
    data = (d / name).read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, name
    img = mpl_image.imread(d / name)
    assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01, name
  md = report.read_text()
  for name in report_lib.FIGURES:
    assert f']({name})' in md
  for key in CLAIM_KEYS:
    assert key in md
  assert 'excluded' in md and 'checkpoint' in md
  assert f'| {BIG} | 800,000 |' in md and '| prune | 90% |' in md

  on_disk = json.loads((d / 'claims.json').read_text())
  expected = evaluate_claims(results_lib.load_results(d), results_lib.load_curves(d))
  assert on_disk == json.loads(json.dumps(expected))
  assert [on_disk[k]['held'] for k in CLAIM_KEYS] == [True, True, True]

  # Change the data, rewrite: the verdicts follow.
  write_sweep(d, make_results(dense={SMALL: 0.95, BIG: 0.90},
                              prune_drop={SMALL: lambda s: 0.1 * s, BIG: lambda s: 0.5 * s}),
              make_curves(big_lower=False))
  report_lib.write_report(d)
  on_disk = json.loads((d / 'claims.json').read_text())
  assert [on_disk[k]['held'] for k in CLAIM_KEYS] == [False, False, False]


def test_report_skips_figures_without_data(tmp_path):
  d = write_sweep(tmp_path / 'sweep', make_results(methods=('dense', 'prune')), make_curves())
  (d / 'quant_accuracy.png').write_bytes(b'stale')
  md = report_lib.write_report(d).read_text()
  assert not (d / 'quant_accuracy.png').exists()
  assert 'no data in this sweep' in md
  assert (d / 'prune_accuracy.png').exists()


def test_report_on_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(results_lib.ResultsError, match='trainbig sweep'):
    report_lib.write_report(tmp_path)


def test_claims_table_is_plain_text():
  table = report_lib.claims_table(evaluate_claims(make_results(), make_curves()))
  lines = table.splitlines()
  assert lines[0].startswith('claim') and '| verdict |' in lines[0]
  for key in CLAIM_KEYS:
    assert any(line.startswith(key) and re.search(r'\| held +\|', line) for line in lines)
  assert max(map(len, lines)) <= 120


# ----------------------------------------------------------------------------- plan

# Big: lower floor (2.0) but slower start; the curves cross at t = (27 / 1) ** 2 = 729 s.
TIMES = np.geomspace(5, 1000, 15)
PLAN_CURVES = {SMALL: power_curve(3.0, 0.5, 3.0, TIMES), BIG: power_curve(30.0, 0.5, 2.0, TIMES)}


def test_fit_recovers_power_law():
  fits = plan_lib.fit_learning_curves(PLAN_CURVES)
  assert fits[BIG].form == 'a*t^-b+c'
  assert fits[BIG].c == pytest.approx(2.0, abs=0.02)
  assert fits[BIG].b == pytest.approx(0.5, abs=0.02)
  assert float(fits[BIG].predict(5000.0)) == pytest.approx(30 * 5000 ** -0.5 + 2, rel=0.01)
  assert fits[SMALL].c == pytest.approx(3.0, abs=0.02)


def test_fit_falls_back_without_floor_on_two_points():
  fit = plan_lib.fit_learning_curve([0.0, 10.0, 40.0], [9.0, 4.0, 1.0])  # t=0 is dropped
  assert fit.form == 'a*t^-b' and fit.n_points == 2 and fit.c == 0.0
  assert fit.b == pytest.approx(1.0) and float(fit.predict(20.0)) == pytest.approx(2.0)


def test_recommend_small_for_short_budget_big_for_long():
  rows = make_results()
  short = plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=100.0, serve_budget_mb=0.45)
  assert short['size'] == SMALL
  assert short['predicted_loss'][SMALL] < short['predicted_loss'][BIG]
  assert short['compression']['method'] == 'dense' and short['accuracy'] == pytest.approx(0.8)
  assert short['extrapolation'] == pytest.approx(0.1) and not short['warnings']

  long = plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=5000.0, serve_budget_mb=0.45)
  assert long['size'] == BIG
  # Within 0.45 MB the big model's options: 4-bit 0.40 MB (0.88), 2-bit 0.20 MB (0.86),
  # pruned 90% 0.42 MB (0.855): 4-bit wins.
  assert long['compression']['cell'] == f'{BIG}/quantize/s0.0/b4'
  assert long['accuracy'] == pytest.approx(0.88)
  assert long['best_within_budget']['cell'] == f'{BIG}/quantize/s0.0/b4'
  assert long['extrapolation'] == pytest.approx(5.0)
  assert any('extrapolates' in w for w in long['warnings'])

  tight = plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=5000.0, serve_budget_mb=0.25)
  assert tight['compression']['cell'] == f'{BIG}/quantize/s0.0/b2'


def test_recommend_reports_when_chosen_size_does_not_fit():
  rows = make_results()
  rec = plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=5000.0, serve_budget_mb=0.1)
  assert rec['size'] == BIG and rec['compression'] is None
  assert rec['best_within_budget']['model'] == SMALL
  assert any('no cell of' in w for w in rec['warnings'])


def test_recommend_errors():
  rows = make_results()
  for bad in (0, -5.0, float('nan')):
    with pytest.raises(plan_lib.PlanError, match='train_budget_s must be a positive'):
      plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=bad, serve_budget_mb=1.0)
    with pytest.raises(plan_lib.PlanError, match='serve_budget_mb must be a positive'):
      plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=10.0, serve_budget_mb=bad)
  # The smallest cell is the small model at 2 bits: 100k params * 2 / 8 = 25 kB.
  with pytest.raises(plan_lib.PlanError, match=r'smallest is 0\.025 MB'):
    plan_lib.recommend(rows, PLAN_CURVES, train_budget_s=10.0, serve_budget_mb=0.01)


def test_inputs_are_not_mutated():
  rows, curves = make_results(), make_curves()
  before = copy.deepcopy((rows, curves))
  evaluate_claims(rows, curves)
  plan_lib.recommend(rows, PLAN_CURVES, 100.0, 1.0)
  assert (rows, curves) == before


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_claims_never_crash_on_partial_sweeps(data):
  # Any subset of cells (an interrupted sweep) with any accuracies gives well-formed verdicts.
  params = {SMALL: 100_000, 'L3_H48': 300_000, BIG: 800_000}
  rows = make_results(params=params, dense={m: 0.8 for m in params},
                      prune_drop={m: (lambda s: 0.1 * s) for m in params},
                      quant_drop={m: (lambda b: 0.1 / b) for m in params})
  keep = data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
  accs = data.draw(st.lists(st.floats(0, 1), min_size=len(rows), max_size=len(rows)))
  rows = [dict(r, accuracy=a) for r, a, k in zip(rows, accs, keep) if k]
  curves = {m: c for m, c in make_curves().items() if data.draw(st.booleans())}
  verdicts = evaluate_claims(rows, curves)
  assert list(verdicts) == list(CLAIM_KEYS)
  for v in verdicts.values():
    assert v['held'] in (True, False, None)
    assert (v['reason'] is None) == (v['held'] is not None)
    assert v['explanation']
  json.dumps(verdicts)
  report_lib.claims_table(verdicts)
