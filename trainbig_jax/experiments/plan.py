"""Beyond the paper: which size to train for a budget, and how hard to compress it to serve.

The paper's advice ("train big, stop early, compress hard") is qualitative. Here each
size's pretraining eval curve is fitted with a power law in wall-clock time with an
irreducible term,

    L(t) = a * t^(-b) + c,

so the loss each size would reach at another training budget can be predicted. `recommend`
picks the size with the lowest predicted loss and then, from the sweep's measured cells, the
most accurate compression of that size that fits a serving budget.

An extrapolation is only as good as the law behind it, so `backtest` checks the fits on data
they did not see: each curve is fitted on its first half (in time) and asked for its loss at
the end of the budget. The planner prints that error beside its recommendation, and says so
when the error is as large as the predicted gap between the best two sizes (the choice could
then go either way).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import optimize

from trainbig_jax.experiments.claims import (best_within, cell_label, loss_at, metric,
                                            metric_name, model_sizes)

Row = Mapping[str, Any]
Curves = Mapping[str, Mapping[str, Sequence[float]]]

# Above this ratio of requested budget to observed time a prediction is an extrapolation far
# beyond the data, and the recommendation says so.
EXTRAPOLATION_WARN = 2.0
# The backtest fits on the evals at or before this fraction of each curve's final time.
BACKTEST_FIT_FRACTION = 0.5
_MAX_EXPONENT = 5.0  # wall-clock learning-curve exponents are well below 1; 5 only guards


class PlanError(ValueError):
  """A planning request that the sweep's data cannot answer."""


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(t) = a * t^(-b) + c fitted to one size's eval curve (t in wall-clock seconds).

  form: 'a*t^-b+c' (full fit) or 'a*t^-b' (fallback with c = 0, used with fewer than 3
  points or when the full fit fails). n_points, t_min_s and t_max_s describe the data used;
  rmse is the root mean squared residual in loss units.
  """
  a: float
  b: float
  c: float
  form: str
  n_points: int
  t_min_s: float
  t_max_s: float
  rmse: float

  def predict(self, t: float | np.ndarray) -> float | np.ndarray:
    """Predicted eval loss after t > 0 seconds of training."""
    return self.a * np.power(t, -self.b) + self.c


def _fit_no_floor(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """a, b of y = a t^-b by least squares in log-log space (needs y > 0)."""
  slope, intercept = np.polyfit(np.log(t), np.log(y), 1)
  return float(math.exp(intercept)), float(max(-slope, 0.0))


def _fit_with_floor(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  """a, b, c of y = a t^-b + c; raises RuntimeError/ValueError when it does not converge.

  curve_fit needs a sensible start: for a grid of floors c in [0, min y) the remaining
  a t^-b is a straight line in log-log space, so the best such line gives the initial guess.
  Time is rescaled by its maximum so that a stays O(loss) whatever the time units.
  """
  t_ref = float(t.max())
  ts = t / t_ref
  y_min = float(y.min())
  best = None
  for c0 in np.linspace(0.0, y_min, 40, endpoint=False):
    a0, b0 = _fit_no_floor(ts, y - c0)
    b0 = min(b0, _MAX_EXPONENT)
    err = float(np.sum((a0 * ts ** -b0 + c0 - y) ** 2))
    if best is None or err < best[0]:
      best = (err, a0, b0, c0)
  _, a0, b0, c0 = best
  f = lambda x, a, b, c: a * np.power(x, -b) + c
  (a, b, c), _ = optimize.curve_fit(
      f, ts, y, p0=[max(a0, 1e-12), min(max(b0, 1e-6), _MAX_EXPONENT), c0],
      bounds=([0.0, 0.0, 0.0], [np.inf, _MAX_EXPONENT, y_min]), maxfev=20000)
  if not all(map(math.isfinite, (a, b, c))):
    raise RuntimeError('non-finite parameters')
  return float(a * t_ref ** b), float(b), float(c)  # back to a in original time units


def fit_learning_curve(wall_time_s: Sequence[float], eval_loss: Sequence[float]) -> PowerLawFit:
  """Fits L(t) = a t^-b + c to one curve, using only points with t > 0 and finite loss > 0.

  Bounds: a >= 0, 0 <= b <= 5, 0 <= c <= min observed loss (the floor cannot lie above a
  loss already reached). Falls back to c = 0 with fewer than 3 points or if curve_fit fails.
  Raises PlanError with fewer than 2 usable points.
  """
  pts = [(float(t), float(y)) for t, y in zip(wall_time_s, eval_loss)
         if t > 0 and math.isfinite(y) and y > 0]
  if len(pts) < 2:
    raise PlanError(f'a learning-curve fit needs at least 2 evals at t > 0; got {len(pts)}.')
  t = np.array([p[0] for p in pts])
  y = np.array([p[1] for p in pts])
  form = 'a*t^-b+c'
  try:
    if len(pts) < 3:
      raise ValueError('too few points for 3 parameters')
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', optimize.OptimizeWarning)
      a, b, c = _fit_with_floor(t, y)
  except (RuntimeError, ValueError):
    (a, b), c, form = _fit_no_floor(t, y), 0.0, 'a*t^-b'
  rmse = float(np.sqrt(np.mean((a * t ** -b + c - y) ** 2)))
  return PowerLawFit(a=a, b=b, c=c, form=form, n_points=len(pts), t_min_s=float(t.min()),
                     t_max_s=float(t.max()), rmse=rmse)


def fit_learning_curves(curves: Curves) -> dict[str, PowerLawFit]:
  """{model: PowerLawFit} for every curve with at least 2 evals at t > 0 (others left out)."""
  fits = {}
  for model, curve in curves.items():
    try:
      fits[model] = fit_learning_curve(curve['wall_time_s'], curve['eval_loss'])
    except PlanError:
      continue
  return fits


def backtest_curve(wall_time_s: Sequence[float], eval_loss: Sequence[float], end_s: float,
                   fit_fraction: float = BACKTEST_FIT_FRACTION) -> dict[str, Any]:
  """Fits one curve on its evals at t <= fit_fraction * end_s and predicts the loss at end_s.

  Returns {'fit_until_s', 'fit_points', 'predicted_loss', 'observed_loss', 'observed_time_s',
  'error' (predicted - observed), 'relative_error'}; the observed loss is that of the last
  eval at or before end_s (as claim 1 reads curves). Raises PlanError when fewer than 2 evals
  at t > 0 lie in the fitted part, or none at or before end_s.
  """
  fit_until = fit_fraction * end_s
  head = [(t, y) for t, y in zip(wall_time_s, eval_loss) if t <= fit_until]
  fit = fit_learning_curve([t for t, _ in head], [y for _, y in head])
  observed = loss_at({'step': list(range(len(wall_time_s))), 'wall_time_s': wall_time_s,
                      'eval_loss': eval_loss}, end_s)
  if observed is None:
    raise PlanError(f'no eval at or before {end_s:g} s to check the backtest against.')
  predicted = float(fit.predict(end_s))
  return {'fit_until_s': fit_until, 'fit_points': fit.n_points, 'predicted_loss': predicted,
          'observed_loss': observed[0], 'observed_time_s': observed[1],
          'error': predicted - observed[0], 'relative_error': (predicted - observed[0]) /
          observed[0]}


def backtest(curves: Curves, fit_fraction: float = BACKTEST_FIT_FRACTION) -> dict[str, Any]:
  """How well the planner's fits would have predicted the sweep's own end, per size.

  The end time T is the earliest final eval among the curves (every size was still training
  there, as in claim 1). Each curve is fitted on its evals up to fit_fraction * T and
  predicts its loss at T. Returns {'end_s', 'models': {model: backtest_curve(...)},
  'max_abs_error', 'predicted_best', 'observed_best', 'recommendation_held'}: whether the
  size the half-data fits would have recommended for T is the size that was lowest at T.
  Sizes with too few evals in the fitted part are listed under 'skipped'. Raises PlanError
  when fewer than 2 sizes can be backtested.
  """
  usable = {m: c for m, c in curves.items() if len(c.get('wall_time_s', [])) > 0}
  if len(usable) < 2:
    raise PlanError(f'a backtest needs curves of at least 2 sizes; have {len(usable)}.')
  end_s = min(max(c['wall_time_s']) for c in usable.values())
  models, skipped = {}, []
  for model, curve in usable.items():
    try:
      models[model] = backtest_curve(curve['wall_time_s'], curve['eval_loss'], end_s,
                                     fit_fraction)
    except PlanError:
      skipped.append(model)
  if len(models) < 2:
    raise PlanError(f'a backtest needs at least 2 evals in the first {fit_fraction:g} of the '
                    f'time for 2 sizes; only {", ".join(models) or "none"} have them.')
  predicted_best = min(models, key=lambda m: models[m]['predicted_loss'])
  observed_best = min(models, key=lambda m: models[m]['observed_loss'])
  return {'end_s': end_s, 'fit_fraction': fit_fraction, 'models': models, 'skipped': skipped,
          'max_abs_error': max(abs(b['error']) for b in models.values()),
          'predicted_best': predicted_best, 'observed_best': observed_best,
          'recommendation_held': predicted_best == observed_best}


def _backtest_warnings(check: dict[str, Any], predicted: Mapping[str, float]) -> list[str]:
  """Why the recommendation should not be trusted, judged by the backtest (or [])."""
  warn = []
  if not check['recommendation_held']:
    warn.append(f'backtest: fitted on the first {check["fit_fraction"]:g} of each curve, the '
                f'planner would have chosen {check["predicted_best"]} for '
                f'{check["end_s"]:.4g} s, but {check["observed_best"]} was lowest there.')
  ranked = sorted(predicted.values())
  if len(ranked) >= 2 and check['max_abs_error'] >= ranked[1] - ranked[0]:
    warn.append(f'backtest error up to {check["max_abs_error"]:.3g} in loss is at least the '
                f'predicted gap between the best two sizes ({ranked[1] - ranked[0]:.3g}): the '
                f'choice of size is too uncertain to trust.')
  return warn


def _describe(r: Row) -> dict[str, Any]:
  return {'model': r['model'], 'cell': r['cell'], 'method': r['method'],
          'label': cell_label(r), 'sparsity': r['sparsity'], 'bits': r['bits'],
          'stored_mb': r['stored_bytes'] / 1e6, 'accuracy': metric(r),
          'metric_name': metric_name([r])}


def recommend(results: Sequence[Row], curves: Curves, train_budget_s: float,
              serve_budget_mb: float) -> dict[str, Any]:
  """Which size to train for `train_budget_s` seconds, and how to compress it to serve.

  1. Fit each size's eval curve (fit_learning_curves) and predict its loss at
     train_budget_s; among sizes that also have evaluated cells, choose the lowest.
  2. Among the chosen size's cells (dense or compressed) with stored_bytes <=
     serve_budget_mb * 1e6, choose the most accurate (ties: the smaller).
  3. For comparison, the most accurate cell of any size within the serving budget.

  "Accuracy" is each cell's primary metric (claims.metric; e.g. BLEU for translation).
  Accuracies are those measured in the sweep, i.e. after the sweep's own pretraining
  budget; they are a guide, not a prediction for train_budget_s. `extrapolation` is
  train_budget_s / the chosen size's largest observed eval time; above 2 a warning says the
  prediction lies far beyond the data.

  Returns {'train_budget_s', 'serve_budget_mb', 'predicted_loss': {model: loss},
  'fits': {model: fit fields}, 'size', 'compression' (cell description or None if no cell
  of that size fits), 'accuracy', 'best_within_budget' (cell description),
  'extrapolation', 'backtest' (see `backtest`, or None when the curves are too short),
  'warnings': [str]}.
  Raises PlanError for budgets <= 0, when no size has both a fit and cells, or when no cell
  of any size fits the serving budget (naming the smallest available size in MB).
  """
  for name, v in (('train_budget_s', train_budget_s), ('serve_budget_mb', serve_budget_mb)):
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
      raise PlanError(f'{name} must be a positive number of '
                      f'{"seconds" if name == "train_budget_s" else "megabytes"}; got {v!r}.')
  results = list(results)
  if not results:
    raise PlanError('the sweep has no evaluated cells to recommend from.')
  budget_bytes = serve_budget_mb * 1e6
  smallest = min(results, key=lambda r: r['stored_bytes'])
  best_any = best_within(results, budget_bytes)
  if best_any is None:
    raise PlanError(f'no cell fits a serving budget of {serve_budget_mb:g} MB; the smallest '
                    f'is {smallest["stored_bytes"] / 1e6:.4g} MB ({smallest["model"]} '
                    f'{cell_label(smallest)}).')

  fits = fit_learning_curves(curves)
  sizes = model_sizes(results)
  predicted = {m: float(fits[m].predict(train_budget_s)) for m in sizes if m in fits}
  if not predicted:
    raise PlanError('no model size has both evaluated cells and a pretraining curve with at '
                    'least 2 evals to fit.')
  size = min(predicted, key=lambda m: (predicted[m], -sizes[m]))
  warn = []
  skipped = [m for m in sizes if m not in fits]
  if skipped:
    warn.append(f'no learning-curve fit (fewer than 2 evals) for: {", ".join(skipped)}.')
  extrapolation = train_budget_s / fits[size].t_max_s
  if extrapolation > EXTRAPOLATION_WARN:
    warn.append(f'the training budget is {extrapolation:.1f}x the longest observed time of '
                f'{size} ({fits[size].t_max_s:.4g} s): the loss prediction extrapolates far '
                f'beyond the data.')
  try:
    check = backtest({m: curves[m] for m in predicted})
  except PlanError as e:
    check = None
    warn.append(f'no backtest: {e}')
  if check is not None:
    warn += _backtest_warnings(check, predicted)
  chosen = best_within([r for r in results if r['model'] == size], budget_bytes)
  if chosen is None:
    own_min = min(r['stored_bytes'] for r in results if r['model'] == size) / 1e6
    warn.append(f'no cell of {size} fits {serve_budget_mb:g} MB (its smallest is '
                f'{own_min:.4g} MB); see best_within_budget.')
  return {
      'train_budget_s': float(train_budget_s),
      'serve_budget_mb': float(serve_budget_mb),
      'predicted_loss': predicted,
      'fits': {m: dataclasses.asdict(f) for m, f in fits.items()},
      'size': size,
      'compression': _describe(chosen) if chosen else None,
      'accuracy': metric(chosen) if chosen else None,
      'best_within_budget': _describe(best_any),
      'extrapolation': extrapolation,
      'backtest': check,
      'warnings': warn,
  }


def format_recommendation(advice: dict[str, Any]) -> str:
  """The recommendation as a few lines for the terminal."""
  lines = [f'Training budget {advice["train_budget_s"]:g} s, serving budget '
           f'{advice["serve_budget_mb"]:g} MB.', 'Predicted validation MLM loss at that budget:']
  check = advice.get('backtest')
  for model, loss in sorted(advice['predicted_loss'].items(), key=lambda kv: kv[1]):
    mark = '  <- train this' if model == advice['size'] else ''
    error = ''
    if check is not None and model in check['models']:
      error = f'  (backtest error {check["models"][model]["error"]:+.4f})'
    lines.append(f'  {model:>12}: {loss:.4f}{error}{mark}')
  if check is not None:
    lines.append(f'Backtest: fitted on evals up to {check["end_s"] * check["fit_fraction"]:.4g} '
                 f's, predicted the loss at {check["end_s"]:.4g} s within '
                 f'{check["max_abs_error"]:.4f}; its choice there was '
                 f'{"right" if check["recommendation_held"] else "wrong"} '
                 f'({check["observed_best"]} was lowest).')
  lines.append(f'Extrapolation: {advice["extrapolation"]:.2f}x the longest time observed for '
               f'{advice["size"]}.')
  chosen = advice['compression']
  if chosen is not None:
    lines.append(f'Compress it as {chosen["label"]}: {chosen["stored_mb"]:.4g} MB, measured '
                 f'{chosen["metric_name"]} {chosen["accuracy"]:.4f}.')
  best = advice['best_within_budget']
  lines.append(f'Best measured cell of any size within the serving budget: {best["model"]} '
               f'{best["label"]} ({best["stored_mb"]:.4g} MB, {best["metric_name"]} '
               f'{best["accuracy"]:.4f}).')
  lines += [f'warning: {w}' for w in advice['warnings']]
  return '\n'.join(lines)
