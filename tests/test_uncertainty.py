"""Bootstrap intervals behind the verdicts: coverage, decisions, seeds, BLEU."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import BLEU

from trainbig_jax.experiments import uncertainty as unc
from trainbig_jax.tasks import translate


def correlated_outcomes(rng, n, p_a, p_b):
  """0/1 correctness of two models on the same n examples, with per-example difficulty."""
  difficulty = rng.uniform(size=n)
  return ((difficulty < p_a).astype(float), (difficulty + rng.normal(0, 0.15, n) < p_b)
          .astype(float))


def test_interval_covers_the_true_difference_at_about_the_nominal_rate():
  rng = np.random.default_rng(0)
  covered, widths, trials = 0, [], 120
  # Per-example: a is right when difficulty < 0.75; b when difficulty + noise < 0.70.
  truth_rng = np.random.default_rng(1)
  big_a, big_b = correlated_outcomes(truth_rng, 2_000_000, 0.75, 0.70)
  true_diff = big_a.mean() - big_b.mean()
  for trial in range(trials):
    a, b = correlated_outcomes(rng, 400, 0.75, 0.70)
    ci = unc.paired_difference([a], [b], n_resamples=400, seed=trial)
    covered += ci.low <= true_diff <= ci.high
    widths.append(ci.high - ci.low)
  rate = covered / trials
  assert 0.88 <= rate <= 0.99, rate  # nominal 0.95; 120 trials give about +-0.02 sd
  # Pairing helps: the interval is narrower than an unpaired one (sqrt(var_a + var_b)).
  unpaired = 2 * 1.96 * np.sqrt(0.75 * 0.25 / 400 + 0.7 * 0.3 / 400)
  assert np.mean(widths) < 0.8 * unpaired


def test_verdicts_follow_the_interval():
  rng = np.random.default_rng(2)
  a, b = correlated_outcomes(rng, 1275, 0.70, 0.699)  # far inside the noise
  ci = unc.paired_difference([a], [b], n_resamples=1000)
  assert ci.low < 0 < ci.high and unc.verdict(ci) == 'undecided'
  a, b = correlated_outcomes(rng, 1275, 0.80, 0.60)  # far outside it
  ci = unc.paired_difference([a], [b], n_resamples=1000)
  assert ci.low > 0.1
  assert unc.verdict(ci) == 'held'
  assert unc.verdict(ci, claim_wants_positive=False) == 'not held'
  ci_rev = unc.paired_difference([b], [a], n_resamples=1000)
  assert unc.verdict(ci_rev) == 'not held'
  assert ci_rev.difference == pytest.approx(-ci.difference)
  assert unc.combine_verdicts(['held', 'held']) == 'held'
  assert unc.combine_verdicts(['held', 'undecided']) == 'undecided'
  assert unc.combine_verdicts(['undecided', 'not held', 'held']) == 'not held'
  assert unc.combine_verdicts([]) == 'undecided'


def test_seed_variation_widens_the_interval():
  rng = np.random.default_rng(3)
  a, b = correlated_outcomes(rng, 800, 0.75, 0.70)
  one = unc.paired_difference([a], [b], n_resamples=800)
  # Three runs of a whose accuracies differ by training noise (flip 8% of outcomes each).
  runs = [np.where(rng.uniform(size=a.size) < 0.08, 1 - a, a) for _ in range(3)]
  several = unc.paired_difference(runs, [b], n_resamples=800)
  assert several.n_seeds == (3, 1)
  assert several.difference == pytest.approx(np.mean([r.mean() for r in runs]) - b.mean())
  assert several.high - several.low > one.high - one.low


def test_sentence_bleu_statistics_sum_to_sacrebleu_corpus_bleu():
  hyps = ['le chat est sur le tapis', 'un chien court vite', 'bonjour le monde', 'oui', '',
          'Choisissez Format - Caractère.', 'Cliquez sur OK , puis fermez .']
  refs = ['le chat est sur le tapis', 'le chien court vite', 'bonjour tout le monde', 'non',
          'vide', 'Choisissez Format - Caractère.', 'Cliquez sur OK, puis fermez.']
  stats = translate.sentence_bleu_statistics(hyps, refs)
  assert stats.shape == (len(hyps), len(translate.BLEU_STATISTICS))
  # Exactly the segment statistics sacreBLEU's corpus score sums (its own, private, reader).
  np.testing.assert_array_equal(stats, BLEU()._extract_corpus_statistics(hyps, [refs]))
  for subset in (slice(None), slice(0, 3), slice(2, 7)):
    assert unc.bleu_statistic(stats[subset]) == pytest.approx(
        sacrebleu.corpus_bleu(hyps[subset], [refs[subset]]).score, abs=1e-9)
  worse = translate.sentence_bleu_statistics(['le', 'un', 'le', 'oui', '', 'Format', 'OK'],
                                             refs)
  ci = unc.paired_difference([stats], [worse], statistic=unc.bleu_statistic, n_resamples=200)
  assert ci.difference == pytest.approx(unc.bleu_statistic(stats) - unc.bleu_statistic(worse))
  assert ci.low <= ci.difference <= ci.high
  with pytest.raises(ValueError, match='7 hypotheses but 6 references'):
    translate.sentence_bleu_statistics(hyps, refs[:6])


def test_bad_inputs():
  with pytest.raises(unc.UncertaintyError, match='different examples'):
    unc.paired_difference([np.ones(5)], [np.ones(6)])
  with pytest.raises(unc.UncertaintyError, match='at least one run'):
    unc.paired_difference([], [np.ones(6)])
  with pytest.raises(unc.UncertaintyError, match='confidence=1.5'):
    unc.paired_difference([np.ones(5)], [np.ones(5)], confidence=1.5)
