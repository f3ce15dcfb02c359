"""compress/ (quantize, prune, storage): the behaviours that mutation testing found unguarded.

Each test pins a default, a keyword passed through, or an edge that a small plausible bug would
change (benchmarks/mutation.py; docs/mutation.md lists what no behaviour can tell apart).
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainbig_jax.compress import prune, storage
from trainbig_jax.compress import quantize as quant

from test_teeth_numerics import reference_quantize

# ----------------------------------------------------------------------------- quantization


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  # Channels of different ranges and an all-positive one, so every mode differs from the others.
  kernel = lambda: (rng.standard_normal((6, 4)) * np.array([0.1, 1.0, 3.0, 0.5])
                    + np.array([0.0, 0.0, 0.0, 2.0])).astype(np.float32)
  return {'layers_0': {'mlp': {'kernel': kernel(), 'bias': rng.standard_normal(4).astype(np.float32)}},
          'layers_1': {'mlp': {'kernel': kernel()}}}


def _qdq(x, bits, symmetric, per_channel):
  codes, scale, zero = reference_quantize(np.asarray(x), bits, symmetric, per_channel)
  return (codes - zero) * scale


def test_check_setting_bits_accepts_float_width_and_quantized_widths_only():
  assert quant.check_setting_bits(32) == 32 and type(quant.check_setting_bits(32)) is int
  assert quant.check_setting_bits(np.int64(32)) == 32
  assert quant.check_setting_bits(4) == 4
  for bad in (True, 32.0, 1, 9, 16, '32', None):
    with pytest.raises(ValueError) as err:
      quant.check_setting_bits(bad)
    assert str(err.value) == f'bits must be an integer in 2..8, got {bad!r} (32: not quantized).'


def test_quantized_tensor_records_the_original_dtype_name():
  x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
  assert quant.quantize(x, 4).dtype == 'float32'
  assert quant.quantize(jnp.asarray(x, jnp.bfloat16), 4).dtype == 'bfloat16'
  assert quant.quantize(x.astype(np.float16), 4).dtype == 'float16'


def test_quantize_tree_defaults_are_symmetric_per_channel_on_the_last_axis():
  params = _params()
  kernel = params['layers_0']['mlp']['kernel']
  q = quant.quantize_tree(params, 4)['layers_0']['mlp']['kernel']
  assert q.symmetric and q.per_channel and q.channel_axis == 1
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), _qdq(kernel, 4, True, True))
  # Every keyword reaches quantize.
  q = quant.quantize_tree(params, 3, symmetric=False, per_channel=False)['layers_0']['mlp']['kernel']
  assert not q.symmetric and not q.per_channel
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), _qdq(kernel, 3, False, False))
  q = quant.quantize_tree(params, 8, channel_axis=0)['layers_0']['mlp']['kernel']
  assert q.channel_axis == 0 and q.scale.shape == (6, 1)


def test_quantize_tree_sees_quantized_leaves_under_their_parameter_path():
  """A second pass over a partly quantized tree (mixed widths) names its leaves by path."""
  params = _params()
  once = quant.quantize_tree(params, 8, include=r'layers_0/mlp/kernel$')
  twice = quant.quantize_tree(once, 4, exclude=r'layers_0/mlp/kernel$')
  assert twice['layers_0']['mlp']['kernel'] is once['layers_0']['mlp']['kernel']
  assert twice['layers_0']['mlp']['kernel'].bits == 8
  assert twice['layers_1']['mlp']['kernel'].bits == 4
  fq = quant.fake_quant_tree(
      {'layers_0': {'mlp': {'kernel': once['layers_0']['mlp']['kernel']}},
       'layers_1': params['layers_1']}, 4, exclude=r'layers_0/mlp/kernel$')
  assert fq['layers_0']['mlp']['kernel'] is once['layers_0']['mlp']['kernel']


def test_fake_quant_and_its_tree_pass_every_mode_through():
  params = _params()
  kernel = params['layers_0']['mlp']['kernel']
  # Default: symmetric, per channel.
  np.testing.assert_array_equal(np.asarray(quant.fake_quant(jnp.asarray(kernel), 3)),
                                _qdq(kernel, 3, True, True))
  for symmetric, per_channel in [(False, True), (True, False), (False, False)]:
    fq = quant.fake_quant_tree(params, 3, symmetric=symmetric, per_channel=per_channel)
    np.testing.assert_array_equal(np.asarray(fq['layers_0']['mlp']['kernel']),
                                  _qdq(kernel, 3, symmetric, per_channel))
  fq = quant.fake_quant_tree(params, 3, channel_axis=0)
  np.testing.assert_array_equal(np.asarray(fq['layers_0']['mlp']['kernel']),
                                _qdq(kernel.T, 3, True, True).T)


def test_qat_sums_calls_the_task_with_fake_quantized_selected_weights():
  params = _params(1)
  seen = {}

  def sums_fn(p, batch, rng, train):
    seen.update(params=p, batch=batch, rng=rng, train=train)
    return {'loss': jnp.sum(p['layers_0']['mlp']['kernel'] * 2.0)}

  qat = types.SimpleNamespace(bits=3, symmetric=False, per_channel=False,
                              include=[r'layers_\d+/mlp/kernel$'], exclude=['layers_1/'])
  sums = quant.qat_sums(sums_fn, qat)
  batch, rng = {'inputs': np.arange(3)}, jax.random.key(7)

  def assert_only_first_kernel_quantized(symmetric, per_channel):
    got = seen['params']
    np.testing.assert_array_equal(np.asarray(got['layers_0']['mlp']['kernel']),
                                  _qdq(params['layers_0']['mlp']['kernel'], 3, symmetric,
                                       per_channel))
    for unchanged in (('layers_1', 'kernel'), ('layers_0', 'bias')):
      layer, leaf = unchanged
      np.testing.assert_array_equal(np.asarray(got[layer]['mlp'][leaf]),
                                    params[layer]['mlp'][leaf])

  out = sums(params, batch, rng, False)
  assert seen['batch'] is batch and seen['rng'] is rng and seen['train'] is False
  assert_only_first_kernel_quantized(False, False)
  np.testing.assert_allclose(
      float(out['loss']), 2.0 * _qdq(params['layers_0']['mlp']['kernel'], 3, False, False).sum(),
      rtol=1e-6)
  sums(params, batch, rng, True)
  assert seen['train'] is True
  # The other modes, and an include narrower than the default.
  qat = types.SimpleNamespace(bits=3, symmetric=True, per_channel=True, include=['layers_0/'],
                              exclude=['bias'])
  quant.qat_sums(sums_fn, qat)(params, batch, rng, True)
  assert_only_first_kernel_quantized(True, True)
  # Straight through: the gradient of the quantized weights' loss is the float one.
  grads = jax.grad(lambda p: sums(p, batch, rng, True)['loss'])(params)
  np.testing.assert_array_equal(np.asarray(grads['layers_0']['mlp']['kernel']), 2.0)


# ----------------------------------------------------------------------------- structured pruning


def _mlp_block(wi: np.ndarray, wo: np.ndarray) -> dict:
  return {'layers_0': {'mlp': {'wi': {'kernel': wi, 'bias': np.ones(wi.shape[1], np.float32)},
                               'wo': {'kernel': wo}}}}


def test_neuron_scores_are_the_float64_norm_of_wi_column_plus_wo_row():
  # Per neuron j: |wi[:, j]|^2 and |wo[j, :]|^2 chosen so that the lowest two by their sum are
  # neurons 1 and 3, while wi alone, wo alone or their difference would pick others.
  wi_sq = np.array([1.0, 4.0, 0.5, 1.0, 9.0, 3.0])
  wo_sq = np.array([9.0, 0.5, 9.0, 1.0, 0.1, 9.0])
  wi = np.zeros((3, 6), np.float32)
  wo = np.zeros((6, 3), np.float32)
  wi[0], wo[:, 0] = np.sqrt(wi_sq), np.sqrt(wo_sq)
  keep = prune.neuron_masks(_mlp_block(wi, wo), 2 / 6)['layers_0']['mlp']
  expected = np.array([True, False, True, False, True, True])
  np.testing.assert_array_equal(np.asarray(keep['wi']['kernel']), np.broadcast_to(expected, wi.shape))
  np.testing.assert_array_equal(np.asarray(keep['wo']['kernel']),
                                np.broadcast_to(expected[:, None], wo.shape))
  np.testing.assert_array_equal(np.asarray(keep['wi']['bias']), expected)
  assert keep['wo'] == {'kernel': keep['wo']['kernel']}  # wo's bias (none here) is never masked


@pytest.mark.parametrize('in_wo', [False, True])
def test_neuron_scores_resolve_differences_float32_would_round_away(in_wo):
  # Neuron 0: 1 + 1e-8 (a float32 sum rounds it to 1, a tie that would prune neuron 0 first);
  # neuron 1: exactly 1. Summed in float64, neuron 1 is the weaker one.
  small = np.array([[1.0, 1.0], [1e-4, 0.0]], np.float32)  # rows: two entries of each neuron
  big = np.full((2, 2), 10.0, np.float32)
  wi, wo = (big, small.T) if in_wo else (small, big.T)
  keep = prune.neuron_masks(_mlp_block(np.ascontiguousarray(wi), np.ascontiguousarray(wo)), 0.5)
  np.testing.assert_array_equal(np.asarray(keep['layers_0']['mlp']['wi']['bias']), [True, False])


def test_neuron_masks_reject_mismatched_or_non_matrix_kernels_and_bad_fractions():
  ones = lambda *shape: np.ones(shape, np.float32)
  for wi, wo in [(ones(4, 8), ones(6, 4)), (ones(4, 8, 2), ones(8, 4)), (ones(4, 8), ones(8, 4, 2))]:
    with pytest.raises(ValueError) as err:
      prune.neuron_masks(_mlp_block(wi, wo), 0.5)
    assert str(err.value) == (f'layers_0/mlp: expected wi [D, F] and wo [F, D] kernels, got '
                              f'{wi.shape} and {wo.shape}.')
  with pytest.raises(ValueError, match=r'^fraction must be in \[0, 1\), got 1\.0\.$'):
    prune.neuron_masks(_mlp_block(ones(4, 8), ones(8, 4)), 1.0)
  with pytest.raises(ValueError, match=r"^fraction must be a number in \[0, 1\), got 'x'\.$"):
    prune.head_masks(_mlp_block(ones(4, 8), ones(8, 4)), 2, 'x')


def _attention_block(q, k, v, out) -> dict:
  return {'layers_0': {'attention': {
      'query': {'kernel': q, 'bias': np.ones(q.shape[1:], np.float32)}, 'key': {'kernel': k},
      'value': {'kernel': v}, 'out': {'kernel': out}}}}


def _heads_with_norms(sq: dict[str, list[float]], hidden: int = 3, dh: int = 2) -> dict:
  """[D, H*dh] / [H*dh, D] kernels whose head h has squared norm sq[name][h]."""
  heads = len(sq['out'])
  kernels = {}
  for name in ('query', 'key', 'value'):
    kernels[name] = np.zeros((hidden, heads * dh), np.float32)
    kernels[name][0, ::dh] = np.sqrt(sq[name])
  kernels['out'] = np.zeros((heads * dh, hidden), np.float32)
  kernels['out'][::dh, 0] = np.sqrt(sq['out'])
  return _attention_block(kernels['query'], kernels['key'], kernels['value'], kernels['out'])


def test_head_scores_are_the_norm_of_all_four_kernels_slices():
  # Totals [5.1, 4.5, 3.5, 3.2]: heads 2 and 3 go. out alone would drop 0 and 2, query/key/value
  # alone 3 and 1, their difference 1 and 3. Hidden 3 is no multiple of the 4 heads, so a split
  # that used the wrong axis of any kernel fails.
  params = _heads_with_norms({'query': [5.0, 0.5, 0.0, 0.0], 'key': [0.0, 0.0, 3.0, 0.0],
                              'value': [0.0, 0.0, 0.0, 0.2], 'out': [0.1, 4.0, 0.5, 3.0]})
  keep = prune.head_masks(params, 4, 0.5)['layers_0']['attention']
  expected = np.array([True, True, False, False])
  for name in ('query', 'key', 'value'):
    np.testing.assert_array_equal(np.asarray(keep[name]['kernel']),
                                  np.broadcast_to(np.repeat(expected, 2), (3, 8)))
  np.testing.assert_array_equal(np.asarray(keep['out']['kernel']),
                                np.broadcast_to(np.repeat(expected, 2)[:, None], (8, 3)))
  np.testing.assert_array_equal(np.asarray(keep['query']['bias']), np.repeat(expected, 2))


@pytest.mark.parametrize('in_out', [False, True])
def test_head_scores_resolve_differences_float32_would_round_away(in_out):
  # Head 0 has 1 + 1e-8 (1 in float32), head 1 exactly 1: in float64 head 1 is the weaker one.
  sq = {'query': [1.0, 1.0, 100.0, 100.0], 'key': [0.0] * 4, 'value': [0.0] * 4,
        'out': [1.0, 1.0, 100.0, 100.0]}
  params = _heads_with_norms(sq)
  attention = params['layers_0']['attention']
  if in_out:
    attention['out']['kernel'][1, 0] = 1e-4  # the second row of head 0
  else:
    attention['query']['kernel'][1, 0] = 1e-4  # the second entry of head 0's first column
  keep = prune.head_masks(params, 4, 0.25)['layers_0']['attention']
  np.testing.assert_array_equal(np.asarray(keep['query']['bias']).reshape(4, 2)[:, 0],
                                [True, False, True, True])


def test_head_masks_check_head_counts_and_kernel_splits():
  ones = lambda *shape: np.ones(shape, np.float32)
  square = _attention_block(ones(2, 8), ones(2, 8), ones(2, 8), ones(8, 2))
  for bad in (0, -1, 2.0, 'two'):
    with pytest.raises(ValueError) as err:
      prune.head_masks(square, bad, 0.5)
    assert str(err.value) == f'num_heads must be a positive integer, got {bad!r}.'
  # One head is a valid attention block; with nothing to prune every entry stays.
  keep = prune.head_masks(square, 1, 0.0)['layers_0']['attention']
  assert all(np.asarray(keep[n]['kernel']).all() for n in ('query', 'key', 'value', 'out'))
  for q, out in [(ones(2, 6), ones(8, 2)),  # 6 columns: not 4 heads
                 (ones(2, 4, 3), ones(2, 3, 2))]:  # [H, dh, D] out with 2 x 3 head rows
    params = _attention_block(q, ones(*q.shape), ones(*q.shape), out)
    bad = 'query' if q.shape == (2, 6) else 'out'
    shape = (q if bad == 'query' else out).shape
    with pytest.raises(ValueError) as err:
      prune.head_masks(params, 4, 0.5)
    assert str(err.value) == (f'layers_0/attention/{bad}/kernel with shape {shape} cannot be '
                              f'split into num_heads=4 heads.')
  # The same [H, dh, D] layout with 4 x 3 head rows is valid.
  keep = prune.head_masks(_attention_block(ones(2, 4, 3), ones(2, 4, 3), ones(2, 4, 3),
                                           ones(4, 3, 2)), 4, 0.5)
  assert np.asarray(keep['layers_0']['attention']['out']['kernel']).sum() == 12


def test_equal_scores_prune_the_lower_index_first_even_in_long_blocks():
  # 64 neurons: every 7th weaker, the rest tied. An unstable sort breaks the ties anyhow.
  wi, wo = np.ones((1, 64), np.float32), np.ones((64, 1), np.float32)
  wi[0, ::7] = wo[::7, 0] = 0.5
  keep = prune.neuron_masks(_mlp_block(wi, wo), 20 / 64)['layers_0']['mlp']['wi']['bias']
  pruned = sorted(np.flatnonzero(~np.asarray(keep)))
  assert pruned == sorted(list(range(0, 64, 7)) + [1, 2, 3, 4, 5, 6, 8, 9, 10, 11])


def test_structured_pruning_selects_blocks_and_refuses_to_empty_one():
  ones = lambda *shape: np.ones(shape, np.float32)
  two = {'layers_0': _mlp_block(ones(2, 4), ones(4, 2))['layers_0'],
         'layers_1': _mlp_block(ones(2, 4), ones(4, 2))['layers_0']}
  masks = prune.neuron_masks(two, 0.5, exclude='layers_1')
  assert masks['layers_0']['mlp']['wi']['kernel'] is not None
  assert masks['layers_1']['mlp']['wi']['kernel'] is None
  with pytest.raises(ValueError) as err:
    prune.neuron_masks({'layers_0': {'dense': {'kernel': ones(2, 2)}}}, 0.5)
  assert str(err.value) == 'No module with wi/wo kernels found in the parameter tree.'
  # round(0.9 * 4) = 4 neurons and round(0.9 * 2) = 2 heads: all of them.
  with pytest.raises(ValueError) as err:
    prune.neuron_masks(two, 0.9)
  assert str(err.value) == ('Pruning 0.9 of the 4 neurons of layers_0/mlp (MLP) would remove all '
                            'of them; use a sparsity below 0.875 (at most 3 of 4 removed).')
  heads = _attention_block(ones(2, 4), ones(2, 4), ones(2, 4), ones(4, 2))
  with pytest.raises(ValueError) as err:
    prune.head_masks(heads, 2, 0.9)
  assert str(err.value) == ('Pruning 0.9 of the 2 heads of layers_0/attention (attention) would '
                            'remove all of them; use a sparsity below 0.75 (at most 1 of 2 '
                            'removed).')
  # Just below the limit is allowed: 0.7 of 2 heads rounds to 1.
  assert np.asarray(prune.head_masks(heads, 2, 0.7)['layers_0']['attention']['out']['kernel']
                    ).sum() == 4


# ----------------------------------------------------------------------------- sparsity report


def test_sparsity_report_counts_zeros_overall_and_per_path():
  kernel = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
  kernel[0, :2] = 0.0  # already zero before any mask
  params = {'layers_0': {'mlp': {'kernel': kernel, 'bias': np.array([1, 0, 2, 3], np.float32)}},
            'empty': np.zeros((0,), np.float32)}
  report = prune.sparsity_report(params)
  assert report['total_params'] == 20 and report['nonzero_params'] == 17
  assert report['sparsity'] == pytest.approx(3 / 20)
  assert report['per_path'] == {'layers_0/mlp/kernel': pytest.approx(2 / 16),
                                'layers_0/mlp/bias': pytest.approx(1 / 4), 'empty': 0.0}
  masks = prune.magnitude_masks(params, 0.5)  # the 8 smallest of the kernel, its 2 zeros too
  report = prune.sparsity_report(params, masks)
  assert report['total_params'] == 20 and report['nonzero_params'] == 8 + 3
  assert report['sparsity'] == pytest.approx(9 / 20)
  assert report['per_path'] == {'layers_0/mlp/kernel': pytest.approx(0.5)}
  # Nothing to count: no division by zero.
  nothing = prune.sparsity_report({'empty': np.zeros((0, 3), np.float32)})
  assert nothing == {'total_params': 0, 'nonzero_params': 0, 'sparsity': 0.0,
                     'per_path': {'empty': 0.0}}


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize('symmetric', [True, False])
def test_quantized_leaves_give_the_stored_codes_with_pruned_entries_at_the_zero_point(symmetric):
  params = _params(2)
  masks = prune.magnitude_masks(params, 0.5, include=r'layers_1/mlp/kernel$')
  compressed = storage.compress_tree(params, masks, dict(bits=4, symmetric=symmetric,
                                                         per_channel=True))
  leaves = storage.quantized_leaves(compressed)
  assert set(leaves) == {'layers_0/mlp/kernel', 'layers_1/mlp/kernel'}  # not the float bias
  dense = storage.decompress_tree(compressed)
  for path, q in leaves.items():
    layer = path.split('/')[0]
    x = np.asarray(params[layer]['mlp']['kernel'])
    keep = (np.asarray(masks[layer]['mlp']['kernel']) if layer == 'layers_1'
            else np.ones(x.shape, bool))
    expected = quant.quantize(np.where(keep, x, 0), 4, symmetric=symmetric)
    assert (q.bits, q.symmetric, q.channel_axis, q.dtype) == (4, symmetric, 1, 'float32')
    assert q.values.dtype == (np.int8 if symmetric else np.uint8)
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(expected.scale))
    np.testing.assert_array_equal(np.asarray(q.zero_point), np.asarray(expected.zero_point))
    codes = np.asarray(expected.values)
    np.testing.assert_array_equal(
        np.asarray(q.values), np.where(keep, codes, np.broadcast_to(expected.zero_point, x.shape)))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), dense[layer]['mlp']['kernel'])
  assert storage.quantized_leaves(storage.compress_tree(params)) == {}


# ----------------------------------------------------------------------------- magnitude masks


def test_nan_counts_as_the_largest_magnitude_on_the_host_as_under_jit():
  x = np.array([np.nan, np.nan, 1.0, -2.0], np.float32)
  params = {'layers_0': {'mlp': {'kernel': x.reshape(2, 2)}}}
  keep = np.asarray(prune.magnitude_masks(params, 0.75)['layers_0']['mlp']['kernel']).ravel()
  # 1 and -2 go, then of the two NaNs (ties at +inf) the first.
  np.testing.assert_array_equal(keep, [False, True, False, False])
  traced = np.asarray(prune._masks_for_sparsity([jnp.asarray(x)], 0.75, 'layer')[0])
  np.testing.assert_array_equal(traced, keep)


def test_magnitudes_are_compared_in_float32_on_the_host_as_under_jit():
  # float64 weights equal in float32 are a tie, broken by index, as in the jitted pruner.
  x = np.array([1.0 + 1e-12, 1.0, 5.0, 6.0])
  keep = np.asarray(prune.magnitude_masks({'layers_0': {'w': {'kernel': x}}}, 0.25)
                    ['layers_0']['w']['kernel'])
  np.testing.assert_array_equal(keep, [False, True, True, True])
  traced = np.asarray(prune._masks_for_sparsity([jnp.asarray(x, jnp.float32)], 0.25, 'layer')[0])
  np.testing.assert_array_equal(traced, keep)


def test_apply_masks_keeps_the_dtype_and_checks_shapes():
  w = jnp.asarray([[1.5, -2.0], [3.0, 4.0]], jnp.bfloat16)
  out = prune.apply_masks({'w': w}, {'w': jnp.asarray([[True, False], [False, True]])})['w']
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), [[1.5, 0.0], [0.0, 4.0]])
  with pytest.raises(ValueError) as err:
    prune.apply_masks({'w': w}, {'w': jnp.ones((2, 3), bool)})
  assert str(err.value) == 'Mask shape (2, 3) does not match parameter shape (2, 2).'


def test_compress_tree_quant_settings_defaults_and_unknown_keys():
  params = _params(3)
  params['layers_1']['conv'] = {'kernel': np.ones((2, 3, 4), np.float32)}
  compressed = storage.compress_tree(params, quant={'bits': 4})
  entry = compressed.leaves['layers_0/mlp/kernel']
  assert (entry['bits'], entry['symmetric'], entry['per_channel'], entry['channel_axis']) == (
      4, True, True, 1)
  assert compressed.leaves['layers_1/conv/kernel']['channel_axis'] == 2  # the last axis
  entry = storage.compress_tree(params, quant={'bits': 4, 'channel_axis': 0, 'symmetric': False}
                                ).leaves['layers_0/mlp/kernel']
  assert (entry['symmetric'], entry['per_channel'], entry['channel_axis']) == (False, True, 0)
  entry = storage.compress_tree(params, quant={'bits': 4, 'per_channel': False}
                                ).leaves['layers_0/mlp/kernel']
  assert (entry['symmetric'], entry['per_channel'], entry['channel_axis']) == (True, False, None)
  for bad in ({'bits': 4, 'bit_width': 3}, {'symmetric': True}):
    with pytest.raises(ValueError) as err:
      storage.compress_tree(params, quant=bad)
    assert str(err.value) == ('quant must be a dict with "bits" and optionally symmetric, '
                              f'per_channel, channel_axis; got keys {sorted(bad)}.')


def test_disk_bytes_are_the_sizes_of_every_file_written(tmp_path):
  directory = storage.save_compressed(tmp_path / 'c', storage.compress_tree(_params(4),
                                                                            quant={'bits': 8}))
  files = [p for p in (tmp_path / 'c').rglob('*') if p.is_file()]
  assert len(files) > 2
  assert storage.stored_bytes(directory)['disk_bytes'] == sum(p.stat().st_size for p in files)


def test_with_pruning_applies_the_inner_optimizer_then_the_masks():
  w = np.array([[0.1, -2.0], [3.0, -0.2]], np.float32)
  params = {'layers_0': {'mlp': {'kernel': jnp.asarray(w)}}}
  grads = {'layers_0': {'mlp': {'kernel': jnp.ones((2, 2), jnp.float32)}}}
  tx = prune.with_pruning(optax.sgd(0.5), 0.5, 1, 1)
  state = tx.init(params)
  # Step 0 is before begin_step: exactly the inner optimizer's update.
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(np.asarray(updates['layers_0']['mlp']['kernel']), -0.5)
  # Step 1 prunes half by the magnitudes after the update (w - 0.5): -0.4 and -0.7 go.
  updates, state = tx.update(grads, state, params)
  new = np.asarray(optax.apply_updates(params, updates)['layers_0']['mlp']['kernel'])
  np.testing.assert_array_equal(new, [[0.0, -2.5], [2.5, 0.0]])


def test_gradual_pruning_defaults_recompute_every_step_per_layer():
  w = jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float32)
  params = {'layers_0': {'mlp': {'kernel': w}}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = prune.gradual_magnitude_pruning(0.75, 0, 3)  # default update_every=1, scope='layer'
  state = tx.init(params)
  for _ in range(2):  # steps 0 and 1
    _, state = tx.update(zeros, state, params)
  # Step 1's sparsity 0.75 * (1 - (2/3)^3) rounds to 2 of 4 weights: the two smallest.
  np.testing.assert_array_equal(np.asarray(prune.final_masks(state)['layers_0']['mlp']['kernel']),
                                [[False, False], [True, True]])
  with pytest.raises(ValueError) as err:
    prune.final_masks(optax.sgd(0.1).init(params))
  assert str(err.value) == 'Expected exactly one PruningState in the optimizer state, found 0.'


def test_gradual_pruning_arguments_are_checked_with_one_clear_error():
  gmp = prune.gradual_magnitude_pruning
  gmp(0.5, 3, 3, initial_sparsity=0.5)  # a one-step schedule that starts where it ends
  for args, kwargs, message in [
      ((1.0, 0, 2), {}, 'final_sparsity must be in [0, 1), got 1.0.'),
      ((0.5, 0, 2), {'initial_sparsity': -0.1}, 'initial_sparsity must be in [0, 1), got -0.1.'),
      ((0.5, 0, 2), {'initial_sparsity': 0.6},
       'initial_sparsity (0.6) must not exceed final_sparsity (0.5).'),
      ((0.5, 1.0, 3), {}, 'Need integers 0 <= begin_step <= end_step, got begin_step=1.0, '
                          'end_step=3.'),
      ((0.5, 0, 3.0), {}, 'Need integers 0 <= begin_step <= end_step, got begin_step=0, '
                          'end_step=3.0.'),
      ((0.5, 4, 3), {}, 'Need integers 0 <= begin_step <= end_step, got begin_step=4, '
                        'end_step=3.'),
      ((0.5, -1, 3), {}, 'Need integers 0 <= begin_step <= end_step, got begin_step=-1, '
                         'end_step=3.'),
      ((0.5, 0, 3), {'update_every': 0}, 'update_every must be an integer >= 1, got 0.'),
      ((0.5, 0, 3), {'update_every': 2.0}, 'update_every must be an integer >= 1, got 2.0.'),
      ((0.5, 0, 3), {'scope': 'model'}, "scope must be one of ('layer', 'global'), got 'model'."),
  ]:
    with pytest.raises(ValueError) as err:
      gmp(*args, **kwargs)
    assert str(err.value) == message


def _saved_manifest(tmp_path):
  """A compressed checkpoint saved under tmp_path: (its directory, its manifest's path, the
  manifest as read), for tests that alter the manifest and write it back."""
  directory = storage.save_compressed(tmp_path / 'c', storage.compress_tree(_params(5)))
  manifest_path = tmp_path / 'c' / storage.MANIFEST_FILE
  return directory, manifest_path, json.loads(manifest_path.read_text())


def test_loading_checks_payload_checksums_and_names_unreadable_arrays(tmp_path):
  import shutil
  directory, manifest_path, manifest = _saved_manifest(tmp_path)
  manifest['leaves'][0]['arrays']['values']['sha256'] = '0' * 64
  manifest_path.write_text(json.dumps(manifest))
  path = manifest['leaves'][0]['path']
  with pytest.raises(storage.CompressedCheckpointError,
                     match=f"^Array 'values' of '{path}' in .* does not match its checksum"):
    storage.load_compressed(directory)
  shutil.rmtree(tmp_path / 'c' / storage.ARRAYS_DIR)
  with pytest.raises(storage.CompressedCheckpointError,
                     match=r'^Cannot read the arrays of compressed checkpoint .*/arrays: \S'):
    storage.load_compressed(directory)


def test_unreadable_arrays_message_carries_the_read_error_gist(tmp_path):
  import re
  import shutil
  directory = storage.save_compressed(tmp_path / 'c', storage.compress_tree(_params(5)))
  shutil.rmtree(tmp_path / 'c' / storage.ARRAYS_DIR)
  with pytest.raises(storage.CompressedCheckpointError) as err:
    storage.load_compressed(directory)
  # The gist is what the user acts on: Orbax's own words that the folder is missing, not a
  # placeholder such as 'None'.
  gist = str(err.value).split('/arrays: ', 1)[1]
  assert re.search(r'not found|does not exist|No such file', gist, re.IGNORECASE), gist
  assert 'None' not in gist


@pytest.mark.parametrize('field', ['dtype', 'shape'])
def test_loading_refuses_an_array_whose_dtype_or_shape_alone_differs_from_the_manifest(
    tmp_path, field):
  directory, manifest_path, manifest = _saved_manifest(tmp_path)
  leaf = next(l for l in manifest['leaves'] if len(l['arrays']['values']['shape']) == 2)
  info = leaf['arrays']['values']
  stored = f"{info['dtype']}{tuple(info['shape'])}"
  if field == 'dtype':  # the same bytes per element, another type
    info['dtype'] = {'float32': 'int32', 'int8': 'uint8'}.get(info['dtype'], 'float32')
  else:  # the same number of elements, another shape
    info['shape'] = info['shape'][::-1]
  assert info['shape'][0] != info['shape'][1]
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(storage.CompressedCheckpointError) as err:
    storage.load_compressed(directory)
  assert str(err.value) == (
      f"Array 'values' of '{leaf['path']}' in {directory} is {stored}, the manifest says "
      f"{info['dtype']}{tuple(info['shape'])}.")


def test_cubic_schedule_errors_name_the_bad_value():
  kw = dict(final_sparsity=0.5, begin_step=0, end_step=10)
  for extra, message in [
      ({'frequency': 0}, 'frequency must be an integer >= 1, got 0.'),
      ({'begin_step': 4, 'end_step': 3}, 'end_step must be >= begin_step, got begin_step=4, '
                                         'end_step=3.')]:
    with pytest.raises(ValueError) as err:
      prune.cubic_sparsity(0, **{**kw, **extra})
    assert str(err.value) == message


@pytest.mark.parametrize('num_pruned', [0, 1, 2, 3, 5, 7, 9])
def test_joint_pruning_breaks_ties_across_arrays_in_order(num_pruned):
  # Every |x| is equal (signs differ), so which entries go is decided by the tie order alone:
  # earlier arrays first, then flat index, as a stable argsort of the concatenation.
  arrays = [np.array([1.0, -1.0, 1.0]), np.array([[-1.0, 1.0]]), np.array([1.0, 1.0, -1.0, 1.0])]
  order = np.argsort(np.abs(np.concatenate([a.ravel() for a in arrays])), kind='stable')
  keep = np.ones(9, bool)
  keep[order[:num_pruned]] = False
  masks = prune._keep_masks([jnp.asarray(a, jnp.float32) for a in arrays], num_pruned)
  got = np.concatenate([np.asarray(m).ravel() for m in masks])
  np.testing.assert_array_equal(got, keep)
  assert [m.shape for m in masks] == [a.shape for a in arrays]


def test_gradual_pruning_update_without_params_says_how_to_call_it():
  tx = prune.gradual_magnitude_pruning(0.5, 0, 4)
  params = {'layers_0': {'mlp': {'kernel': jnp.ones((4, 4))}}}
  state = tx.init(params)
  with pytest.raises(ValueError) as err:
    tx.update(params, state)
  assert str(err.value) == ('gradual_magnitude_pruning needs the current params: call '
                            'update(updates, state, params).')


@pytest.mark.parametrize('fields,said', [
    ({'format_version': 9}, "format 'trainbig_jax.compressed_params' version 9"),
    ({'format': 'other'}, "format 'other' version 2"),
])
def test_a_manifest_of_another_format_or_version_is_refused_naming_both(tmp_path, fields, said):
  directory, manifest_path, manifest = _saved_manifest(tmp_path)
  assert manifest['format_version'] == 2
  manifest_path.write_text(json.dumps({**manifest, **fields}))
  with pytest.raises(storage.CompressedCheckpointError) as err:
    storage.load_compressed(directory)
  assert str(err.value) == (f"{manifest_path} is {said}; expected "
                            "'trainbig_jax.compressed_params' version 1 or 2.")


def test_a_manifest_leaf_missing_from_the_arrays_is_named(tmp_path):
  directory, manifest_path, manifest = _saved_manifest(tmp_path)
  leaf = manifest['leaves'][0]
  leaf['path'] = leaf['path'].rsplit('/', 1)[0] + '/renamed'
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(storage.CompressedCheckpointError) as err:
    storage.load_compressed(directory)
  assert str(err.value) == (f"Compressed checkpoint {directory} lacks array 'values' of "
                            f"'{leaf['path']}'.")


def test_an_empty_parameter_round_trips_through_storage(tmp_path):
  # Orbax stores no zero-size array; loading rebuilds it from the manifest's shape and dtype.
  params = {'layers_0': {'mlp': {'kernel': np.ones((4, 4), np.float32),
                                 'bias': np.zeros((0, 3), np.int32)}}}
  tree, _ = storage.load_compressed(
      storage.save_compressed(tmp_path / 'c', storage.compress_tree(params)))
  bias = tree['layers_0']['mlp']['bias']
  assert bias.shape == (0, 3) and bias.dtype == np.int32
