"""Confidence intervals for the comparisons behind each verdict: paired, hierarchical bootstrap.

Two models evaluated on the same examples differ by less noise than two independent samples
would suggest, so the difference is resampled *paired*: one draw of example indices serves
both models. When each model was trained with several seeds, the seeds are resampled too
(independently per model: seed s of one model has nothing to do with seed s of another), so
the interval also covers the variation between training runs. Percentile intervals.

A comparison's values are per-example rows: 0/1 correctness (accuracy), per-example losses,
or per-sentence BLEU sufficient statistics; `statistic` turns a resampled set of rows into
the score (the mean by default; BLEU from its summed statistics for translation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000
VERDICTS = ('held', 'not held', 'undecided')


class UncertaintyError(ValueError):
  """Inputs a comparison cannot be computed from."""


@dataclasses.dataclass(frozen=True)
class Interval:
  """difference = statistic(a) - statistic(b), with its [low, high] bootstrap interval."""
  difference: float
  low: float
  high: float
  confidence: float
  n_examples: int
  n_seeds: tuple[int, int]

  def as_dict(self) -> dict[str, float | int | list[int]]:
    d = dataclasses.asdict(self)
    d['n_seeds'] = list(self.n_seeds)
    return d


def mean_statistic(rows: np.ndarray) -> float:
  return float(np.mean(rows))


def _runs(runs: Sequence[np.ndarray], name: str) -> np.ndarray:
  arr = np.asarray([np.asarray(r, np.float64) for r in runs])
  if arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise UncertaintyError(f'{name} needs at least one run with at least one example; got '
                           f'shape {arr.shape}.')
  return arr


def paired_difference(a_runs: Sequence[np.ndarray], b_runs: Sequence[np.ndarray], *,
                      statistic: Callable[[np.ndarray], float] = mean_statistic,
                      confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> Interval:
  """statistic(a) - statistic(b) over the same examples, with a bootstrap interval.

  a_runs, b_runs: for each training run (seed) of a model, its per-example rows on the
  evaluation examples, [examples] or [examples, k]; every run of both models is evaluated on
  the same examples in the same order. The point estimate averages the statistic over runs.
  """
  if not 0 < confidence < 1:
    raise UncertaintyError(f'confidence={confidence!r} must lie in (0, 1).')
  a, b = _runs(a_runs, 'a_runs'), _runs(b_runs, 'b_runs')
  if a.shape[1:] != b.shape[1:]:
    raise UncertaintyError(f'the two models were evaluated on different examples: shapes '
                           f'{a.shape[1:]} and {b.shape[1:]}.')
  n = a.shape[1]
  point = np.mean([statistic(r) for r in a]) - np.mean([statistic(r) for r in b])
  rng = np.random.default_rng(seed)
  diffs = np.empty(n_resamples)
  for i in range(n_resamples):
    idx = rng.integers(0, n, n)  # shared by both models: the pairing
    runs_a = rng.integers(0, a.shape[0], a.shape[0])
    runs_b = rng.integers(0, b.shape[0], b.shape[0])
    diffs[i] = (np.mean([statistic(a[r][idx]) for r in runs_a]) -
                np.mean([statistic(b[r][idx]) for r in runs_b]))
  tail = (1 - confidence) / 2
  low, high = np.quantile(diffs, [tail, 1 - tail])
  return Interval(difference=float(point), low=float(low), high=float(high),
                  confidence=confidence, n_examples=n, n_seeds=(a.shape[0], b.shape[0]))


def verdict(interval: Interval, claim_wants_positive: bool = True) -> str:
  """'held' when the whole interval lies on the claim's side of zero, 'not held' when it lies
  wholly on the other side, 'undecided' when it includes zero (the data cannot tell)."""
  low, high = ((interval.low, interval.high) if claim_wants_positive
               else (-interval.high, -interval.low))
  if low > 0:
    return 'held'
  if high < 0:
    return 'not held'
  return 'undecided'


def combine_verdicts(verdicts: Sequence[str]) -> str:
  """A claim made of several comparisons: held only if all are, not held if any is not."""
  if not verdicts:
    return 'undecided'
  if any(v == 'not held' for v in verdicts):
    return 'not held'
  return 'held' if all(v == 'held' for v in verdicts) else 'undecided'


def bleu_statistic(stats: np.ndarray) -> float:
  """Corpus BLEU of a set of sentences from their per-sentence sufficient statistics
  ([sentences, 10] in sacreBLEU's layout, tasks/translate.BLEU_STATISTICS), summed."""
  from trainbig_jax.tasks import translate  # the owner of BLEU's statistics; heavy to import
  return translate.bleu_from_statistics(stats.sum(axis=0))
