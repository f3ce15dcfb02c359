"""Verdicts on the paper's three claims, computed from a sweep's results and curves alone.

Li et al. (ICML 2020), "Train Big, Then Compress", claim that (1) at equal training wall-clock
bigger models reach a lower loss, (2) bigger models lose less accuracy when pruned or
quantized, and (3) so at an equal inference size a compressed big model beats a lightly
compressed small one. `evaluate_claims` turns each into a precise, checkable rule (see the
docstrings of the three `claim_*` functions) and returns

  {key: {'claim': str, 'held': True | False | None, 'reason': str | None,
         'evidence': {...numbers that decide it...}, 'explanation': str}}

with keys CLAIM_KEYS. `held` is None when the data cannot decide (fewer than two sizes,
missing cells, no comparable pair); `reason` then says what is missing.

A cell's quality is the task's primary metric (`metric`, named by `metric_name`, better when
higher iff `higher_is_better`): accuracy for classification, BLEU for translation; rows
without these keys (older sweeps) use `accuracy`, higher being better. Evidence keys keep
the word "accuracy" for that quality whatever the metric; `evidence['metric']` names it.

"The largest model" is always the model with the most `total_params` in the results (ties
broken by name). Comparisons are strict: a tie does not count as the largest model winning,
because a tie is no evidence for the claim.

Two sets of rules decide (`rules=`):
  'interval' (the default): every comparison is a paired bootstrap interval over the same
      evaluation examples, and over seeds when a cell was run several times
      (experiments/uncertainty.py); a comparison is 'held' when its whole interval lies on
      the claim's side of zero, 'not held' when it lies wholly on the other side, else
      'undecided'; a claim combines its comparisons with uncertainty.combine_verdicts. It
      needs the sweep's per-example files (results rows name them in `examples` and
      `pretrain_examples`); results without them fall back to 'strict' and say so. Each
      metric is recomputed from resampled examples (PER_EXAMPLE_METRICS): accuracy and loss
      as ratios of per-example sums, BLEU as the corpus BLEU of resampled sentences' summed
      statistics. A translation sweep's claim 1 compares its runs' final BLEU (the runs'
      own metric) instead of the MLM loss.
  'strict': the point rules of the three `claim_*` functions (on the means over seeds).
Every claim then carries `verdict` ('held' / 'not held' / 'undecided'), `rules`, `margin`
and `interval` (the decisive comparison's difference and [low, high]; None under strict
rules) and `budget` (which pretraining budget the sizes were given).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from trainbig_jax.experiments import uncertainty

CLAIM_KEYS = (
    'bigger_lower_loss_at_equal_time',
    'bigger_more_robust_to_compression',
    'compressed_big_beats_small_at_equal_size',
)
CLAIM_TEXT = {
    'bigger_lower_loss_at_equal_time':
        'For an equal pretraining budget (wall-clock by default; FLOPs or tokens), the '
        'largest model reaches the lowest validation MLM loss.',
    'bigger_more_robust_to_compression':
        'The largest model loses the least of its metric (accuracy, BLEU) under pruning and '
        'quantization.',
    'compressed_big_beats_small_at_equal_size':
        'At an equal stored size, a compressed largest model beats the smaller models.',
}

Row = Mapping[str, Any]
Curves = Mapping[str, Mapping[str, Sequence[float]]]


# ----------------------------------------------------------------------------- helpers

def _fmt(x: float) -> str:
  return f'{x:.4g}'


def percent(fraction: float) -> str:
  """0.875 -> '87.5%': sparsity grids often go past whole percents (87.5%, 99.5%)."""
  return f'{100 * fraction:.4g}%'


def _mb(nbytes: float) -> str:
  return f'{nbytes / 1e6:.3g} MB'


def model_sizes(results: Iterable[Row]) -> dict[str, int]:
  """{model: total_params}, ordered from smallest to largest (ties by name)."""
  sizes: dict[str, int] = {}
  for r in results:
    sizes[r['model']] = max(int(r['total_params']), sizes.get(r['model'], 0))
  return dict(sorted(sizes.items(), key=lambda kv: (kv[1], kv[0])))


def _largest(sizes: Mapping[str, int]) -> str:
  return max(sizes, key=lambda m: (sizes[m], m))


def cell_label(r: Row) -> str:
  """Short human label of a cell's compression, e.g. 'prune 75%' or 'quantize 4-bit'."""
  method = r['method']
  if method == 'dense':
    return 'dense'
  if method == 'prune':
    return f'prune {percent(r["sparsity"])}'
  if method == 'quantize':
    return f'quantize {r["bits"]}-bit'
  if method == 'prune_quantize':
    return f'prune {percent(r["sparsity"])} + {r["bits"]}-bit'
  return f'{method} s={r["sparsity"]:g} b={r["bits"]}'


def metric(r: Row) -> float:
  """A cell's quality: the task's primary metric (`accuracy` in rows from older sweeps)."""
  return float(r['metric'] if 'metric' in r else r['accuracy'])


def higher_is_better(r: Row) -> bool:
  return bool(r.get('higher_is_better', True))


def score(r: Row) -> float:
  """The metric signed so that larger is better, whatever its direction."""
  return metric(r) if higher_is_better(r) else -metric(r)


# How metrics are written in labels where their plain name would read wrongly.
METRIC_LABELS = {'bleu': 'BLEU', 'chrf': 'chrF'}


def metric_name(results: Iterable[Row]) -> str:
  """The primary metric's name for labels: 'accuracy', 'BLEU', ... ('metric' if mixed)."""
  names = {r.get('metric_name', 'eval_accuracy') for r in results}
  name = names.pop().removeprefix('eval_') if len(names) == 1 else 'metric'
  return METRIC_LABELS.get(name, name)


def best_within(rows: Iterable[Row], budget_bytes: float) -> Row | None:
  """The best-scoring row with stored_bytes <= budget (ties: the smaller one), or None."""
  fitting = [r for r in rows if r['stored_bytes'] <= budget_bytes]
  if not fitting:
    return None
  return max(fitting, key=lambda r: (score(r), -r['stored_bytes']))


def pareto_frontier(results: Iterable[Row]) -> list[Row]:
  """Cells no other cell beats on both stored size and metric, by increasing stored_bytes.

  A cell is on the frontier when its metric is strictly better than that of every cell
  with fewer or equally many stored bytes, i.e. it is the best model one can serve within
  its own size.
  """
  rows = sorted(results, key=lambda r: (r['stored_bytes'], -score(r)))
  frontier, best = [], float('-inf')
  for r in rows:
    if score(r) > best:
      frontier.append(r)
      best = score(r)
  return frontier


def _null(key: str, reason: str, evidence: dict[str, Any] | None = None) -> dict[str, Any]:
  return {'claim': CLAIM_TEXT[key], 'held': None, 'reason': reason,
          'evidence': evidence or {}, 'explanation': f'Not decided: {reason}'}


def _verdict(key: str, held: bool, evidence: dict[str, Any], explanation: str
             ) -> dict[str, Any]:
  return {'claim': CLAIM_TEXT[key], 'held': bool(held), 'reason': None,
          'evidence': evidence, 'explanation': explanation}


def _mean_metric(rows: Iterable[Row]) -> float | None:
  values = [metric(r) for r in rows]
  return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- claim 1

def loss_at(curve: Mapping[str, Sequence[float]], t: float) -> tuple[float, float, int] | None:
  """(loss, eval time, step) of the last eval at or before wall-clock t, or None."""
  best = None
  for step, wt, loss in zip(curve['step'], curve['wall_time_s'], curve['eval_loss']):
    if wt <= t and (best is None or wt >= best[1]):
      best = (float(loss), float(wt), int(step))
  return best


def claim_bigger_lower_loss(results: Sequence[Row], curves: Curves) -> dict[str, Any]:
  """Claim 1, 'bigger_lower_loss_at_equal_time'.

  Sizes are the models that appear both in the results (for total_params) and in the curves.
  The common time T is the smallest final eval wall-clock time among those sizes' curves:
  every size was still training at T, so comparing there is fair even if some runs overshot
  the budget or were cut short. (The budget itself is not used as T: a final eval logged a
  fraction of a second past the budget would otherwise be excluded.) Each size's loss at T is
  that of its last eval at or before T (a step function: no interpolation between evals,
  which can only favour sizes whose evals are sparser). Held iff the largest model's loss at
  T is strictly the lowest.
  """
  key = CLAIM_KEYS[0]
  sizes = model_sizes(results)
  ignored = sorted(set(curves) - set(sizes))
  models = [m for m in sizes if m in curves and len(curves[m]['eval_loss']) > 0]
  evidence: dict[str, Any] = {'total_params': {m: sizes[m] for m in models}}
  if ignored:
    evidence['ignored_models_without_results'] = ignored
  if len(models) < 2:
    return _null(key, f'needs eval curves of at least 2 sizes with results; have '
                      f'{len(models)} ({", ".join(models) or "none"}).', evidence)
  largest = _largest(sizes)
  if largest not in models:
    return _null(key, f'the largest model {largest} has no pretraining eval curve.', evidence)

  t_common = min(max(curves[m]['wall_time_s']) for m in models)
  if t_common <= 0:  # only the step-0 eval of some size exists: nothing was trained yet
    short = [m for m in models if max(curves[m]['wall_time_s']) <= 0]
    return _null(key, f'no eval after training started for: {", ".join(short)}.', evidence)
  at = {m: loss_at(curves[m], t_common) for m in models}
  missing = [m for m in models if at[m] is None]
  budgets = sorted({float(r['pretrain_budget_s']) for r in results if r['model'] in models})
  evidence.update({
      'time_s': t_common,
      'pretrain_budget_s': budgets[0] if len(budgets) == 1 else budgets,
      'loss_at_time': {m: at[m][0] for m in models if at[m]},
      'eval_time_used_s': {m: at[m][1] for m in models if at[m]},
      'step_at_time': {m: at[m][2] for m in models if at[m]},
      'largest': largest,
  })
  if largest in missing:
    return _null(key, f'the largest model {largest} has no eval at or before the common time '
                      f'{_fmt(t_common)} s.', evidence)
  losses = evidence['loss_at_time']
  if len(losses) < 2:
    return _null(key, f'only {largest} has an eval at or before {_fmt(t_common)} s.', evidence)
  best_other = min((m for m in losses if m != largest), key=lambda m: losses[m])
  held = losses[largest] < losses[best_other]
  evidence['lowest_loss_model'] = largest if held else best_other
  listing = ', '.join(f'{m} {_fmt(losses[m])} (step {evidence["step_at_time"][m]})'
                      for m in losses)
  explanation = (
      f'At {_fmt(t_common)} s of pretraining (the earliest final eval among sizes) the eval '
      f'losses are {listing}; the largest model {largest} '
      + ('is lowest' if held else f'is not lowest ({best_other} is)') + '.')
  if missing:
    explanation += f' No eval at or before that time for: {", ".join(missing)}.'
  return _verdict(key, held, evidence, explanation)


# ----------------------------------------------------------------------------- claim 2

def _setting(r: Row, method: str) -> float | int:
  """The compression strength of a cell: its sparsity (pruning) or bit width (quantization)."""
  return round(float(r['sparsity']), 6) if method == 'prune' else int(r['bits'])


def _drop_subverdict(results: Sequence[Row], dense: Mapping[str, float], largest: str,
                     method: str, sign: float) -> dict[str, Any]:
  """Metric drop from dense at the harshest setting of `method` that every size has.

  `sign` is +1 for a higher-is-better metric, -1 otherwise, so a drop is always a loss of
  quality (a rise in loss counts as a drop).
  """
  name = 'sparsity' if method == 'prune' else 'bits'
  # Harshest = most weights removed (pruning) or fewest bits (quantization).
  harshest = max if method == 'prune' else min
  by_model: dict[str, list[Row]] = defaultdict(list)
  for r in results:
    # 32 bits: not quantized (compress/quantize.FLOAT_BITS, as in every config).
    compressed = r['sparsity'] > 0 if method == 'prune' else r['bits'] < 32
    if r['method'] == method and r['model'] in dense and compressed:
      by_model[r['model']].append(r)
  models = [m for m in dense if by_model.get(m)]
  out: dict[str, Any] = {name: None, 'drop': {}, 'held': None}
  if largest not in models:
    out['reason'] = f'the largest model {largest} has no {method} cells.'
    return out
  if len(models) < 2:
    out['reason'] = f'fewer than 2 sizes have both dense and {method} cells.'
    return out
  common = set.intersection(*({_setting(r, method) for r in by_model[m]} for m in models))
  if not common:
    out['reason'] = f'no {name} value is shared by all sizes under {method}.'
    return out
  s = harshest(common)
  drops = {m: sign * (dense[m] - _mean_metric(r for r in by_model[m] if _setting(r, method) == s))
           for m in models}
  out.update({name: s, 'drop': drops, 'models': models,
              'held': drops[largest] < min(d for m, d in drops.items() if m != largest)})
  return out


# Accuracy points above the majority-class baseline a model needs before its robustness counts.
MIN_ABOVE_BASELINE = 0.01


def claim_bigger_more_robust(results: Sequence[Row]) -> dict[str, Any]:
  """Claim 2, 'bigger_more_robust_to_compression'.

  Per model, dense accuracy is the mean accuracy of its `dense` cells. Two sub-verdicts:
    pruning:      among sizes with dense and `prune` cells, take the highest sparsity that
                  all of them have; drop = dense accuracy - accuracy at that sparsity.
    quantization: among sizes with dense and `quantize` cells, take the lowest bit width
                  (< 32) that all of them have; drop = dense accuracy - accuracy there.
  Drops are absolute accuracy points. Null when rows carry `majority_accuracy` and the
  largest model's dense accuracy is within MIN_ABOVE_BASELINE of it. A sub-verdict holds iff the largest model's drop is
  strictly the smallest. Rule: the claim holds iff every sub-verdict that can be computed
  holds (both, when the sweep has both methods); it is null only if neither can be computed.
  `prune_quantize` cells are not used here (they mix the two effects).
  """
  key = CLAIM_KEYS[1]
  sizes = model_sizes(results)
  if len(sizes) < 2:
    return _null(key, f'needs at least 2 model sizes; have {len(sizes)}.')
  largest = _largest(sizes)
  dense = {}
  for m in sizes:
    value = _mean_metric(r for r in results if r['model'] == m and r['method'] == 'dense')
    if value is not None:
      dense[m] = value
  name = metric_name(results)
  sign = 1.0 if all(higher_is_better(r) for r in results) else -1.0
  evidence: dict[str, Any] = {
      'rule': f'held iff the largest model has the strictly smallest {name} drop in every '
              'computable sub-verdict (pruning at the highest common sparsity, quantization '
              'at the lowest common bit width)',
      'largest': largest, 'metric': name, 'dense_accuracy': dense}
  if largest not in dense:
    return _null(key, f'the largest model {largest} has no dense cell.', evidence)
  if len(dense) < 2:
    return _null(key, 'fewer than 2 sizes have a dense cell.', evidence)
  # A model at the majority-class baseline learned nothing it could lose: its 'drop' of 0
  # would make it look robust. Rows may carry the baseline as `majority_accuracy`.
  baseline = max((r.get('majority_accuracy') or 0.0) for r in results)
  if baseline and dense[largest] <= baseline + MIN_ABOVE_BASELINE:
    evidence['majority_accuracy'] = baseline
    return _null(key, f'the largest model {largest} is at the majority-class baseline (dense '
                      f'accuracy {dense[largest]:.3f} vs {baseline:.3f}): with nothing learned '
                      f'it has nothing to lose, so its robustness cannot be judged.', evidence)
  prune = _drop_subverdict(results, dense, largest, 'prune', sign)
  quant = _drop_subverdict(results, dense, largest, 'quantize', sign)
  evidence.update({'prune': prune, 'quantize': quant})
  subs = [v['held'] for v in (prune, quant) if v['held'] is not None]
  if not subs:
    return _null(key, f'pruning: {prune["reason"]} quantization: {quant["reason"]}', evidence)

  def describe(v: dict[str, Any], what: str) -> str:
    if v['held'] is None:
      return f'{what}: not computable ({v["reason"]})'
    drops = ', '.join(f'{m} {v["drop"][m]:+.3f}' for m in v['drop'])
    return (f'{what} the {name} drops are {drops} ('
            + ('largest model smallest' if v['held'] else 'largest model not smallest') + ')')

  prune_what = ('pruning' if prune['sparsity'] is None
                else f'at {percent(prune["sparsity"])} sparsity')
  quant_what = 'quantization' if quant['bits'] is None else f'at {quant["bits"]} bits'
  explanation = describe(prune, prune_what) + '; ' + describe(quant, quant_what) + '.'
  return _verdict(key, all(subs), evidence, explanation[0].upper() + explanation[1:])


# ----------------------------------------------------------------------------- claim 3

def light_cells(rows: Iterable[Row]) -> list[Row]:
  """A model's lightly compressed variants: its dense cells, plus for each compression
  method the least compressed cell (the one with the most stored bytes)."""
  rows = list(rows)
  out = [r for r in rows if r['method'] == 'dense']
  for method in sorted({r['method'] for r in rows} - {'dense'}):
    out.append(max((r for r in rows if r['method'] == method),
                   key=lambda r: (r['stored_bytes'], score(r))))
  return out


def claim_compressed_big_beats_small(results: Sequence[Row]) -> dict[str, Any]:
  """Claim 3, 'compressed_big_beats_small_at_equal_size'.

  The candidate budgets are the stored sizes S of every smaller model's light cells (see
  `light_cells`: dense, and the least compressed cell of each method). A budget is
  comparable when the largest model has some cell (any method) with stored_bytes <= S. At a
  comparable budget the largest model wins iff its best cell within S is strictly more
  accurate than every smaller model's cell within S (any compression, not only the light
  one), i.e. the best point of the accuracy-vs-size frontier at S comes from the largest
  model. Held iff the largest model wins at every comparable budget; null if none is
  comparable (the largest model cannot be compressed below the smaller models' sizes).
  """
  key = CLAIM_KEYS[2]
  sizes = model_sizes(results)
  if len(sizes) < 2:
    return _null(key, f'needs at least 2 model sizes; have {len(sizes)}.')
  largest = _largest(sizes)
  big_rows = [r for r in results if r['model'] == largest]
  small_rows = [r for r in results if r['model'] != largest]
  comparisons, not_comparable = [], []
  for m in sizes:
    if m == largest:
      continue
    for light in light_cells(r for r in small_rows if r['model'] == m):
      budget = light['stored_bytes']
      big = best_within(big_rows, budget)
      if big is None:
        not_comparable.append(light['cell'])
        continue
      rival = best_within(small_rows, budget)  # never None: `light` itself fits
      comparisons.append({
          'budget_mb': budget / 1e6,
          'small_cell': light['cell'], 'small_model': m, 'small_label': cell_label(light),
          'small_accuracy': metric(light),
          'largest_cell': big['cell'], 'largest_label': cell_label(big),
          'largest_accuracy': metric(big), 'largest_mb': big['stored_bytes'] / 1e6,
          'best_smaller_cell': rival['cell'], 'best_smaller_model': rival['model'],
          'best_smaller_label': cell_label(rival), 'best_smaller_accuracy': metric(rival),
          'largest_wins': score(big) > score(rival),
      })
  evidence: dict[str, Any] = {
      'largest': largest, 'metric': metric_name(results), 'comparisons': comparisons,
      'not_comparable': not_comparable,
      'smallest_largest_mb': min(r['stored_bytes'] for r in big_rows) / 1e6 if big_rows
      else None}
  if not big_rows:
    return _null(key, f'the largest model {largest} has no evaluated cells.', evidence)
  if not comparisons:
    return _null(key, f'no smaller-model light cell is as large as the smallest cell of '
                      f'{largest} ({_mb(min(r["stored_bytes"] for r in big_rows))}).', evidence)
  won = [c for c in comparisons if c['largest_wins']]
  evidence['won'] = len(won)
  held = len(won) == len(comparisons)
  lost = [c for c in comparisons if not c['largest_wins']]
  # Cite a loss when it failed, else the tightest budget it won.
  c = lost[0] if lost else min(comparisons, key=lambda c: c['budget_mb'])
  rival = ('it' if c['best_smaller_cell'] == c['small_cell'] else
           f'the best smaller cell, {c["best_smaller_model"]} {c["best_smaller_label"]} at '
           f'{c["best_smaller_accuracy"]:.3f}')
  explanation = (
      f'{largest} had the best cell within budget at {len(won)}/{len(comparisons)} '
      f'comparable budgets ({min(x["budget_mb"] for x in comparisons):.3g}-'
      f'{max(x["budget_mb"] for x in comparisons):.3g} MB); e.g. at {c["budget_mb"]:.3g} MB, '
      f'{c["small_model"]} {c["small_label"]} scores {c["small_accuracy"]:.3f} while '
      f'{largest} {c["largest_label"]} ({c["largest_mb"]:.3g} MB) scores '
      f'{c["largest_accuracy"]:.3f}, ' + ('beating ' if c['largest_wins'] else 'not beating ')
      + f'{rival}.')
  return _verdict(key, held, evidence, explanation)


# ----------------------------------------------------------------------------- all

def strict_claims(results: Sequence[Row], curves: Curves) -> dict[str, dict[str, Any]]:
  """Verdicts on the three claims by the strict point rules, keyed by CLAIM_KEYS.

  `results` are the rows of results.jsonl (see `results.load_results`), `curves` the eval
  curves of `results.load_curves`. With fewer than two model sizes every verdict is null.
  The output is plain JSON-serialisable data.
  """
  results = list(results)
  sizes = model_sizes(results)
  if len(sizes) < 2:
    reason = (f'the sweep has {len(sizes)} model size(s) with results '
              f'({", ".join(sizes) or "none"}); comparing sizes needs at least 2.')
    return {k: _null(k, reason) for k in CLAIM_KEYS}
  return {
      CLAIM_KEYS[0]: claim_bigger_lower_loss(results, curves),
      CLAIM_KEYS[1]: claim_bigger_more_robust(results),
      CLAIM_KEYS[2]: claim_compressed_big_beats_small(results),
  }


# ----------------------------------------------------------------------------- seeds

def setting_key(r: Row) -> tuple[str, str, float, int]:
  """What identifies a cell across seeds: its model and compression."""
  return (r['model'], r['method'], round(float(r['sparsity']), 6), int(r['bits']))


def aggregate_seeds(results: Iterable[Row]) -> list[dict[str, Any]]:
  """One row per cell with the metric averaged over its seeds: `metric` is the mean,
  `metric_std` the standard deviation over seeds (0 for one seed), `n_seeds` their count,
  `seed_rows` the rows themselves; other keys are those of the lowest seed's row."""
  groups: dict[tuple, list[Row]] = defaultdict(list)
  for r in results:
    groups[setting_key(r)].append(r)
  out = []
  for rows in groups.values():
    rows = sorted(rows, key=lambda r: r.get('seed', 0))
    values = np.array([metric(r) for r in rows])
    out.append({**rows[0], 'metric': float(values.mean()), 'metric_std': float(values.std()),
                'n_seeds': len(rows), 'seed_rows': rows})
  return out


# ----------------------------------------------------------------------------- intervals

Examples = Callable[[str], Mapping[str, np.ndarray] | None]


def ratio_statistic(rows: np.ndarray) -> float:
  """sum(value) / sum(weight) of [examples, 2] rows: the task's own metric (accuracy, or the
  token-weighted MLM loss) of a resampled set of examples."""
  return float(np.sum(rows[:, 0]) / max(np.sum(rows[:, 1]), 1e-12))


@dataclasses.dataclass(frozen=True)
class ExampleMetric:
  """How a metric is recomputed from a cell's per-example file: the file's arrays that make
  each example's row (side by side), and the statistic of a set of rows (the metric of those
  examples alone, which the bootstrap resamples)."""
  arrays: tuple[str, ...]
  statistic: Callable[[np.ndarray], float]
  higher_is_better: bool


# The metrics with intervals, by the name results rows give them (`metric_name`). The files
# are evaluate.evaluate_checkpoint's per-example values, written by the sweep.
PER_EXAMPLE_METRICS = {
    'eval_accuracy': ExampleMetric(('correct', 'weight'), ratio_statistic, True),
    'eval_loss': ExampleMetric(('loss', 'weight'), ratio_statistic, False),
    # Each sentence's BLEU statistics; a set's BLEU is the corpus BLEU of their sum.
    'eval_bleu': ExampleMetric(('bleu',), uncertainty.bleu_statistic, True),
}


def drop_statistic(statistic: Callable[[np.ndarray], float], sign: float, width: int
                   ) -> Callable[[np.ndarray], float]:
  """Quality lost from dense to compressed, of rows made of a dense row (its first `width`
  columns) and a compressed row side by side; `sign` -1 for a lower-is-better metric."""
  def drop(rows: np.ndarray) -> float:
    return sign * (statistic(rows[:, :width]) - statistic(rows[:, width:]))
  return drop


def _example_rows(data: Mapping[str, np.ndarray], metric: str, where: str) -> np.ndarray:
  """[examples, k] rows of `metric` from one per-example file's arrays."""
  arrays = PER_EXAMPLE_METRICS[metric].arrays
  missing = [a for a in arrays if a not in data]
  if missing:
    raise uncertainty.UncertaintyError(f'{where} has no per-example {missing[0]!r} values.')
  return np.column_stack([np.asarray(data[a], np.float64) for a in arrays])


def _runs(rows: Sequence[Row], field: str, metric: str, examples: Examples
          ) -> list[np.ndarray]:
  """Per-seed [examples, k] arrays of a cell's `metric` rows, one per distinct file."""
  runs, seen = [], set()
  for r in sorted(rows, key=lambda r: r.get('seed', 0)):
    if r[field] in seen:
      continue
    seen.add(r[field])
    data = examples(r[field])
    if data is None:
      raise uncertainty.UncertaintyError(f'{r[field]} has no per-example data.')
    runs.append(_example_rows(data, metric, r[field]))
  return runs


def _compare(a_runs, b_runs, statistic, what: dict[str, Any]) -> dict[str, Any]:
  """One comparison a - b (the claim wants it positive) with its interval and verdict."""
  try:
    iv = uncertainty.paired_difference(a_runs, b_runs, statistic=statistic)
  except uncertainty.UncertaintyError as e:
    return {**what, 'verdict': 'undecided', 'reason': str(e), 'margin': None, 'interval': None}
  return {**what, 'verdict': uncertainty.verdict(iv), 'margin': iv.difference,
          'interval': [iv.low, iv.high], 'confidence': iv.confidence,
          'n_examples': iv.n_examples, 'n_seeds': list(iv.n_seeds)}


def _decide(key: str, comparisons: list[dict[str, Any]], evidence: dict[str, Any],
            describe: Callable[[dict[str, Any]], str], rule: str) -> dict[str, Any]:
  """Combines comparisons; the decisive one is the weakest for the claim (lowest interval
  bound) when it is not refuted, else the clearest refutation (lowest upper bound)."""
  verdict = uncertainty.combine_verdicts([c['verdict'] for c in comparisons])
  with_iv = [c for c in comparisons if c['interval'] is not None]
  decisive = None
  if with_iv:
    decisive = (min(with_iv, key=lambda c: c['interval'][1]) if verdict == 'not held'
                else min(with_iv, key=lambda c: c['interval'][0]))
  counts = {v: sum(c['verdict'] == v for c in comparisons) for v in uncertainty.VERDICTS}
  tally = ', '.join(f'{n} {v}' for v, n in counts.items() if n)
  explanation = (f'{rule}; {len(comparisons)} comparison(s): {tally}.'
                 + (f' Decisive: {describe(decisive)}' if decisive else ''))
  evidence = {**evidence, 'comparisons': comparisons}
  return {'claim': CLAIM_TEXT[key], 'verdict': verdict,
          'held': {'held': True, 'not held': False}.get(verdict), 'reason': None,
          'rules': 'interval', 'margin': decisive and decisive['margin'],
          'interval': decisive and decisive['interval'], 'evidence': evidence,
          'explanation': explanation}


def _iv_text(c: dict[str, Any]) -> str:
  lo, hi = c['interval']
  return (f'{c["margin"]:+.4f} [{lo:+.4f}, {hi:+.4f}] '
          f'({round(100 * c["confidence"])}% interval, {c["n_examples"]} examples, seeds '
          f'{c["n_seeds"][0]}/{c["n_seeds"][1]}) -> {c["verdict"]}.')


def pretrain_metric_name(results: Iterable[Row]) -> str:
  """What the training runs' final checkpoints are scored by in claim 1 (`pretrain_examples`):
  the validation MLM loss, or a translation run's BLEU (rows say `pretrain_metric_name`)."""
  names = {r.get('pretrain_metric_name', 'eval_loss') for r in results}
  return names.pop() if len(names) == 1 else 'mixed'


def interval_bigger_lower_loss(results: Sequence[Row], examples: Examples) -> dict[str, Any]:
  """Claim 1 by intervals: the final training checkpoint of each size (the end of the
  budget) on the same validation examples; per comparison, loss(smaller) - loss(largest)
  (token-weighted MLM loss, paired over sequences, hierarchical over seeds) or, for a
  translation sweep, BLEU(largest) - BLEU(smaller) (corpus BLEU of resampled sentences),
  wanted > 0, for the largest against every other size."""
  key = CLAIM_KEYS[0]
  sizes = model_sizes(results)
  largest = _largest(sizes)
  by_model = {m: [r for r in results if r['model'] == m] for m in sizes}
  name = pretrain_metric_name(results)
  spec = PER_EXAMPLE_METRICS[name]
  short = name.removeprefix('eval_')
  label = METRIC_LABELS.get(short, short)
  stat = spec.statistic
  big = _runs(by_model[largest], 'pretrain_examples', name, examples)
  difference = ((lambda m: f'{label}({largest}) - {label}({m})') if spec.higher_is_better
                else (lambda m: f'{label}({m}) - {label}({largest})'))
  comparisons = []
  for m in sizes:
    if m == largest:
      continue
    other = _runs(by_model[m], 'pretrain_examples', name, examples)
    a, b = (big, other) if spec.higher_is_better else (other, big)
    comparisons.append(_compare(a, b, stat, {
        'smaller': m, 'difference': difference(m),
        f'{short}_largest': float(np.mean([stat(r) for r in big])),
        f'{short}_smaller': float(np.mean([stat(r) for r in other]))}))
  verdict = _decide(key, comparisons,
                    {'largest': largest, 'total_params': dict(sizes), 'metric': label},
                    lambda c: f'{difference(c["smaller"])} = {_iv_text(c)}',
                    f'final training checkpoints of {len(sizes)} sizes on the same '
                    f'validation examples, by {label}')
  if name != 'eval_loss':
    verdict['claim'] = CLAIM_TEXT[key].replace(
        'the lowest validation MLM loss',
        f'the {"highest" if spec.higher_is_better else "lowest"} validation {label}')
  return verdict


def interval_bigger_more_robust(results: Sequence[Row], examples: Examples
                                ) -> dict[str, Any]:
  """Claim 2 by intervals: at the harshest pruning sparsity and the lowest bit width that
  every size has (as in the strict rule), per comparison drop(smaller) - drop(largest),
  wanted > 0, where a drop is dense minus compressed quality on the same examples (a
  difference of differences, paired over examples, hierarchical over seeds)."""
  key = CLAIM_KEYS[1]
  strict = claim_bigger_more_robust(aggregate_seeds(results))
  if strict['held'] is None and 'prune' not in strict['evidence']:
    return {**strict, 'verdict': 'undecided', 'rules': 'interval', 'margin': None,
            'interval': None}  # a baseline or missing-cell reason: no comparison exists
  sizes = model_sizes(results)
  largest = _largest(sizes)
  name = metric_name_key(results)
  statistic = PER_EXAMPLE_METRICS[name].statistic
  sign = 1.0 if all(higher_is_better(r) for r in results) else -1.0

  def cell_runs(m, method, setting):
    rows = [r for r in results if r['model'] == m and r['method'] == method
            and (setting is None or _setting(r, method) == setting)]
    return _runs(rows, 'examples', name, examples)

  comparisons = []
  for method in ('prune', 'quantize'):
    sub = strict['evidence'][method]
    if sub['held'] is None:
      continue
    setting = sub['sparsity' if method == 'prune' else 'bits']

    def paired(m):  # each seed's dense and compressed rows side by side
      return [np.concatenate([d, c], axis=1) for d, c in
              zip(cell_runs(m, 'dense', None), cell_runs(m, method, setting))]
    big = paired(largest)
    drop = drop_statistic(statistic, sign, width=big[0].shape[1] // 2)
    for m in sub['models']:
      if m != largest:
        comparisons.append(_compare(paired(m), big, drop, {
            'method': method, 'setting': setting, 'smaller': m,
            'difference': f'drop({m}) - drop({largest})'}))
  label = lambda c: (f'{percent(c["setting"])} sparsity' if c['method'] == 'prune'
                     else f'{c["setting"]} bits')
  return _decide(key, comparisons, {'largest': largest, 'metric': metric_name(results)},
                 lambda c: f'at {label(c)}, drop({c["smaller"]}) - drop({largest}) = '
                           f'{_iv_text(c)}',
                 f'{metric_name(results)} drops from dense, paired over examples')


def interval_compressed_big_beats_small(results: Sequence[Row], examples: Examples
                                        ) -> dict[str, Any]:
  """Claim 3 by intervals: at each budget of the strict rule (a smaller model's light cell's
  stored size), the best largest-model cell within it (by the mean over seeds) against the
  best smaller-model cell within it; quality(largest cell) - quality(best smaller cell),
  wanted > 0. (Picking the best cells first favours neither side: both are picked alike.)"""
  key = CLAIM_KEYS[2]
  agg = aggregate_seeds(results)
  strict = claim_compressed_big_beats_small(agg)
  if strict['held'] is None:
    return {**strict, 'verdict': 'undecided', 'rules': 'interval', 'margin': None,
            'interval': None}
  name = metric_name_key(results)
  statistic = PER_EXAMPLE_METRICS[name].statistic
  sign = 1.0 if all(higher_is_better(r) for r in results) else -1.0
  stat = statistic if sign > 0 else lambda rows: -statistic(rows)
  by_cell = {r['cell']: r for r in agg}
  largest = strict['evidence']['largest']
  comparisons = []
  for c in strict['evidence']['comparisons']:
    big = _runs(by_cell[c['largest_cell']]['seed_rows'], 'examples', name, examples)
    rival = _runs(by_cell[c['best_smaller_cell']]['seed_rows'], 'examples', name, examples)
    comparisons.append(_compare(big, rival, stat, {
        'budget_mb': c['budget_mb'], 'largest_cell': c['largest_cell'],
        'largest_label': c['largest_label'], 'best_smaller_cell': c['best_smaller_cell'],
        'best_smaller_label': c['best_smaller_label'],
        'largest_accuracy': c['largest_accuracy'],
        'best_smaller_accuracy': c['best_smaller_accuracy']}))
  return _decide(key, comparisons, {'largest': largest, 'metric': metric_name(results),
                                    'not_comparable': strict['evidence']['not_comparable']},
                 lambda c: f'at {c["budget_mb"]:.3g} MB, {largest} {c["largest_label"]} - '
                           f'{c["best_smaller_cell"]} = {_iv_text(c)}',
                 f'best cells within each stored-size budget, paired over examples')


def metric_name_key(results: Iterable[Row]) -> str:
  names = {r.get('metric_name', 'eval_accuracy') for r in results}
  return names.pop() if len(names) == 1 else 'mixed'


def budget_of(results: Iterable[Row]) -> dict[str, Any]:
  """Which pretraining budget the sizes were given: kind ('time', 'flops', 'tokens'), value,
  and what each size spent (steps, tokens, FLOPs, seconds; means over seeds)."""
  results = list(results)
  kinds = sorted({r.get('budget_kind', 'time') for r in results})
  kind = kinds[0] if len(kinds) == 1 else 'mixed'
  values = sorted({float(r.get('pretrain_budget', r['pretrain_budget_s'])) for r in results})
  spent: dict[str, dict[str, float]] = {}
  for m in model_sizes(results):
    seeds = {r.get('seed', 0): r for r in results if r['model'] == m}.values()
    spent[m] = {k: float(np.mean([r[f'pretrain_{k}'] for r in seeds]))
                for k in ('steps', 'tokens', 'flops', 'wall_s')
                if all(r.get(f'pretrain_{k}') is not None for r in seeds)}
  unit = {'time': 's of training time', 'flops': 'training FLOPs', 'tokens': 'tokens'}
  return {'kind': kind, 'value': values[0] if len(values) == 1 else values,
          'unit': unit.get(kind, ''), 'spent': spent}


RULES = ('interval', 'strict')


def evaluate_claims(results: Sequence[Row], curves: Curves, *, rules: str = 'interval',
                    examples: Examples | None = None) -> dict[str, dict[str, Any]]:
  """Verdicts on the three claims, keyed by CLAIM_KEYS (see the module docstring).

  `results` are the rows of results.jsonl (see `results.load_results`), `curves` the eval
  curves of `results.load_curves`, `examples` reads a row's per-example file (relative path
  -> {'loss', 'weight', 'correct'[, 'bleu']} arrays or None; results.load_examples). Under
  rules='interval',
  results without per-example data (older sweeps) are judged by the strict rules, and each
  claim's `rules_note` says so. The output is plain JSON-serialisable data.
  """
  if rules not in RULES:
    raise ValueError(f'rules={rules!r} is invalid; allowed: {", ".join(RULES)}.')
  results = list(results)
  note = None
  if rules == 'interval':
    if examples is None or any(not r.get('examples') or not r.get('pretrain_examples')
                               for r in results):
      note = ('strict rules: these results carry no per-example data (a sweep written before '
              'it was kept), so no intervals can be computed.')
    elif metric_name_key(results) not in PER_EXAMPLE_METRICS:
      note = (f'strict rules: no interval for the metric {metric_name(results)!r} yet.')
    elif pretrain_metric_name(results) not in PER_EXAMPLE_METRICS:
      note = 'strict rules: the training runs are scored by different metrics.'
    else:
      note = _missing_example_values(results, examples)
  if rules == 'strict' or note or len(model_sizes(results)) < 2:
    verdicts = strict_claims(aggregate_seeds(results), curves)
    for v in verdicts.values():
      v.update(verdict={True: 'held', False: 'not held'}.get(v['held'], 'undecided'),
               rules='strict', margin=None, interval=None)
      if note:
        v['rules_note'] = note
  else:
    verdicts = {
        CLAIM_KEYS[0]: interval_bigger_lower_loss(results, examples),
        CLAIM_KEYS[1]: interval_bigger_more_robust(results, examples),
        CLAIM_KEYS[2]: interval_compressed_big_beats_small(results, examples),
    }
  if results:
    budget = budget_of(results)
    for v in verdicts.values():
      v['budget'] = budget
  return verdicts


def _missing_example_values(results: Sequence[Row], examples: Examples) -> str | None:
  """The strict-rules note when the per-example files lack what the metrics need (sweeps
  written before a translation's per-sentence BLEU statistics were kept), checked on the
  first row's files; None when they have it."""
  first = results[0]
  for field, name in (('examples', metric_name_key(results)),
                      ('pretrain_examples', pretrain_metric_name(results))):
    data = examples(first[field])
    missing = [a for a in PER_EXAMPLE_METRICS[name].arrays if data is None or a not in data]
    if missing:
      return (f'strict rules: the per-example files carry no {missing[0]!r} values (a sweep '
              f'written before they were kept), so no intervals can be computed.')
  return None


def cell_interval(rows: Sequence[Row], examples: Examples | None,
                  n_resamples: int = 500) -> list[float] | None:
  """A cell's metric with its bootstrap interval over examples and seeds, [low, high]: the
  paired difference against a constant-zero model; None without per-example data."""
  if examples is None or any(not r.get('examples') for r in rows):
    return None
  name = metric_name_key(rows)
  if name not in PER_EXAMPLE_METRICS:
    return None
  try:
    runs = _runs(rows, 'examples', name, examples)
    zero = [np.zeros_like(runs[0])]  # a statistic of all-zero rows is 0 (ratio and BLEU)
    iv = uncertainty.paired_difference(runs, zero, statistic=PER_EXAMPLE_METRICS[name].statistic,
                                       n_resamples=n_resamples)
  except uncertainty.UncertaintyError:
    return None
  return [iv.low, iv.high]
