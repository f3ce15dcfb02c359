"""The claims rules at their edges: ties, equal parameter counts, several cells at one setting,
results from several pretraining budgets, and the exact explanations a report shows.

Each case is built so that the rule in claims.py's docstrings gives one answer and a plausible
off-by-one (`<` for `<=`, min for max, first for mean, a dropped tie-break) gives another.
"""

from __future__ import annotations


import pytest

from trainbig_jax.experiments import claims as claims_lib
from trainbig_jax.experiments.claims import CLAIM_KEYS, evaluate_claims

from test_report import SMALL, make_curves, make_results

LOSS, ROBUST, EQUAL_SIZE = CLAIM_KEYS


PARAMS = {'small': 10, 'mid': 15, 'big': 20}


def row(model, method='dense', sparsity=0.0, bits=32, accuracy=0.8, stored=1000, params=None,
        **extra):
  params = PARAMS.get(model, 100) if params is None else params
  return {'model': model, 'method': method, 'sparsity': sparsity, 'bits': bits,
          'accuracy': accuracy, 'stored_bytes': stored, 'total_params': params,
          'cell': f'{model}/{method}/{sparsity}/{bits}', 'pretrain_budget_s': 60.0, **extra}


def curve(times, losses):
  return {'step': [10 * (i + 1) for i in range(len(times))], 'wall_time_s': list(times),
          'eval_loss': list(losses)}


# ----------------------------------------------------------------------------- helpers

def test_model_sizes_take_the_largest_count_and_order_ties_by_name():
  rows = [row('b', params=50), row('a', params=50), row('c', params=10),
          row('c', params=70), row('d', params=90), row('d', params=20), row('z', params=0)]
  # The largest count of a model's rows, in either order.
  assert list(claims_lib.model_sizes(rows).items()) == [
      ('z', 0), ('a', 50), ('b', 50), ('c', 70), ('d', 90)]
  # Equal parameter counts: the largest model is the last name.
  assert claims_lib._largest({'a': 50, 'b': 50}) == 'b'
  assert claims_lib._largest({'b': 50, 'a': 50}) == 'b'


def test_labels_and_percent():
  assert claims_lib.percent(0.875) == '87.5%'
  assert claims_lib.percent(0.5) == '50%'
  assert claims_lib._mb(2_500_000) == '2.5 MB'
  assert claims_lib._mb(1_125_001) == '1.13 MB'  # just above a rounding boundary: exact 1e6
  assert claims_lib._fmt(3.14159) == '3.142'
  assert claims_lib.cell_label(row('m')) == 'dense'
  assert claims_lib.cell_label(row('m', 'prune', 0.75)) == 'prune 75%'
  assert claims_lib.cell_label(row('m', 'quantize', bits=4)) == 'quantize 4-bit'
  assert claims_lib.cell_label(row('m', 'prune_quantize', 0.5, 4)) == 'prune 50% + 4-bit'
  assert claims_lib.cell_label(row('m', 'other', 0.5, 4)) == 'other s=0.5 b=4'


def test_best_within_budget_is_inclusive_and_ties_pick_the_smaller():
  rows = [row('m', accuracy=0.7, stored=100), row('m', accuracy=0.9, stored=300),
          row('m', accuracy=0.9, stored=200), row('m', accuracy=0.95, stored=301)]
  assert claims_lib.best_within(rows, 300)['stored_bytes'] == 200
  assert claims_lib.best_within(rows, 301)['accuracy'] == 0.95  # stored == budget fits
  assert claims_lib.best_within(rows, 199)['stored_bytes'] == 100
  assert claims_lib.best_within(rows, 99) is None


def test_pareto_frontier_needs_strictly_higher_accuracy():
  rows = [row('m', accuracy=0.8, stored=300), row('m', accuracy=0.8, stored=100),
          row('m', accuracy=0.6, stored=100), row('m', accuracy=0.9, stored=300),
          row('m', accuracy=0.85, stored=400)]
  assert [(r['stored_bytes'], r['accuracy']) for r in claims_lib.pareto_frontier(rows)] == [
      (100, 0.8), (300, 0.9)]
  # A larger cell that only matches the best accuracy so far is not on the frontier.
  same = [row('m', accuracy=0.8, stored=100), row('m', accuracy=0.8, stored=200)]
  assert [r['stored_bytes'] for r in claims_lib.pareto_frontier(same)] == [100]


def test_loss_at_is_the_last_eval_at_or_before_t():
  c = curve([0.0, 10.0, 20.0, 30.0], [9.0, 5.0, 4.0, 3.0])
  assert claims_lib.loss_at(c, 20.0) == (4.0, 20.0, 30)
  assert claims_lib.loss_at(c, 29.9) == (4.0, 20.0, 30)
  assert claims_lib.loss_at(c, 0.0) == (9.0, 0.0, 10)
  assert claims_lib.loss_at(curve([5.0], [1.0]), 4.0) is None
  # Two evals logged at the same time: the later line counts.
  assert claims_lib.loss_at(curve([10.0, 10.0], [5.0, 4.0]), 10.0) == (4.0, 10.0, 20)
  # Unordered evals: the latest time at or before t, not the last one listed.
  assert claims_lib.loss_at(curve([20.0, 10.0], [4.0, 5.0]), 25.0) == (4.0, 20.0, 10)


def test_light_cells_are_dense_plus_the_least_compressed_of_each_method():
  rows = [row('m'), row('m', 'prune', 0.5, stored=500, accuracy=0.7),
          row('m', 'prune', 0.25, stored=750, accuracy=0.6),
          row('m', 'quantize', bits=8, stored=250), row('m', 'quantize', bits=4, stored=125),
          row('m', 'quantize', bits=6, stored=250, accuracy=0.9)]
  light = claims_lib.light_cells(rows)
  assert [(r['method'], r['stored_bytes'], r['accuracy']) for r in light] == [
      ('dense', 1000, 0.8), ('prune', 750, 0.6), ('quantize', 250, 0.9)]


# ----------------------------------------------------------------------------- claim 1

def test_claim1_a_tie_in_loss_is_not_held():
  rows = [row('small', params=10), row('big', params=20)]
  curves = {'small': curve([10, 20], [5.0, 4.0]), 'big': curve([10, 20], [6.0, 4.0])}
  v = claims_lib.claim_bigger_lower_loss(rows, curves)
  assert v['held'] is False
  assert v['evidence']['lowest_loss_model'] == 'small'
  curves['big']['eval_loss'][-1] = 3.999
  won = claims_lib.claim_bigger_lower_loss(rows, curves)
  assert won['held'] is True and won['evidence']['lowest_loss_model'] == 'big'


def test_claim1_common_time_is_the_earliest_final_eval_and_a_step_function():
  rows = [row('small', params=10), row('big', params=20), row('mid', params=15)]
  curves = {'small': curve([0, 10, 30], [9.0, 5.0, 4.0]),
            'mid': curve([0, 12, 25], [9.0, 4.6, 4.2]),  # final eval at 25: common time
            'big': curve([0, 20, 26], [9.0, 4.5, 1.0])}  # its 26 s eval is past 25
  v = claims_lib.claim_bigger_lower_loss(rows, curves)
  ev = v['evidence']
  assert ev['time_s'] == 25
  assert ev['total_params'] == {'small': 10, 'mid': 15, 'big': 20}
  assert ev['loss_at_time'] == {'small': 5.0, 'mid': 4.2, 'big': 4.5}
  assert ev['eval_time_used_s'] == {'small': 10, 'mid': 25, 'big': 20}
  assert ev['step_at_time'] == {'small': 20, 'mid': 30, 'big': 20}
  assert v['held'] is False and ev['lowest_loss_model'] == 'mid'


def test_claim1_equal_parameter_counts_compare_the_last_name():
  rows = [row('a', params=10), row('b', params=10)]
  curves = {'a': curve([10, 20], [5.0, 4.0]), 'b': curve([10, 20], [5.0, 3.0])}
  v = claims_lib.claim_bigger_lower_loss(rows, curves)
  assert v['evidence']['largest'] == 'b' and v['held'] is True
  curves['a']['eval_loss'][-1] = 2.0
  assert claims_lib.claim_bigger_lower_loss(rows, curves)['held'] is False


def test_claim1_results_from_several_budgets_are_listed():
  rows = [row('small', params=10, pretrain_budget_s=30.0),
          row('small', params=10, pretrain_budget_s=60.0), row('big', params=20)]
  rows[-1]['pretrain_budget_s'] = 60.0
  curves = {'small': curve([10, 20], [5.0, 4.0]), 'big': curve([10, 20], [5.0, 3.0])}
  ev = claims_lib.claim_bigger_lower_loss(rows, curves)['evidence']
  assert ev['pretrain_budget_s'] == [30.0, 60.0]
  one = [r for r in rows if r['pretrain_budget_s'] == 60.0]
  assert claims_lib.claim_bigger_lower_loss(one, curves)['evidence']['pretrain_budget_s'] == 60.0


def test_claim1_null_cases_name_what_is_missing():
  rows = [row('small', params=10), row('big', params=20)]
  only_small = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([10], [5.0]), 'ghost': curve([10], [1.0])})
  assert only_small['held'] is None
  assert only_small['reason'] == ('needs eval curves of at least 2 sizes with results; have 1 '
                                  '(small).')
  assert only_small['evidence']['ignored_models_without_results'] == ['ghost']
  assert only_small['evidence']['total_params'] == {'small': 10}
  none = claims_lib.claim_bigger_lower_loss(rows, {})
  assert none['reason'].endswith('have 0 (none).')
  no_big = claims_lib.claim_bigger_lower_loss(
      rows + [row('mid', params=15)], {'small': curve([10], [5.0]), 'mid': curve([10], [4.0])})
  assert no_big['reason'] == 'the largest model big has no pretraining eval curve.'
  assert no_big['evidence']['total_params'] == {'small': 10, 'mid': 15}
  untrained = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([0], [5.0]), 'big': curve([0, 10], [5.0, 4.0])})
  assert untrained['reason'] == 'no eval after training started for: small.'
  assert untrained['evidence']['total_params'] == {'small': 10, 'big': 20}
  # Only sizes with nothing after step 0 are named, not one whose first eval is at 0.5 s.
  partly = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([0], [5.0]), 'big': curve([0, 0.5], [5.0, 4.0])})
  assert partly['reason'] == 'no eval after training started for: small.'
  neither = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([0], [5.0]), 'big': curve([0], [5.0])})
  assert neither['reason'] == 'no eval after training started for: small, big.'
  # Half a second of training is training: decided, not null.
  brief = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([0, 0.5], [5.0, 4.9]), 'big': curve([0, 0.5], [5.0, 4.8])})
  assert brief['held'] is True and brief['evidence']['time_s'] == 0.5
  late = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([10], [5.0]), 'big': curve([11, 20], [5.0, 4.0])})
  assert late['held'] is None
  assert late['reason'] == ('the largest model big has no eval at or before the common time '
                            '10 s.')
  assert late['evidence']['time_s'] == 10 and late['evidence']['loss_at_time'] == {'small': 5.0}
  alone = claims_lib.claim_bigger_lower_loss(
      rows, {'small': curve([11, 20], [5.0, 4.0]), 'big': curve([10], [4.0])})
  assert alone['held'] is None
  assert alone['reason'] == 'only big has an eval at or before 10 s.'
  assert alone['evidence']['loss_at_time'] == {'big': 4.0}
  # An empty curve counts as no curve.
  empty = claims_lib.claim_bigger_lower_loss(rows, {'small': curve([], []),
                                                    'big': curve([10], [4.0])})
  assert empty['held'] is None and 'have 1 (big)' in empty['reason']


def test_claim1_names_sizes_without_an_eval_at_the_common_time():
  rows = [row('small', params=10), row('mid', params=15), row('mid2', params=17),
          row('big', params=20)]
  curves = {'small': curve([10, 20], [5.0, 4.0]), 'mid': curve([21, 22], [4.0, 3.0]),
            'mid2': curve([23], [3.0]), 'big': curve([10, 30], [3.5, 3.0])}
  v = claims_lib.claim_bigger_lower_loss(rows, curves)
  assert v['held'] is True
  assert v['explanation'] == (
      'At 20 s of pretraining (the earliest final eval among sizes) the eval losses are small 4 '
      '(step 20), big 3.5 (step 10); the largest model big is lowest. No eval at or before '
      'that time for: mid, mid2.')
  assert set(v['evidence']['loss_at_time']) == {'small', 'big'}


# ----------------------------------------------------------------------------- claim 2

def robust_rows(big_drop, small_drop, extra=()):
  rows = [row('small', params=10, accuracy=0.8), row('big', params=20, accuracy=0.9),
          row('small', 'prune', 0.5, accuracy=0.8 - small_drop),
          row('big', 'prune', 0.5, accuracy=0.9 - big_drop)]
  return rows + list(extra)


def test_claim2_a_tie_in_drop_is_not_held():
  v = claims_lib.claim_bigger_more_robust(robust_rows(0.125, 0.125))
  assert v['held'] is False and v['evidence']['prune']['held'] is False
  assert claims_lib.claim_bigger_more_robust(robust_rows(0.124, 0.125))['held'] is True


def test_claim2_several_cells_at_one_setting_are_averaged():
  # Two seeds of big at 50%: drops 0.0 and 0.2, mean 0.1 < small's 0.15 (the first alone
  # would also hold, the last alone would not).
  rows = robust_rows(0.0, 0.15, [row('big', 'prune', 0.5, accuracy=0.7)])
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['evidence']['prune']['drop']['big'] == pytest.approx(0.1)
  assert v['held'] is True
  # Two dense cells are averaged too: 0.9 and 0.7 -> 0.8, so big's drop is 0.8 - 0.9 < 0.
  rows = robust_rows(0.0, 0.15, [row('big', accuracy=0.7)])
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['evidence']['dense_accuracy']['big'] == pytest.approx(0.8)
  assert v['evidence']['prune']['drop']['big'] == pytest.approx(-0.1)


def test_claim2_uses_the_harshest_common_setting():
  rows = robust_rows(0.01, 0.02, [
      row('small', 'prune', 0.9, accuracy=0.5), row('big', 'prune', 0.9, accuracy=0.89),
      row('big', 'prune', 0.95, accuracy=0.1),  # only big has 95%: not common
      row('small', 'quantize', bits=8, accuracy=0.79), row('big', 'quantize', bits=8,
                                                             accuracy=0.8),
      row('small', 'quantize', bits=4, accuracy=0.5), row('big', 'quantize', bits=4,
                                                           accuracy=0.85),
      row('big', 'quantize', bits=2, accuracy=0.1),
      row('small', 'prune', 0.0, accuracy=0.0),  # sparsity 0 is not a pruned cell
      row('small', 'quantize', bits=32, accuracy=0.0)])  # neither is 32 bits
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['evidence']['prune']['sparsity'] == 0.9
  assert v['evidence']['prune']['drop'] == pytest.approx({'small': 0.3, 'big': 0.01})
  assert v['evidence']['quantize']['bits'] == 4
  assert v['evidence']['quantize']['drop'] == pytest.approx({'small': 0.3, 'big': 0.05})
  assert v['held'] is True
  assert v['explanation'] == (
      'At 90% sparsity the accuracy drops are small +0.300, big +0.010 (largest model '
      'smallest); at 4 bits the accuracy drops are small +0.300, big +0.050 (largest model '
      'smallest).')


def test_claim2_sparsities_equal_to_6_decimals_are_one_setting():
  # 0.9 computed two ways (e.g. 1 - 0.1 vs a grid value) is one sparsity setting.
  rows = robust_rows(0.01, 0.02, [row('small', 'prune', 0.9, accuracy=0.5),
                                  row('big', 'prune', 0.9000004, accuracy=0.88)])
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['evidence']['prune']['sparsity'] == 0.9
  assert v['evidence']['prune']['drop'] == pytest.approx({'small': 0.3, 'big': 0.02})


def test_claim2_uncompressed_cells_do_not_count_as_compressed():
  # small's only 'prune' cell has sparsity 0 and its only 'quantize' cell 32 bits: it has no
  # compressed cells, so neither sub-verdict has 2 sizes.
  rows = [row('small', accuracy=0.8), row('big', accuracy=0.9),
          row('small', 'prune', 0.0, accuracy=0.8), row('big', 'prune', 0.5, accuracy=0.85),
          row('small', 'quantize', bits=32, accuracy=0.8),
          row('big', 'quantize', bits=4, accuracy=0.85)]
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['held'] is None
  assert v['evidence']['prune']['reason'] == ('fewer than 2 sizes have both dense and prune '
                                              'cells.')
  assert v['evidence']['quantize']['reason'] == ('fewer than 2 sizes have both dense and '
                                                 'quantize cells.')


def test_claim2_mixed_cells_and_evidence_fields():
  # prune_quantize cells mix the two effects and are left out of both sub-verdicts.
  rows = robust_rows(0.01, 0.02, [
      row('small', 'quantize', bits=4, accuracy=0.7), row('big', 'quantize', bits=4,
                                                           accuracy=0.85),
      row('big', 'prune_quantize', 0.5, 4, accuracy=0.0)])
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['evidence']['prune']['drop'] == pytest.approx({'small': 0.02, 'big': 0.01})
  assert v['evidence']['quantize']['drop'] == pytest.approx({'small': 0.1, 'big': 0.05})
  assert v['evidence']['prune']['models'] == ['small', 'big']
  assert v['evidence']['rule'] == (
      'held iff the largest model has the strictly smallest accuracy drop in every computable '
      'sub-verdict (pruning at the highest common sparsity, quantization at the lowest common '
      'bit width)')
  assert v['evidence']['largest'] == 'big'
  none = claims_lib.claim_bigger_more_robust(robust_rows(0.01, 0.02))['evidence']['quantize']
  assert none == {'bits': None, 'drop': {}, 'held': None,
                  'reason': 'the largest model big has no quantize cells.'}


def test_claim2_explains_a_missing_pruning_subverdict():
  rows = [row('small', accuracy=0.8), row('big', accuracy=0.9),
          row('small', 'quantize', bits=4, accuracy=0.7),
          row('big', 'quantize', bits=4, accuracy=0.85)]
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['held'] is True
  assert v['explanation'] == (
      'Pruning: not computable (the largest model big has no prune cells.); at 4 bits the '
      'accuracy drops are small +0.100, big +0.050 (largest model smallest).')


def test_claim2_both_subverdicts_must_hold():
  rows = robust_rows(0.01, 0.02, [row('small', 'quantize', bits=4, accuracy=0.79),
                                  row('big', 'quantize', bits=4, accuracy=0.8)])
  v = claims_lib.claim_bigger_more_robust(rows)
  assert (v['evidence']['prune']['held'], v['evidence']['quantize']['held']) == (True, False)
  assert v['held'] is False
  assert v['explanation'] == (
      'At 50% sparsity the accuracy drops are small +0.020, big +0.010 (largest model '
      'smallest); at 4 bits the accuracy drops are small +0.010, big +0.100 (largest model not '
      'smallest).')


def test_claim2_majority_baseline_edge():
  rows = robust_rows(0.0, 0.1)
  for r in rows:
    r['majority_accuracy'] = 0.89
  # dense 0.9 is within MIN_ABOVE_BASELINE (0.01) of 0.89, inclusive: null.
  v = claims_lib.claim_bigger_more_robust(rows)
  assert v['held'] is None and v['evidence']['majority_accuracy'] == 0.89
  assert v['reason'].startswith('the largest model big is at the majority-class baseline '
                                '(dense accuracy 0.900 vs 0.890)')
  for r in rows:
    r['majority_accuracy'] = 0.8899
  assert claims_lib.claim_bigger_more_robust(rows)['held'] is True
  rows[0]['majority_accuracy'] = None  # missing on some rows: the others' baseline counts
  rows[1]['majority_accuracy'] = 0.895
  assert claims_lib.claim_bigger_more_robust(rows)['held'] is None


def test_claim2_null_cases():
  assert claims_lib.claim_bigger_more_robust([row('a')])['reason'] == (
      'needs at least 2 model sizes; have 1.')
  no_dense_big = [row('small', params=10), row('big', 'prune', 0.5, params=20)]
  v = claims_lib.claim_bigger_more_robust(no_dense_big)
  assert v['reason'] == 'the largest model big has no dense cell.'
  assert (v['evidence']['largest'], v['evidence']['dense_accuracy']) == ('big', {'small': 0.8})
  one_dense = [row('small', 'prune', 0.5, params=10), row('big', params=20)]
  v = claims_lib.claim_bigger_more_robust(one_dense)
  assert v['reason'] == 'fewer than 2 sizes have a dense cell.'
  assert v['evidence']['dense_accuracy'] == {'big': 0.8}
  dense_only = [row('small', params=10), row('big', params=20)]
  v = claims_lib.claim_bigger_more_robust(dense_only)
  assert v['held'] is None
  assert v['reason'] == ('pruning: the largest model big has no prune cells. quantization: the '
                         'largest model big has no quantize cells.')
  only_big = dense_only + [row('big', 'prune', 0.5, params=20)]
  v = claims_lib.claim_bigger_more_robust(only_big)
  assert v['evidence']['prune']['reason'] == 'fewer than 2 sizes have both dense and prune cells.'
  disjoint = only_big + [row('small', 'prune', 0.25, params=10)]
  v = claims_lib.claim_bigger_more_robust(disjoint)
  assert v['evidence']['prune']['reason'] == 'no sparsity value is shared by all sizes under prune.'
  # One computable sub-verdict decides; the other is described as not computable.
  one = robust_rows(0.01, 0.02)
  v = claims_lib.claim_bigger_more_robust(one)
  assert v['held'] is True
  assert v['explanation'].endswith('; quantization: not computable (the largest model big has '
                                   'no quantize cells.).')


# ----------------------------------------------------------------------------- claim 3

def test_claim3_a_tie_in_accuracy_is_not_a_win():
  rows = [row('small', params=10, stored=400, accuracy=0.8),
          row('big', params=20, stored=800, accuracy=0.9),
          row('big', 'quantize', bits=4, params=20, stored=400, accuracy=0.8)]
  v = claims_lib.claim_compressed_big_beats_small(rows)
  assert v['held'] is False
  assert v['evidence']['comparisons'][0]['largest_wins'] is False
  rows[-1]['accuracy'] = 0.8001
  assert claims_lib.claim_compressed_big_beats_small(rows)['held'] is True


def test_claim3_budget_is_inclusive_and_rival_is_any_smaller_cell():
  rows = [row('small', params=10, stored=400, accuracy=0.7),
          row('mid', params=15, stored=900, accuracy=0.95),
          row('mid', 'prune', 0.5, params=15, stored=390, accuracy=0.85),
          row('big', params=20, stored=1600, accuracy=0.99),
          row('big', 'prune', 0.75, params=20, stored=400, accuracy=0.8)]
  v = claims_lib.claim_compressed_big_beats_small(rows)
  first = v['evidence']['comparisons'][0]
  # At small's 400 B the big 400 B cell fits (inclusive) but mid's 390 B pruned cell is better.
  assert (first['budget_mb'], first['small_cell'], first['largest_cell'],
          first['best_smaller_cell']) == (400 / 1e6, 'small/dense/0.0/32',
                                          'big/prune/0.75/32', 'mid/prune/0.5/32')
  assert first['largest_wins'] is False and v['held'] is False
  # mid's pruned 390 B cell is below big's smallest cell: not comparable.
  assert v['evidence']['won'] == 0 and len(v['evidence']['comparisons']) == 2
  assert v['evidence']['not_comparable'] == ['mid/prune/0.5/32']
  assert v['evidence']['smallest_largest_mb'] == 400 / 1e6
  assert v['evidence']['largest'] == 'big'
  assert first['largest_mb'] == 400 / 1e6 and first['small_accuracy'] == 0.7
  assert (first['largest_accuracy'], first['best_smaller_accuracy']) == (0.8, 0.85)
  assert v['explanation'] == (
      'big had the best cell within budget at 0/2 comparable budgets (0.0004-0.0009 MB); e.g. '
      'at 0.0004 MB, small dense scores 0.700 while big prune 75% (0.0004 MB) scores 0.800, '
      'not beating the best smaller cell, mid prune 50% at 0.850.')


def test_claim3_not_comparable_and_null():
  rows = [row('small', params=10, stored=100, accuracy=0.7),
          row('big', params=20, stored=800, accuracy=0.9)]
  v = claims_lib.claim_compressed_big_beats_small(rows)
  assert v['held'] is None
  assert v['evidence']['not_comparable'] == ['small/dense/0.0/32']
  assert v['reason'] == ('no smaller-model light cell is as large as the smallest cell of big '
                         '(0.0008 MB).')
  assert claims_lib.claim_compressed_big_beats_small([row('a')])['reason'] == (
      'needs at least 2 model sizes; have 1.')


def test_claim3_a_budget_out_of_reach_does_not_end_that_models_comparisons():
  # small's dense cell (100 B) is below big's smallest cell; its 500 B cell (a method whose
  # least compressed cell is larger than dense) is still compared.
  rows = [row('small', params=10, stored=100, accuracy=0.7),
          row('small', 'other', 0.1, params=10, stored=500, accuracy=0.75),
          row('big', params=20, stored=400, accuracy=0.9)]
  v = claims_lib.claim_compressed_big_beats_small(rows)
  assert v['evidence']['not_comparable'] == ['small/dense/0.0/32']
  assert [c['small_cell'] for c in v['evidence']['comparisons']] == ['small/other/0.1/32']
  assert v['held'] is True


def test_claim3_cites_a_lost_budget_when_it_fails():
  # Won at the tightest budget (small's 300 B cell), lost at small's dense 1000 B.
  rows = [row('small', params=10, stored=1000, accuracy=0.95),
          row('small', 'prune', 0.5, params=10, stored=300, accuracy=0.6),
          row('big', params=20, stored=2000, accuracy=0.99),
          row('big', 'prune', 0.75, params=20, stored=250, accuracy=0.75)]
  v = claims_lib.claim_compressed_big_beats_small(rows)
  assert v['held'] is False and v['evidence']['won'] == 1
  assert 'e.g. at 0.001 MB, small dense scores 0.950' in v['explanation']


def test_claim3_cites_the_tightest_budget_when_it_wins():
  rows = [row('small', params=10, stored=400, accuracy=0.7),
          row('small', 'prune', 0.5, params=10, stored=300, accuracy=0.6),
          row('big', params=20, stored=800, accuracy=0.9),
          row('big', 'prune', 0.75, params=20, stored=250, accuracy=0.75)]
  v = claims_lib.claim_compressed_big_beats_small(rows)
  assert v['held'] is True and v['evidence']['won'] == 2
  assert v['explanation'] == (
      'big had the best cell within budget at 2/2 comparable budgets (0.0003-0.0004 MB); e.g. '
      'at 0.0003 MB, small prune 50% scores 0.600 while big prune 75% (0.00025 MB) scores '
      '0.750, beating it.')


# ----------------------------------------------------------------------------- all

def test_evaluate_claims_explanations_on_the_synthetic_sweep():
  out = evaluate_claims(make_results(), make_curves())
  assert {k: v['held'] for k, v in out.items()} == dict.fromkeys(CLAIM_KEYS, True)
  assert out[LOSS]['explanation'] == (
      'At 30 s of pretraining (the earliest final eval among sizes) the eval losses are '
      'L2_H32 4.365 (step 30), L4_H64 3.816 (step 20); the largest model L4_H64 is lowest.')
  assert out[ROBUST]['explanation'] == (
      'At 90% sparsity the accuracy drops are L2_H32 +0.270, L4_H64 +0.045 (largest model '
      'smallest); at 2 bits the accuracy drops are L2_H32 +0.400, L4_H64 +0.040 (largest model '
      'smallest).')
  assert out[EQUAL_SIZE]['explanation'] == (
      'L4_H64 had the best cell within budget at 2/2 comparable budgets (0.312-0.4 MB); e.g. at '
      '0.312 MB, L2_H32 prune 25% scores 0.725 while L4_H64 quantize 2-bit (0.2 MB) scores '
      '0.860, beating it.')
  for v in out.values():
    assert v['claim'] == claims_lib.CLAIM_TEXT[[k for k in out if out[k] is v][0]]
    assert v['reason'] is None
  losing = evaluate_claims(make_results(), make_curves(big_lower=False))[LOSS]
  assert losing['held'] is False
  assert losing['explanation'].endswith('the largest model L4_H64 is not lowest (L2_H32 is).')


def test_evaluate_claims_with_one_size_is_null_everywhere():
  rows = [r for r in make_results() if r['model'] == SMALL]
  out = evaluate_claims(rows, make_curves())
  assert all(v['held'] is None for v in out.values())
  assert out[LOSS]['reason'] == ('the sweep has 1 model size(s) with results (L2_H32); '
                                 'comparing sizes needs at least 2.')
  assert out[LOSS]['explanation'] == 'Not decided: ' + out[LOSS]['reason']
  assert evaluate_claims([], {})[ROBUST]['reason'].startswith('the sweep has 0 model size(s) '
                                                               'with results (none)')
