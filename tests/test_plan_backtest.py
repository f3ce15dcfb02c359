"""The planner's backtest: fit each learning curve on its first half, predict its end."""

from __future__ import annotations

import numpy as np
import pytest

from trainbig_jax.experiments import plan as plan_lib

SMALL, BIG = 'L2_H32', 'L4_H64'
TIMES = np.geomspace(5, 1000, 20)


def curve(times, loss_fn) -> dict:
  times = [float(t) for t in times]
  return {'step': [10 * (i + 1) for i in range(len(times))], 'wall_time_s': times,
          'eval_loss': [float(loss_fn(t)) for t in times]}


def test_backtest_recovers_power_laws():
  curves = {SMALL: curve(TIMES, lambda t: 3.0 * t ** -0.5 + 3.0),
            BIG: curve(TIMES, lambda t: 30.0 * t ** -0.5 + 2.0)}
  check = plan_lib.backtest(curves)
  assert check['end_s'] == pytest.approx(1000.0)
  for model, law in ((SMALL, (3.0, 3.0)), (BIG, (30.0, 2.0))):
    b = check['models'][model]
    assert b['fit_until_s'] == pytest.approx(500.0)
    assert b['fit_points'] == sum(t <= 500.0 for t in TIMES)  # the second half is unseen
    assert b['observed_loss'] == pytest.approx(law[0] * 1000 ** -0.5 + law[1])
    assert abs(b['error']) < 2e-3  # an exact power law extrapolates exactly
  assert check['predicted_best'] == check['observed_best'] == BIG
  assert check['recommendation_held'] and check['max_abs_error'] < 2e-3


def test_backtest_catches_a_curve_the_law_does_not_describe():
  # BIG follows one law until 300 s, then its loss falls much faster (a learning-rate decay,
  # say): fitted on the first half it looks worse than SMALL at the end, but it is better.
  def big(t):
    return 2.0 * t ** -0.3 + 3.0 - (0.0 if t <= 300 else 0.6 * np.log(t / 300))
  curves = {SMALL: curve(TIMES, lambda t: 3.0 * t ** -0.5 + 3.0), BIG: curve(TIMES, big)}
  check = plan_lib.backtest(curves)
  assert check['observed_best'] == BIG and check['predicted_best'] == SMALL
  assert not check['recommendation_held']
  assert check['models'][BIG]['error'] > 0.5  # predicted far above what was observed
  assert abs(check['models'][SMALL]['error']) < 2e-3


def test_recommend_reports_backtest_and_distrusts_a_close_call():
  rows = []
  for model, params, acc in ((SMALL, 100_000, 0.8), (BIG, 800_000, 0.9)):
    rows.append({'cell': f'{model}/dense', 'model': model, 'layers': 2, 'hidden': 32,
                 'total_params': params, 'pretrain_budget_s': 1000.0, 'pretrain_steps': 100,
                 'pretrain_wall_s': 1000.0, 'pretrain_eval_loss': 3.0, 'method': 'dense',
                 'sparsity': 0.0, 'bits': 32, 'nonzero_params': params,
                 'stored_bytes': 4 * params, 'dense_fp32_bytes': 4 * params, 'accuracy': acc,
                 'eval_loss': 0.5})
  rng = np.random.default_rng(0)
  clean = {SMALL: curve(TIMES, lambda t: 3.0 * t ** -0.5 + 3.0),
           BIG: curve(TIMES, lambda t: 30.0 * t ** -0.5 + 2.0)}
  advice = plan_lib.recommend(rows, clean, train_budget_s=2000.0, serve_budget_mb=10.0)
  assert advice['backtest']['recommendation_held']
  assert not any('backtest' in w for w in advice['warnings'])
  text = plan_lib.format_recommendation(advice)
  assert 'backtest error' in text and 'Backtest: fitted on evals up to 500 s' in text

  # Two nearly equal sizes measured with noise: the backtest error exceeds the predicted gap.
  noisy = {m: {**c, 'eval_loss': [y + rng.normal(0, 0.05) for y in c['eval_loss']]}
           for m, c in {SMALL: curve(TIMES, lambda t: 3.0 * t ** -0.5 + 3.0),
                        BIG: curve(TIMES, lambda t: 3.1 * t ** -0.5 + 2.99)}.items()}
  advice = plan_lib.recommend(rows, noisy, train_budget_s=2000.0, serve_budget_mb=10.0)
  assert any('too uncertain to trust' in w for w in advice['warnings'])


def test_backtest_needs_two_sizes_with_enough_early_evals():
  with pytest.raises(plan_lib.PlanError, match='at least 2 sizes'):
    plan_lib.backtest({SMALL: curve(TIMES, lambda t: 1 / t)})
  late = curve([900.0, 950.0, 1000.0], lambda t: 1 / t)  # nothing in the first half
  with pytest.raises(plan_lib.PlanError, match='at least 2 evals in the first 0.5'):
    plan_lib.backtest({SMALL: late, BIG: late})
