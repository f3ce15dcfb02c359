"""Claims by intervals: verdicts from constructed results with per-example data, seeds, the
strict rules by name, and the fallback for results without per-example data."""

import numpy as np
import pytest

from trainbig_jax.experiments import claims as claims_lib
from trainbig_jax.experiments import uncertainty as unc
from trainbig_jax.experiments.claims import CLAIM_KEYS, evaluate_claims
from trainbig_jax.experiments.report import claims_table

LOSS, ROBUST, EQUAL_SIZE = CLAIM_KEYS
SMALL, BIG = 'L1_H32', 'L2_H64'
N = 1500
# Stored bytes per cell: the big model's int4 cell fits within the small model's dense size.
BYTES = {SMALL: {'dense': 4000, 'prune50': 2600, 'int4': 500},
         BIG: {'dense': 20000, 'prune50': 12000, 'int4': 2500}}


def make_sweep(acc, loss, seeds=1, noise=0.0, shared=False):
  """(rows, examples): acc[model][cell] accuracies, loss[model] mean MLM loss per token.

  Every cell of a model thresholds the same uniform draw per example (plus per-seed noise in
  the threshold), so its drops under compression are exact; models draw independently unless
  `shared` (then differences between models are exact too). Seed k shifts a model's
  thresholds by +-noise, in opposite directions for the two models."""
  rows, examples = [], {}
  for model, cells in acc.items():
    for seed in range(seeds):
      u = np.random.default_rng(0 if shared else 1000 * (model == BIG)).random(N)
      shift = noise * (-1) ** seed * (1 if model == BIG else -1)
      pre = f'examples/{model}/seed{seed}/pretrain.npz'
      weight = np.full(N, 5.0)
      seq = np.random.default_rng(1 + seed + 1000 * (model == BIG)).normal(0.0, 1.0, N)
      examples[pre] = {'loss': weight * (loss[model] + seq), 'weight': weight,
                       'correct': np.zeros(N)}
      for cell, a in cells.items():
        path = f'examples/{model}/seed{seed}/{cell}.npz'
        correct = (u < a + shift).astype(float)
        examples[path] = {'loss': 1.0 - correct, 'weight': np.ones(N), 'correct': correct}
        method, sparsity, bits = {'dense': ('dense', 0.0, 32), 'prune50': ('prune', 0.5, 32),
                                  'int4': ('quantize', 0.0, 4)}[cell]
        rows.append({
            'cell': f'{model}/seed{seed}/{cell}', 'model': model, 'seed': seed,
            'layers': int(model[1]), 'hidden': int(model.split('H')[1]),
            'total_params': 1000 if model == SMALL else 5000, 'budget_kind': 'flops',
            'pretrain_budget': 1e9, 'pretrain_budget_s': 0.0, 'pretrain_steps': 10,
            'pretrain_wall_s': 1.0, 'pretrain_tokens': 100.0, 'pretrain_flops': 1e9,
            'pretrain_eval_loss': loss[model], 'method': method, 'sparsity': sparsity,
            'bits': bits, 'nonzero_params': 1, 'stored_bytes': BYTES[model][cell],
            'dense_fp32_bytes': 1, 'metric': float(correct.mean()),
            'metric_name': 'eval_accuracy', 'higher_is_better': True,
            'majority_accuracy': 0.5, 'examples': path, 'pretrain_examples': pre})
  return rows, examples


def clear(big_better: bool):
  good = {'dense': 0.85, 'prune50': 0.84, 'int4': 0.83}
  bad = {'dense': 0.75, 'prune50': 0.55, 'int4': 0.56}
  acc = {BIG: good, SMALL: bad} if big_better else {BIG: bad, SMALL: good}
  loss = {BIG: 3.0, SMALL: 3.5} if big_better else {BIG: 3.5, SMALL: 3.0}
  return acc, loss


def verdicts(rows, examples, **kw):
  return evaluate_claims(rows, {}, examples=examples.get, **kw)


def test_large_differences_hold():
  v = verdicts(*make_sweep(*clear(big_better=True)))
  for key in CLAIM_KEYS:
    assert v[key]['rules'] == 'interval'
    assert v[key]['verdict'] == 'held' and v[key]['held'] is True, (key, v[key])
    lo, hi = v[key]['interval']
    assert 0 < lo <= v[key]['margin'] <= hi
  assert v[LOSS]['margin'] == pytest.approx(0.5, abs=0.1)
  # Claim 2: drop(small) - drop(big) at 50% sparsity = 0.20 - 0.01, and at 4 bits 0.19 - 0.02.
  assert v[ROBUST]['margin'] == pytest.approx(0.17, abs=0.03)
  assert v[EQUAL_SIZE]['budget']['kind'] == 'flops'


def test_reversed_differences_are_not_held():
  v = verdicts(*make_sweep(*clear(big_better=False)))
  for key in CLAIM_KEYS:
    assert v[key]['verdict'] == 'not held', (key, v[key])
    assert v[key]['interval'][1] < 0


def test_differences_inside_the_noise_are_undecided():
  acc = {BIG: {'dense': 0.700, 'prune50': 0.699, 'int4': 0.699},
         SMALL: {'dense': 0.699, 'prune50': 0.698, 'int4': 0.698}}
  v = verdicts(*make_sweep(acc, {BIG: 3.0, SMALL: 3.001}, seeds=2, noise=0.01, shared=True))
  for key in CLAIM_KEYS:
    assert v[key]['verdict'] == 'undecided', (key, v[key])
    lo, hi = v[key]['interval']
    assert lo < 0 < hi
  # The strict rules, by name, decide the same data on points.
  strict = verdicts(*make_sweep(acc, {BIG: 3.0, SMALL: 3.001}, seeds=2, noise=0.01,
                               shared=True), rules='strict')
  assert strict[LOSS]['rules'] == 'strict' and strict[EQUAL_SIZE]['interval'] is None
  assert strict[EQUAL_SIZE]['verdict'] in ('held', 'not held')


def test_seeds_widen_the_interval():
  acc, loss = clear(big_better=True)
  one = verdicts(*make_sweep(acc, loss, seeds=1))
  many = verdicts(*make_sweep(acc, loss, seeds=3, noise=0.05))
  width = lambda v: v[EQUAL_SIZE]['interval'][1] - v[EQUAL_SIZE]['interval'][0]
  assert width(many) > 1.5 * width(one)
  assert many[EQUAL_SIZE]['evidence']['comparisons'][0]['n_seeds'] == [3, 3]


def test_results_without_per_example_data_fall_back_to_strict():
  rows, examples = make_sweep(*clear(big_better=True))
  old = [{k: v for k, v in r.items() if k not in ('examples', 'pretrain_examples')}
         for r in rows]
  v = verdicts(old, examples)
  for key in (ROBUST, EQUAL_SIZE):
    assert v[key]['rules'] == 'strict' and 'per-example' in v[key]['rules_note']
    assert v[key]['verdict'] == 'held' and v[key]['interval'] is None
  table = claims_table(v)
  assert 'strict rules' in table and 'per-example' in table


def test_table_prints_verdict_margin_and_interval():
  v = verdicts(*make_sweep(*clear(big_better=False)))
  table = claims_table(v)
  for key in CLAIM_KEYS:
    line = next(l for l in table.splitlines() if l.startswith(key))
    assert 'not held' in line and f'{v[key]["margin"]:+.4f}' in line
    assert f'{v[key]["interval"][0]:+.4f}' in line
  assert 'budget: flops' in table


def test_unknown_rules_is_one_line_error():
  with pytest.raises(ValueError, match="rules='loose' is invalid; allowed: interval, strict"):
    evaluate_claims([], {}, rules='loose')


# ----------------------------------------------------------------- a translation sweep (BLEU)

SENTENCES = 300


def make_translation_sweep(quality):
  """(rows, examples) of a translation sweep: quality[model][cell] is the n-gram precision
  of that cell's translations. Every sentence has a difficulty shared by all cells (as the
  same validation sentences would), so differences between cells are paired; per-sentence
  matches are binomial draws around it."""
  rows, examples = [], {}
  rng = np.random.default_rng(7)
  lengths = rng.integers(6, 30, SENTENCES)
  difficulty = rng.uniform(-0.15, 0.15, SENTENCES)
  totals = np.stack([np.maximum(lengths - n, 0) for n in range(4)], axis=1)
  for model, cells in quality.items():
    for cell, q in cells.items():
      p = np.clip(q - difficulty, 0.01, 0.99)[:, None] ** np.arange(1, 5)
      draws = np.random.default_rng([model == BIG, list(cells).index(cell)])
      correct = draws.binomial(totals, p)
      stats = np.column_stack([lengths, lengths, correct, totals]).astype(float)
      path = f'examples/{model}/{cell}.npz'
      examples[path] = {'loss': lengths * (1 - q), 'weight': lengths.astype(float),
                        'correct': lengths * q, 'bleu': stats}
      method, sparsity, bits = {'dense': ('dense', 0.0, 32), 'prune50': ('prune', 0.5, 32),
                                'int4': ('quantize', 0.0, 4)}[cell]
      rows.append({
          'cell': f'{model}/{cell}', 'model': model, 'seed': 0,
          'layers': int(model[1]), 'hidden': int(model.split('H')[1]),
          'total_params': 1000 if model == SMALL else 5000, 'budget_kind': 'time',
          'pretrain_budget': 60.0, 'pretrain_budget_s': 60.0, 'pretrain_steps': 10,
          'pretrain_wall_s': 60.0, 'pretrain_eval_loss': 3.0, 'method': method,
          'sparsity': sparsity, 'bits': bits, 'nonzero_params': 1,
          'stored_bytes': BYTES[model][cell], 'dense_fp32_bytes': 1,
          'metric': unc.bleu_statistic(stats), 'metric_name': 'eval_bleu',
          'higher_is_better': True, 'majority_accuracy': None, 'examples': path,
          # As the sweep writes them: a translation run is its own dense cell.
          'pretrain_examples': f'examples/{model}/dense.npz',
          'pretrain_metric_name': 'eval_bleu'})
  return rows, examples


def test_translation_claims_get_bleu_intervals_held_or_undecided_as_the_data_say():
  good = {'dense': 0.70, 'prune50': 0.69, 'int4': 0.68}
  bad = {'dense': 0.55, 'prune50': 0.40, 'int4': 0.41}
  rows, examples = make_translation_sweep({BIG: good, SMALL: bad})
  v = verdicts(rows, examples)
  for key in CLAIM_KEYS:
    assert v[key]['rules'] == 'interval' and v[key]['verdict'] == 'held', (key, v[key])
    lo, hi = v[key]['interval']
    assert 0 < lo <= v[key]['margin'] <= hi
  by_cell = {r['cell']: r['metric'] for r in rows}
  # Claim 1 compares the runs' final BLEU: BLEU(largest) - BLEU(smaller), corpus BLEU points.
  assert v[LOSS]['margin'] == pytest.approx(
      by_cell[f'{BIG}/dense'] - by_cell[f'{SMALL}/dense'])
  assert 'BLEU' in v[LOSS]['claim'] and 'highest validation BLEU' in v[LOSS]['claim']
  assert v[ROBUST]['evidence']['metric'] == 'BLEU'
  # Claim 3: the big model's int4 cell (2500 bytes) against the small dense one (4000).
  assert v[EQUAL_SIZE]['margin'] == pytest.approx(
      by_cell[f'{BIG}/int4'] - by_cell[f'{SMALL}/dense'])
  # Qualities a hair apart: the data cannot tell.
  near = {'dense': 0.600, 'prune50': 0.599, 'int4': 0.598}
  nearer = {'dense': 0.599, 'prune50': 0.598, 'int4': 0.597}
  v = verdicts(*make_translation_sweep({BIG: near, SMALL: nearer}))
  for key in CLAIM_KEYS:
    assert v[key]['verdict'] == 'undecided', (key, v[key])
    lo, hi = v[key]['interval']
    assert lo < 0 < hi
  table = claims_table(v)
  assert 'interval rules' in table and 'BLEU' in table


def test_translation_results_without_bleu_statistics_fall_back_to_strict():
  rows, examples = make_translation_sweep({BIG: {'dense': 0.7, 'prune50': 0.6, 'int4': 0.6},
                                           SMALL: {'dense': 0.5, 'prune50': 0.3, 'int4': 0.3}})
  old = {path: {k: a for k, a in data.items() if k != 'bleu'}
         for path, data in examples.items()}
  v = verdicts(rows, old)
  for key in CLAIM_KEYS:
    assert v[key]['rules'] == 'strict' and "no 'bleu' values" in v[key]['rules_note']


# --- the helpers under the interval verdicts ------------------------------------------------


def _comparison(verdict, interval):
  return {'verdict': verdict, 'interval': interval,
          'margin': None if interval is None else sum(interval) / 2, 'name': str(interval)}


def test_the_decisive_comparison_is_the_clearest_refutation_or_the_weakest_support():
  refuting = [_comparison('not held', [-0.5, -0.1]), _comparison('not held', [-0.3, -0.2])]
  decided = claims_lib._decide(CLAIM_KEYS[0], refuting, {}, lambda c: c['name'], 'rule')
  assert decided['verdict'] == 'not held' and decided['interval'] == [-0.3, -0.2]  # lowest upper
  assert decided['explanation'] == ('rule; 2 comparison(s): 2 not held. Decisive: '
                                    '[-0.3, -0.2]')
  supporting = [_comparison('held', [0.1, 0.5]), _comparison('held', [0.2, 0.3])]
  decided = claims_lib._decide(CLAIM_KEYS[0], supporting, {}, lambda c: c['name'], 'rule')
  assert decided['verdict'] == 'held' and decided['interval'] == [0.1, 0.5]  # lowest lower
  no_interval = [_comparison('undecided', None)]
  decided = claims_lib._decide(CLAIM_KEYS[0], no_interval, {}, lambda c: c['name'], 'rule')
  assert decided['explanation'] == 'rule; 1 comparison(s): 1 undecided.'
  assert decided['margin'] is None and decided['interval'] is None


def test_runs_reads_each_distinct_file_once_in_seed_order():
  rows = [{'seed': 2, 'examples': 'c'}, {'seed': 0, 'examples': 'a'},
          {'seed': 1, 'examples': 'a'}, {'seed': 3, 'examples': 'b'}]
  files = {name: {'correct': np.full(2, i, float), 'weight': np.ones(2)}
           for i, name in enumerate('abc')}
  read = []
  runs = claims_lib._runs(rows, 'examples', 'eval_accuracy',
                          lambda f: read.append(f) or files[f])
  assert read == ['a', 'c', 'b']  # seeds 0, 2, 3: seed 1's file is seed 0's
  assert [r[0, 0] for r in runs] == [0.0, 2.0, 1.0] and runs[0].shape == (2, 2)


def test_a_cell_interval_brackets_the_cells_metric_from_its_examples():
  rng = np.random.default_rng(0)
  correct = (rng.random(400) < 0.7).astype(float)
  rows = [{'seed': 0, 'examples': 'x', 'metric_name': 'eval_accuracy'}]
  files = {'x': {'correct': correct, 'weight': np.ones(400)}}
  low, high = claims_lib.cell_interval(rows, files.get, n_resamples=200)
  assert low < correct.mean() < high and high - low < 0.2
  assert claims_lib.cell_interval(rows, None) is None  # no per-example data: no interval
  assert claims_lib.cell_interval([{**rows[0], 'examples': None}], files.get) is None


def test_a_flops_budget_is_labelled_in_training_flops():
  rows = [{'model': 'S', 'total_params': 1, 'budget_kind': 'flops', 'pretrain_budget': 1e12,
           'pretrain_budget_s': 0.0, 'seed': 0}]
  budget = claims_lib.budget_of(rows)
  assert budget['kind'] == 'flops' and budget['unit'] == 'training FLOPs'
  assert budget['value'] == 1e12


def test_claims_without_compressed_cells_are_undecided_with_the_verdicts_keys():
  rows, examples = make_sweep(*clear(big_better=True))
  dense = [r for r in rows if r['method'] == 'dense']
  one_size = [r for r in rows if r['model'] == BIG]
  for fn, cells in ((claims_lib.interval_bigger_more_robust, one_size),
                    (claims_lib.interval_bigger_more_robust, dense),
                    (claims_lib.interval_compressed_big_beats_small, one_size),
                    (claims_lib.interval_compressed_big_beats_small, dense)):
    v = fn(cells, examples.get)
    assert v['held'] is None  # the strict rule could not decide: no comparison exists
    assert (v['verdict'], v['rules'], v['margin'], v['interval']) == (
        'undecided', 'interval', None, None)


def test_the_equal_size_claim_keeps_the_strict_rules_incomparable_sizes():
  rows, examples = make_sweep(*clear(big_better=True))
  v = verdicts(rows, examples)[EQUAL_SIZE]
  strict = claims_lib.claim_compressed_big_beats_small(claims_lib.aggregate_seeds(rows))
  assert v['evidence']['not_comparable'] == strict['evidence']['not_comparable']


def test_a_comparison_whose_interval_cannot_be_computed_is_undecided():
  runs = lambda n: [np.column_stack([np.ones(n), np.ones(n)])]
  c = claims_lib._compare(runs(3), runs(4), claims_lib.ratio_statistic, {'smaller': 'S'})
  assert (c['verdict'], c['margin'], c['interval'], c['smaller']) == (
      'undecided', None, None, 'S')
  assert c['reason']


def test_seeds_are_aggregated_into_one_row_per_cell_led_by_the_lowest_seed():
  rows = [{'model': 'S', 'method': 'dense', 'sparsity': 0.0, 'bits': 32, 'seed': s,
           'metric': m, 'examples': f'e{s}'} for s, m in ((2, 0.9), (0, 0.5), (1, 0.7))]
  (cell,) = claims_lib.aggregate_seeds(rows)
  assert cell['metric'] == pytest.approx(0.7) and cell['n_seeds'] == 3
  assert cell['metric_std'] == pytest.approx(np.std([0.5, 0.7, 0.9]))
  assert cell['examples'] == 'e0' and [r['seed'] for r in cell['seed_rows']] == [0, 1, 2]


def test_budget_records_what_each_size_spent_and_the_tokens_unit():
  rows = [{'model': 'S', 'total_params': 1, 'budget_kind': 'tokens', 'pretrain_budget': 1e6,
           'pretrain_budget_s': 0.0, 'seed': s, 'pretrain_steps': 10 + s,
           'pretrain_tokens': 1e6, 'pretrain_flops': 2e9, 'pretrain_wall_s': 3.0}
          for s in (0, 1)]
  budget = claims_lib.budget_of(rows)
  assert budget['unit'] == 'tokens'
  assert budget['spent'] == {'S': {'steps': 10.5, 'tokens': 1e6, 'flops': 2e9, 'wall_s': 3.0}}


def test_interval_verdicts_name_the_largest_size_and_the_metric():
  v = verdicts(*make_sweep(*clear(big_better=True)))
  for key in CLAIM_KEYS:
    assert v[key]['evidence']['largest'] == BIG, key
    assert v[key]['evidence']['metric'] == ('loss' if key == LOSS else 'accuracy'), key


def test_robustness_is_judged_on_quantization_alone_when_no_size_was_pruned():
  rows, examples = make_sweep(*clear(big_better=True))
  v = verdicts([r for r in rows if r['method'] != 'prune'], examples)[ROBUST]
  assert [c['method'] for c in v['evidence']['comparisons']] == ['quantize']
  assert v['verdict'] == 'held'
