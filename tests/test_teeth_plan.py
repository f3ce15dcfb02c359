"""`trainbig plan` on constructed learning curves: it recommends the size its fitted curves say,
at budgets on either side of every crossing, and through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from trainbig_jax.experiments import plan as plan_lib

from test_report import make_results, power_curve, write_sweep

TIMES = np.geomspace(2, 400, 12)
# Three sizes, L(t) = a t^-b + c, that take turns being lowest (crossings: see crossing()).
TRUE = {'S': (2.0, 0.5, 4.0), 'M': (8.0, 0.5, 3.5), 'L': (40.0, 0.5, 2.5)}
CURVES = {m: power_curve(*p, TIMES) for m, p in TRUE.items()}
PARAMS = {'S': 100_000, 'M': 300_000, 'L': 800_000}


def true_loss(m: str, t: float) -> float:
  a, b, c = TRUE[m]
  return a * t ** -b + c


def crossing(m1: str, m2: str) -> float:
  (a1, _, c1), (a2, _, c2) = TRUE[m1], TRUE[m2]
  return ((a2 - a1) / (c1 - c2)) ** 2  # a1/sqrt(t) + c1 == a2/sqrt(t) + c2


def rows():
  return make_results(params=PARAMS, dense={'S': 0.7, 'M': 0.8, 'L': 0.9},
                      prune_drop={m: (lambda s: 0.1 * s) for m in PARAMS},
                      quant_drop={m: (lambda b: 0.1 / b) for m in PARAMS})


def test_fits_recover_each_curve():
  fits = plan_lib.fit_learning_curves(CURVES)
  for m, (a, b, c) in TRUE.items():
    assert fits[m].form == 'a*t^-b+c' and fits[m].n_points == len(TIMES)
    assert (fits[m].a, fits[m].b, fits[m].c) == pytest.approx((a, b, c), rel=0.02, abs=0.02)
    assert fits[m].t_min_s == pytest.approx(2.0) and fits[m].t_max_s == pytest.approx(400.0)
    assert fits[m].rmse < 1e-3


@pytest.mark.parametrize('factor', [0.5, 2.0])
def test_recommends_the_size_the_curves_say_on_either_side_of_each_crossing(factor):
  # S/M cross at 144 s, M/L at 1024 s (S/L at 245 s, where M is best anyway).
  assert crossing('S', 'M') == pytest.approx(144.0) and crossing('M', 'L') == pytest.approx(1024)
  for t_cross in (crossing('S', 'M'), crossing('M', 'L')):
    t = t_cross * factor
    rec = plan_lib.recommend(rows(), CURVES, train_budget_s=t, serve_budget_mb=10.0)
    truth = min(TRUE, key=lambda m: true_loss(m, t))
    assert rec['size'] == truth, (t, rec['predicted_loss'])
    for m in TRUE:
      assert rec['predicted_loss'][m] == pytest.approx(true_loss(m, t), rel=0.01)
    assert rec['extrapolation'] == pytest.approx(t / 400.0)
    assert bool(rec['warnings']) == (t / 400.0 > plan_lib.EXTRAPOLATION_WARN)


def test_equal_predictions_pick_the_larger_size():
  same = power_curve(3.0, 0.5, 3.0, TIMES)
  rec = plan_lib.recommend(rows(), {'S': same, 'M': same, 'L': same}, 100.0, 10.0)
  assert rec['size'] == 'L'


def test_chosen_compression_is_the_most_accurate_cell_of_that_size_within_the_budget():
  rs = rows()
  rec = plan_lib.recommend(rs, CURVES, train_budget_s=2000.0, serve_budget_mb=0.3)
  assert rec['size'] == 'L'
  fitting = [r for r in rs if r['model'] == 'L' and r['stored_bytes'] <= 0.3e6]
  best = max(fitting, key=lambda r: (r['accuracy'], -r['stored_bytes']))
  assert rec['compression'] == {
      'model': 'L', 'cell': best['cell'], 'method': best['method'],
      'label': 'quantize 2-bit', 'sparsity': best['sparsity'], 'bits': best['bits'],
      'stored_mb': best['stored_bytes'] / 1e6, 'accuracy': best['accuracy'],
      'metric_name': 'accuracy'}
  assert rec['accuracy'] == best['accuracy']
  every = [r for r in rs if r['stored_bytes'] <= 0.3e6]
  assert rec['best_within_budget']['cell'] == max(
      every, key=lambda r: (r['accuracy'], -r['stored_bytes']))['cell']
  assert rec['train_budget_s'] == 2000.0 and rec['serve_budget_mb'] == 0.3
  assert set(rec['fits']) == set(TRUE) and rec['fits']['L']['form'] == 'a*t^-b+c'


def test_sizes_without_a_fit_are_named_and_skipped():
  curves = dict(CURVES, L=power_curve(40.0, 0.5, 2.5, [10.0]))  # one eval: no fit
  rec = plan_lib.recommend(rows(), curves, train_budget_s=2000.0, serve_budget_mb=10.0)
  assert 'L' not in rec['predicted_loss'] and rec['size'] == 'M'
  assert rec['warnings'][0] == 'no learning-curve fit (fewer than 2 evals) for: L.'
  assert rec['warnings'][1] == (
      'the training budget is 5.0x the longest observed time of M (400 s): the loss '
      'prediction extrapolates far beyond the data.')
  with pytest.raises(plan_lib.PlanError, match='no model size has both evaluated cells and a '
                                               'pretraining curve with at least 2 evals'):
    plan_lib.recommend(rows(), {'X': CURVES['S']}, 100.0, 10.0)
  with pytest.raises(plan_lib.PlanError, match='the sweep has no evaluated cells'):
    plan_lib.recommend([], CURVES, 100.0, 10.0)


def test_extrapolation_warning_threshold_is_exclusive():
  at = plan_lib.recommend(rows(), CURVES, train_budget_s=800.0, serve_budget_mb=10.0)
  assert at['extrapolation'] == pytest.approx(2.0) and not at['warnings']


def test_fit_uses_only_positive_finite_points_and_falls_back():
  fit = plan_lib.fit_learning_curve([0, -1, 1, 2, 4, 8], [9, 9, 4.0, float('nan'), 1.0, 0.0])
  assert fit.n_points == 2 and fit.form == 'a*t^-b' and fit.c == 0.0
  assert (fit.a, fit.b) == pytest.approx((4.0, 1.0))
  assert (fit.t_min_s, fit.t_max_s) == (1.0, 4.0) and fit.rmse == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(plan_lib.PlanError, match='needs at least 2 evals at t > 0; got 1'):
    plan_lib.fit_learning_curve([0, 5], [3.0, 2.0])
  rising = plan_lib._fit_no_floor(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
  assert rising[1] == 0.0  # a rising curve gets exponent 0, never a negative one
  assert plan_lib.fit_learning_curves({'one': power_curve(1, 1, 1, [3.0])}) == {}


def test_format_recommendation_lines():
  rec = plan_lib.recommend(rows(), CURVES, train_budget_s=2000.0, serve_budget_mb=0.3)
  text = plan_lib.format_recommendation(rec).splitlines()
  assert text[0] == 'Training budget 2000 s, serving budget 0.3 MB.'
  assert text[1] == 'Predicted validation MLM loss at that budget:'
  assert text[2].endswith('<- train this') and text[2].strip().startswith('L:')
  assert [line.split(':')[0].strip() for line in text[2:5]] == ['L', 'M', 'S']
  assert text[5].startswith('Backtest: fitted on evals up to 200 s, predicted the loss at 400 s')
  assert text[6] == 'Extrapolation: 5.00x the longest time observed for L.'
  assert text[7].startswith('Compress it as quantize 2-bit: 0.2 MB, measured accuracy')
  assert text[8].startswith('Best measured cell of any size within the serving budget: ')
  assert text[9].startswith('warning: the training budget is 5.0x')


def test_cli_plan_prints_the_recommendation(tmp_path):
  sweep = write_sweep(tmp_path / 'sweep', rows(), CURVES)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.getcwd()] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  t = crossing('S', 'M') * 2
  out = subprocess.run([sys.executable, '-m', 'trainbig_jax.cli', 'plan', f'--sweep={sweep}',
                        f'--train_budget_s={t}', '--serve_budget_mb=10', '--json'],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  advice = json.loads(out.stdout.strip().splitlines()[-1])
  assert advice['size'] == min(TRUE, key=lambda m: true_loss(m, t)) == 'M'
  assert math.isclose(advice['predicted_loss']['M'], true_loss('M', t), rel_tol=0.01)


def test_format_recommendation_full_text_with_and_without_backtest():
  advice = {'train_budget_s': 2000.0, 'serve_budget_mb': 0.3, 'size': 'L',
            'predicted_loss': {'M': 3.5, 'L': 3.12345, 'S': 3.3},  # not in name order
            'backtest': {'models': {'L': {'error': -0.01234}, 'S': {'error': 0.5}},
                         'end_s': 400.0, 'fit_fraction': 0.5, 'max_abs_error': 0.5,
                         'recommendation_held': False, 'observed_best': 'S'},
            'extrapolation': 5.0,
            'compression': {'label': 'quantize 2-bit', 'stored_mb': 0.21, 'accuracy': 0.81234,
                            'metric_name': 'accuracy'},
            'best_within_budget': {'model': 'M', 'label': 'prune 0.9', 'stored_mb': 0.25,
                                   'metric_name': 'accuracy', 'accuracy': 0.8},
            'warnings': ['first', 'second']}
  assert plan_lib.format_recommendation(advice).splitlines() == [
      'Training budget 2000 s, serving budget 0.3 MB.',
      'Predicted validation MLM loss at that budget:',
      '             L: 3.1235  (backtest error -0.0123)  <- train this',
      '             S: 3.3000  (backtest error +0.5000)',
      '             M: 3.5000',
      'Backtest: fitted on evals up to 200 s, predicted the loss at 400 s within 0.5000; its '
      'choice there was wrong (S was lowest).',
      'Extrapolation: 5.00x the longest time observed for L.',
      'Compress it as quantize 2-bit: 0.21 MB, measured accuracy 0.8123.',
      'Best measured cell of any size within the serving budget: M prune 0.9 (0.25 MB, '
      'accuracy 0.8000).',
      'warning: first', 'warning: second']
  held = dict(advice, backtest=dict(advice['backtest'], recommendation_held=True),
              compression=None, warnings=[])
  assert 'its choice there was right (S was lowest).' in plan_lib.format_recommendation(held)
  assert not any(line.startswith(('Compress it', 'warning'))
                 for line in plan_lib.format_recommendation(held).splitlines())
  alone = plan_lib.format_recommendation(dict(held, backtest=None)).splitlines()
  assert alone[2] == '             L: 3.1235  <- train this'
  assert not any('acktest' in line for line in alone)


def test_fitted_floor_stays_within_its_bounds():
  # The unconstrained least-squares optimum of these points has a negative floor (c = -1);
  # the fit keeps 0 <= c <= min loss and b <= the largest exponent.
  t = np.array([1.0, 2, 4, 8, 16, 32, 64])
  fit = plan_lib.fit_learning_curve(t, 5.0 * t ** -0.3 - 1.0)
  assert fit.form == 'a*t^-b+c' and 0.0 <= fit.c <= 1e-6
  assert 0.0 <= fit.b <= plan_lib._MAX_EXPONENT


def test_backtest_curve_reports_the_observed_eval_and_names_a_missing_one():
  out = plan_lib.backtest_curve([1.0, 2.0, 3.0, 5.0], [4.0, 3.0, 2.5, 2.0], end_s=4.0,
                                fit_fraction=0.75)
  assert (out['observed_loss'], out['observed_time_s']) == (2.5, 3.0)  # last eval at <= 4 s
  assert out['fit_until_s'] == 3.0 and out['fit_points'] == 3
  with pytest.raises(plan_lib.PlanError) as err:
    plan_lib.backtest_curve([1.0, 1.5], [3.0, 2.0], end_s=0.9, fit_fraction=2.0)
  assert str(err.value) == 'no eval at or before 0.9 s to check the backtest against.'


def test_backtest_fits_on_the_given_fraction_of_the_time():
  check = plan_lib.backtest(CURVES, fit_fraction=0.25)
  assert check['fit_fraction'] == 0.25
  for m in CURVES:
    assert check['models'][m]['fit_until_s'] == pytest.approx(0.25 * check['end_s'])
    assert check['models'][m]['fit_points'] == sum(t <= 0.25 * check['end_s'] for t in TIMES)


def test_backtest_warnings_text_and_the_tie_at_the_predicted_gap():
  check = {'recommendation_held': False, 'fit_fraction': 0.5, 'predicted_best': 'S',
           'end_s': 400.0, 'observed_best': 'L', 'max_abs_error': 0.5}
  assert plan_lib._backtest_warnings(check, {'S': 2.0, 'L': 2.5, 'M': 3.0}) == [
      'backtest: fitted on the first 0.5 of each curve, the planner would have chosen S for '
      '400 s, but L was lowest there.',
      'backtest error up to 0.5 in loss is at least the predicted gap between the best two '
      'sizes (0.5): the choice of size is too uncertain to trust.']
  held = dict(check, recommendation_held=True, max_abs_error=0.25)
  assert plan_lib._backtest_warnings(held, {'S': 2.0, 'L': 2.5}) == []


def test_budget_errors_name_the_unit_and_a_too_small_size_in_decimal_megabytes():
  for kwargs, message in (
      ({'train_budget_s': -1.0, 'serve_budget_mb': 1.0},
       'train_budget_s must be a positive number of seconds; got -1.0.'),
      ({'train_budget_s': 10.0, 'serve_budget_mb': 0},
       'serve_budget_mb must be a positive number of megabytes; got 0.')):
    with pytest.raises(plan_lib.PlanError) as err:
      plan_lib.recommend(rows(), CURVES, **kwargs)
    assert str(err.value) == message
  big = [dict(r, stored_bytes=1_000_501) if r['model'] == 'L' else r for r in rows()]
  rec = plan_lib.recommend(big, CURVES, train_budget_s=2000.0, serve_budget_mb=1.0)
  assert rec['size'] == 'L'
  assert 'no cell of L fits 1 MB (its smallest is 1.001 MB); see best_within_budget.' in (
      rec['warnings'])


def test_floor_fit_starts_from_the_best_log_log_line_over_a_grid_of_floors(monkeypatch):
  # A curve whose best starting floor is well above 0, with noise so that the grid's
  # choice matters.
  rng = np.random.default_rng(3)
  t = np.linspace(100.0, 3000.0, 12)
  y = 40.0 * t ** -0.6 + 1.5 + rng.normal(0.0, 0.01, t.size)
  calls = []
  real_curve_fit = plan_lib.optimize.curve_fit

  def recording_curve_fit(f, x, ydata, p0, **kwargs):
    calls.append((list(p0), kwargs))
    return real_curve_fit(f, x, ydata, p0=p0, **kwargs)

  monkeypatch.setattr(plan_lib.optimize, 'curve_fit', recording_curve_fit)
  plan_lib.fit_learning_curve(t, y)
  # The documented start, computed here independently: for 40 floors c in [0, min y), a
  # closed-form least-squares line through (log t', log(y - c)) with t' = t / max t, its
  # exponent clipped to [0, 5]; the start is the (first) floor whose curve has the least
  # squared error.
  ts, best = t / t.max(), None
  for c in [y.min() * k / 40 for k in range(40)]:
    lx, ly = np.log(ts), np.log(y - c)
    slope = np.sum((lx - lx.mean()) * (ly - ly.mean())) / np.sum((lx - lx.mean()) ** 2)
    a = math.exp(ly.mean() - slope * lx.mean())
    b = min(max(-slope, 0.0), 5.0)
    err = float(np.sum((a * ts ** -b + c - y) ** 2))
    if best is None or err < best[0]:
      best = (err, [a, b, c])
  (p0, kwargs), = calls
  assert best[1][2] > 0.5  # the test's point: the chosen floor is not the grid's first
  np.testing.assert_allclose(p0, best[1], rtol=1e-6)
  # A fit that needs more than scipy's default budget (100 evaluations per parameter)
  # still converges instead of falling back to the floor-free form.
  assert kwargs['maxfev'] == 20000


def test_several_sizes_without_a_fit_are_all_named():
  one_eval = power_curve(40.0, 0.5, 2.5, [10.0])
  curves = dict(CURVES, S=one_eval, L=one_eval)
  rec = plan_lib.recommend(rows(), curves, train_budget_s=2000.0, serve_budget_mb=10.0)
  assert rec['warnings'][0] == 'no learning-curve fit (fewer than 2 evals) for: S, L.'


def test_backtest_names_the_sizes_it_could_fit_when_fewer_than_two():
  late = power_curve(8.0, 0.5, 3.5, [300.0, 400.0])  # no eval in the first quarter
  with pytest.raises(plan_lib.PlanError) as err:
    plan_lib.backtest(dict(CURVES, M=late, L=late), fit_fraction=0.25)
  assert str(err.value) == ('a backtest needs at least 2 evals in the first 0.25 of the time '
                            'for 2 sizes; only S have them.')
  with pytest.raises(plan_lib.PlanError) as err:
    plan_lib.backtest({'M': late, 'L': late}, fit_fraction=0.25)
  assert str(err.value).endswith('only none have them.')
