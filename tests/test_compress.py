"""Pruning, quantization and compressed storage (trainbig_jax.compress)."""

import os
import re

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainbig_jax.compress import prune, quantize as quant, storage

FAST = hypothesis.settings(deadline=None, max_examples=25, derandomize=True,
                           suppress_health_check=[hypothesis.HealthCheck.too_slow])


def tiny_params(seed=0, num_layers=2, hidden=16, mlp=32, vocab=40, heads=4, layer_scales=None):
  """A parameter tree laid out like models/encoder.py (numpy fp32)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  norm = lambda: {'scale': np.ones(hidden, np.float32), 'bias': np.zeros(hidden, np.float32)}
  dense = lambda i, o, s=1.0: {'kernel': s * normal(i, o), 'bias': normal(o)}
  params = {'embed': {'token': {'embedding': normal(vocab, hidden)},
                      'position': {'embedding': normal(12, hidden)}, 'norm': norm()}}
  for i in range(num_layers):
    s = 1.0 if layer_scales is None else layer_scales[i]
    params[f'layers_{i}'] = {
        'attention': {n: dense(hidden, hidden, s) for n in ('query', 'key', 'value', 'out')},
        'attention_norm': norm(),
        'mlp': {'wi': dense(hidden, mlp, s), 'wo': dense(mlp, hidden, s)}, 'mlp_norm': norm()}
  params['mlm_head'] = {'dense': dense(hidden, hidden), 'norm': norm(),
                        'bias': np.zeros(vocab, np.float32)}
  params['classifier'] = {'dense': dense(hidden, hidden), 'out': dense(hidden, 3)}
  return params


def leaf(tree, path):
  for name in path.split('/'):
    tree = tree[name]
  return tree


# ------------------------------------------------------------------------- pruning


def test_prunable_paths_default_selects_layer_kernels_only():
  paths = prune.prunable_paths(tiny_params())
  assert len(paths) == 2 * 6
  assert all(p.startswith('layers_') and p.endswith('/kernel') for p in paths)
  assert prune.prunable_paths(tiny_params(), exclude=r'attention') == [
      'layers_0/mlp/wi/kernel', 'layers_0/mlp/wo/kernel',
      'layers_1/mlp/wi/kernel', 'layers_1/mlp/wo/kernel']


@pytest.mark.parametrize('sparsity', [0.0, 0.3, 0.5, 0.9])
def test_layer_masks_exact_per_matrix_and_keep_largest(sparsity):
  params = tiny_params()
  masks = prune.magnitude_masks(params, sparsity, scope='layer')
  by_path = prune.masks_by_path(masks)
  assert set(by_path) == set(prune.prunable_paths(params))
  for path, mask in by_path.items():
    w = np.abs(leaf(params, path))
    mask = np.asarray(mask)
    assert mask.dtype == bool and mask.shape == w.shape
    assert (~mask).sum() == round(sparsity * w.size)
    if 0 < sparsity:
      assert w[mask].min() >= w[~mask].max()
  assert leaf(masks, 'embed/token/embedding') is None
  assert leaf(masks, 'layers_0/mlp/wi/bias') is None


def test_global_masks_one_threshold_and_differ_from_layer_wise():
  params = tiny_params(layer_scales=[0.1, 10.0])
  masks = prune.magnitude_masks(params, 0.5, scope='global')
  by_path = {p: np.asarray(m) for p, m in prune.masks_by_path(masks).items()}
  total = sum(m.size for m in by_path.values())
  assert sum((~m).sum() for m in by_path.values()) == round(0.5 * total)
  kept = np.concatenate([np.abs(leaf(params, p))[m] for p, m in by_path.items()])
  pruned = np.concatenate([np.abs(leaf(params, p))[~m] for p, m in by_path.items()])
  assert kept.min() >= pruned.max()
  # The small-scale layer loses (nearly) everything, the large one (nearly) nothing.
  assert (~by_path['layers_0/mlp/wi/kernel']).mean() > 0.95
  assert (~by_path['layers_1/mlp/wi/kernel']).mean() < 0.05
  layer_wise = prune.masks_by_path(prune.magnitude_masks(params, 0.5, scope='layer'))
  assert (~np.asarray(layer_wise['layers_0/mlp/wi/kernel'])).mean() == 0.5


def test_ties_are_broken_by_flat_index_and_jit_core_agrees():
  params = {'layers_0': {'mlp': {'wi': {'kernel': np.ones((4, 5), np.float32)}}}}
  mask = np.asarray(prune.magnitude_masks(params, 0.35)['layers_0']['mlp']['wi']['kernel'])
  assert (mask.ravel() == (np.arange(20) >= 7)).all()
  traced = jax.jit(prune._keep_masks)([jnp.ones((4, 5))], 7)[0]
  assert (np.asarray(traced) == mask).all()


_PAD = 81
_traced_keep_masks = jax.jit(prune._keep_masks)


def _padded_traced_masks(arrays, num_pruned):
  """prune._keep_masks on fixed-size inputs (one compilation): each array is padded with
  +inf (never pruned, sorts after every real entry) and the list with all-inf arrays."""
  padded = [np.full(_PAD, np.inf, np.float32) for _ in range(3)]
  for p, a in zip(padded, arrays):
    p[:a.size] = a.ravel()
  masks = _traced_keep_masks([jnp.asarray(p) for p in padded], np.int32(num_pruned))
  return [np.asarray(m)[:a.size].reshape(a.shape) for m, a in zip(masks, arrays)]


@FAST
@hypothesis.given(
    arrays=st.lists(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=9),
                               elements=st.sampled_from([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0, -0.0])
                               | st.floats(-4, 4, width=32)),
                    min_size=1, max_size=3),
    sparsity=st.floats(0.0, 0.99))
def test_property_exact_sparsity_host_and_traced_agree(arrays, sparsity):
  for scope in prune.SCOPES:
    params = {f'layers_{i}': {'w': {'kernel': a}} for i, a in enumerate(arrays)}
    masks = prune.masks_by_path(prune.magnitude_masks(params, sparsity, scope=scope))
    masks = [np.asarray(masks[f'layers_{i}/w/kernel']) for i in range(len(arrays))]
    groups = [[i] for i in range(len(arrays))] if scope == 'layer' else [range(len(arrays))]
    for group in groups:
      ms = [masks[i] for i in group]
      ws = [np.abs(arrays[i]) for i in group]
      size = sum(m.size for m in ms)
      assert sum((~m).sum() for m in ms) == round(sparsity * size)
      kept = np.concatenate([w[m] for w, m in zip(ws, ms)])
      gone = np.concatenate([w[~m] for w, m in zip(ws, ms)])
      if kept.size and gone.size:
        assert kept.min() >= gone.max()
      # The in-jit (bisection) implementation used by gradual pruning picks the same entries.
      traced = _padded_traced_masks([arrays[i] for i in group], sum((~m).sum() for m in ms))
      assert all((t == m).all() for t, m in zip(traced, ms))


def test_apply_masks_and_sparsity_report():
  params = tiny_params()
  masks = prune.magnitude_masks(params, 0.75)
  pruned = prune.apply_masks(params, masks)
  assert (np.asarray(leaf(pruned, 'layers_0/mlp/wi/kernel')) == 0).mean() == 0.75
  np.testing.assert_array_equal(leaf(pruned, 'embed/token/embedding'),
                                leaf(params, 'embed/token/embedding'))
  report = prune.sparsity_report(params, masks)
  total = sum(np.size(x) for x in jax.tree.leaves(params))
  zeros = sum((np.asarray(x) == 0).sum() for x in jax.tree.leaves(pruned))
  assert report['total_params'] == total and report['nonzero_params'] == total - zeros
  assert set(report['per_path']) == set(prune.prunable_paths(params))
  assert all(v == 0.75 for v in report['per_path'].values())
  assert prune.sparsity_report(pruned)['nonzero_params'] == total - zeros


# ---------------------------------------------------------------- gradual pruning


def test_cubic_schedule_values():
  kw = dict(final_sparsity=0.8, begin_step=10, end_step=30, initial_sparsity=0.1)
  at = lambda t, **extra: float(prune.cubic_sparsity(t, **kw, **extra))
  assert at(0) == pytest.approx(0.1) and at(10) == pytest.approx(0.1)
  assert at(30) == pytest.approx(0.8) and at(1000) == pytest.approx(0.8)
  assert at(20) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5 ** 3)
  # With frequency 5, sparsity only moves at 10, 15, 20, ...
  assert at(17, frequency=5) == pytest.approx(at(15))
  jitted = jax.jit(lambda t: prune.cubic_sparsity(t, **kw))
  assert float(jitted(jnp.int32(20))) == pytest.approx(at(20))


@pytest.mark.parametrize('scope', prune.SCOPES)
def test_gradual_pruning_under_jit_with_adamw_keeps_pruned_weights_zero(scope):
  params = jax.tree.map(jnp.asarray, tiny_params(hidden=8, mlp=16, vocab=10,
                                                 layer_scales=[1.0, 3.0]))
  target = jax.tree.map(lambda x: x + 1.0, params)
  begin, end, every, final, initial = 2, 8, 2, 0.75, 0.25
  optimizer = prune.with_pruning(optax.adamw(1e-2, weight_decay=0.1), final, begin, end,
                                 update_every=every, initial_sparsity=initial, scope=scope)

  @jax.jit
  def train_step(params, opt_state):
    grads = jax.grad(lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                                   zip(jax.tree.leaves(p), jax.tree.leaves(target))))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  paths = prune.prunable_paths(params)
  previous = None
  for step in range(12):
    params, opt_state = train_step(params, opt_state)
    masks = prune.masks_by_path(prune.final_masks(opt_state))
    expected = float(prune.cubic_sparsity(step, final_sparsity=final, begin_step=begin,
                                          end_step=end, initial_sparsity=initial,
                                          frequency=every)) if step >= begin else 0.0
    if scope == 'global':
      total = sum(masks[p].size for p in paths)
      assert sum((~np.asarray(masks[p])).sum() for p in paths) == round(expected * total), step
    for path in paths:
      mask, w = np.asarray(masks[path]), np.asarray(leaf(params, path))
      if scope == 'layer':
        assert (~mask).sum() == round(expected * mask.size), (step, path)
      assert (w[~mask] == 0).all()  # exactly zero, not merely small
      if previous is not None:
        assert not (~previous[path] & mask).any()  # pruned weights never regrow
        if step > end:
          assert (previous[path] == mask).all()  # frozen after end_step
    previous = {p: np.asarray(masks[p]) for p in paths}
  if scope == 'layer':
    assert all((~previous[p]).mean() == final for p in paths)
  else:  # one threshold: the small-scale layer is pruned harder
    sparsity_of = lambda path: (~previous[path]).mean()
    assert sparsity_of('layers_0/mlp/wi/kernel') > sparsity_of('layers_1/mlp/wi/kernel')
  # Untouched leaves (biases, embeddings) were trained normally.
  assert np.count_nonzero(leaf(params, 'embed/token/embedding')) == 10 * 8


# ------------------------------------------------------------------- structured


def test_head_masks_zero_whole_heads_with_lowest_norm():
  heads, hidden = 4, 16
  params = tiny_params(hidden=hidden, heads=heads)
  dh = hidden // heads
  # Make head 2 of layer 0 the weakest everywhere.
  for name in ('query', 'key', 'value'):
    leaf(params, f'layers_0/attention/{name}/kernel')[:, 2 * dh:3 * dh] *= 1e-3
  leaf(params, 'layers_0/attention/out/kernel')[2 * dh:3 * dh] *= 1e-3
  pruned = prune.apply_masks(params, prune.head_masks(params, heads, 0.5))
  for layer in ('layers_0', 'layers_1'):
    attention = leaf(pruned, f'{layer}/attention')
    columns = {n: np.asarray(attention[n]['kernel']).reshape(hidden, heads, dh)
               for n in ('query', 'key', 'value')}
    rows = np.asarray(attention['out']['kernel']).reshape(heads, dh, hidden)
    dead = [h for h in range(heads) if not rows[h].any()]
    assert len(dead) == 2
    for h in range(heads):
      gone = h in dead
      assert all((not c[:, h].any()) == gone for c in columns.values())
      assert (not np.asarray(attention['query']['bias']).reshape(heads, dh)[h].any()) == gone
    if layer == 'layers_0':
      assert 2 in dead
  np.testing.assert_array_equal(leaf(pruned, 'layers_0/mlp/wi/kernel'),
                                leaf(params, 'layers_0/mlp/wi/kernel'))


def test_neuron_masks_zero_whole_neurons():
  params = tiny_params(mlp=32)
  leaf(params, 'layers_1/mlp/wi/kernel')[:, 5] *= 1e-3
  leaf(params, 'layers_1/mlp/wo/kernel')[5] *= 1e-3
  pruned = prune.apply_masks(params, prune.neuron_masks(params, 0.25))
  for layer in ('layers_0', 'layers_1'):
    wi = np.asarray(leaf(pruned, f'{layer}/mlp/wi/kernel'))
    wo = np.asarray(leaf(pruned, f'{layer}/mlp/wo/kernel'))
    dead = ~wi.any(0)
    assert dead.sum() == 8
    assert (dead == ~wo.any(1)).all()
    assert (dead == (np.asarray(leaf(pruned, f'{layer}/mlp/wi/bias')) == 0)).all()
  assert not np.asarray(leaf(pruned, 'layers_1/mlp/wi/kernel'))[:, 5].any()


# ------------------------------------------------------------------- quantization


def half_step_ok(x, q):
  error = np.abs(np.asarray(quant.dequantize(q)) - np.asarray(x, np.float32))
  step = np.broadcast_to(np.asarray(q.scale), error.shape)
  return (error <= step / 2 * (1 + 1e-5) + 1e-30).all()


@hypothesis.settings(FAST, max_examples=15)
@hypothesis.given(
    x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
                 elements=st.floats(-1e3, 1e3, width=32)),
    bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans())
def test_property_quantization_error_at_most_half_step(x, bits, symmetric, per_channel):
  q = quant.quantize(x, bits, symmetric=symmetric, per_channel=per_channel)
  q_min, q_max = quant.code_range(bits, symmetric)
  codes = np.asarray(q.values).astype(int)
  assert q_min <= codes.min() and codes.max() <= q_max
  assert half_step_ok(x, q)
  assert q.shape == x.shape and q.per_channel == (per_channel and x.ndim >= 2)


def test_asymmetric_on_all_positive_tensor():
  x = np.random.default_rng(0).uniform(1.0, 2.0, (32, 8)).astype(np.float32)
  for bits in (2, 4, 8):
    asym = quant.quantize(x, bits, symmetric=False)
    assert half_step_ok(x, asym)
    assert (np.asarray(asym.zero_point) == 0).all()  # range [0, max]: no codes wasted below 0
    # Scales are stored in float16, rounded up: at most one float16 ulp (2^-10) above.
    exact = x.max(0, keepdims=True) / (2 ** bits - 1)
    assert np.all(asym.scale >= exact) and np.all(asym.scale <= exact * (1 + 2 ** -10))
    sym = quant.quantize(x, bits, symmetric=True)
    err = lambda q: np.abs(np.asarray(quant.dequantize(q)) - x).mean()
    assert err(asym) < err(sym)


def test_zero_is_exact_and_zero_channels_are_safe():
  x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
  x[:, 1] = 0.0
  x[0, 0] = 0.0
  for symmetric in (True, False):
    q = quant.quantize(x, 3, symmetric=symmetric)
    y = np.asarray(quant.dequantize(q))
    assert np.isfinite(y).all() and (y[x == 0] == 0).all()


def test_per_channel_beats_per_tensor_with_one_large_channel():
  x = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
  x[:, 3] *= 100
  # One shared scale sized for channel 3 rounds the other channels to almost nothing.
  err = lambda q: (np.abs(np.asarray(quant.dequantize(q)) - x).max(0), np.asarray(q.scale))
  per_channel, per_channel_scale = err(quant.quantize(x, 4, per_channel=True))
  per_tensor, per_tensor_scale = err(quant.quantize(x, 4, per_channel=False))
  assert per_channel_scale.shape == (1, 8) and per_tensor_scale.shape == (1, 1)
  ordinary = np.arange(8) != 3
  assert (per_channel[ordinary] < 0.2 * per_tensor[ordinary]).all()
  assert per_channel[3] <= per_tensor[3] * (1 + 1e-6)


def test_quantize_tree_and_fake_quant_straight_through():
  params = tiny_params()
  qtree = quant.quantize_tree(params, 4)
  assert isinstance(leaf(qtree, 'layers_0/mlp/wi/kernel'), quant.QuantizedTensor)
  assert isinstance(leaf(qtree, 'embed/token/embedding'), np.ndarray)
  restored = quant.dequantize_tree(qtree)
  assert half_step_ok(leaf(params, 'layers_1/attention/out/kernel'),
                      leaf(qtree, 'layers_1/attention/out/kernel'))
  assert restored['layers_0']['mlp']['wi']['kernel'].dtype == jnp.float32

  x = jnp.asarray(leaf(params, 'layers_0/mlp/wi/kernel'))
  weights = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
  value, grad = jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(quant.fake_quant(x, 3, symmetric=False) * weights)))(x)
  np.testing.assert_array_equal(grad, weights)  # identity gradient
  np.testing.assert_array_equal(quant.fake_quant(x, 3, symmetric=False),
                                quant.dequantize(quant.quantize(x, 3, symmetric=False)))
  fq = jax.jit(lambda p: quant.fake_quant_tree(p, 8))(jax.tree.map(jnp.asarray, params))
  np.testing.assert_array_equal(
      leaf(fq, 'layers_0/mlp/wo/kernel'),
      quant.dequantize(quant.quantize(leaf(params, 'layers_0/mlp/wo/kernel'), 8)))
  np.testing.assert_array_equal(leaf(fq, 'embed/token/embedding'),
                                leaf(params, 'embed/token/embedding'))


# ------------------------------------------------------------------------ storage


@FAST
@hypothesis.given(bits=st.integers(2, 8), count=st.integers(0, 300), data=st.data())
def test_property_pack_unpack_round_trip(bits, count, data):
  codes = np.asarray(data.draw(st.lists(st.integers(0, 2 ** bits - 1), min_size=count,
                                        max_size=count)), np.uint8)
  packed = storage.pack_bits(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
  np.testing.assert_array_equal(storage.unpack_bits(packed, bits, count), codes)


def test_pack_layout_four_and_eight_bits():
  assert list(storage.pack_bits(np.array([1, 2, 3], np.uint8), 4)) == [0x21, 0x03]
  codes = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(storage.pack_bits(codes, 8), codes)


@FAST
@hypothesis.given(mask=hnp.arrays(bool, hnp.array_shapes(max_dims=2, max_side=40),
                                  elements=st.booleans() | st.just(False)))
def test_property_mask_encoding_round_trip(mask):
  encoding, data = storage.encode_mask(mask)
  np.testing.assert_array_equal(storage.decode_mask(encoding, data, mask.shape), mask)
  assert data.nbytes <= np.packbits(mask.ravel()).nbytes


def test_sparse_mask_uses_deltas():
  mask = np.zeros(10_000, bool)
  mask[::150] = True
  encoding, data = storage.encode_mask(mask)
  assert encoding == 'delta_uint8' and data.nbytes == mask.sum()


def test_storage_round_trip_bit_exact_all_bit_widths(tmp_path):
  """dequantize(load(save(q))) == dequantize(q) for bits 2..8, (a)symmetric, with/without mask."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((24, 20)).astype(np.float32)
  x[:, 4] += 3.0  # an all-positive channel
  mask = np.abs(x) > 0.6
  masked_x = np.where(mask, x, 0)
  tree, masks, expected = {}, {}, {}
  for bits in range(2, 9):
    for symmetric in (True, False):
      for masked in (True, False):
        name = f'b{bits}_{"sym" if symmetric else "asym"}_{"masked" if masked else "dense"}'
        q = quant.quantize(masked_x if masked else x, bits, symmetric=symmetric,
                           per_channel=bits % 2 == 0)
        tree[name] = {'kernel': q}
        masks[name] = {'kernel': mask if masked else None}
        expected[name] = np.asarray(quant.dequantize(q))
  compressed = storage.compress_tree(tree, masks)
  directory = storage.save_compressed(tmp_path / 'ckpt', compressed, {'note': 'all widths'})
  loaded, manifest = storage.load_compressed(directory)
  assert manifest['extra'] == {'note': 'all widths'}
  for name, want in expected.items():
    got = loaded[name]['kernel']
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want, err_msg=name)
  encodings = {e['path']: e['encoding'] for e in manifest['leaves']}
  assert encodings['b3_sym_masked/kernel'] == 'pruned_quantized'
  assert encodings['b3_sym_dense/kernel'] == 'quantized'
  # In-memory and on-disk byte counts agree; the directory really holds the data.
  on_disk = storage.stored_bytes(directory)
  assert on_disk['compressed_bytes'] == storage.stored_bytes(compressed)['compressed_bytes']
  assert on_disk['disk_bytes'] > 0


@pytest.mark.parametrize('bits,symmetric', [(3, True), (8, False)])
def test_compress_tree_quantizes_selected_leaves(tmp_path, bits, symmetric):
  params = tiny_params(seed=bits)
  masks = prune.magnitude_masks(params, 0.6, include=r'layers_0/.*/kernel$')
  cfg = dict(bits=bits, symmetric=symmetric, per_channel=True)
  directory = storage.save_compressed(tmp_path / 'ckpt', storage.compress_tree(params, masks, cfg))
  loaded, manifest = storage.load_compressed(directory)
  masked = prune.apply_masks(params, masks)
  encodings = {e['path']: e['encoding'] for e in manifest['leaves']}
  for path in prune.prunable_paths(params):
    expected = quant.dequantize(quant.quantize(leaf(masked, path), bits, symmetric=symmetric))
    np.testing.assert_array_equal(leaf(loaded, path), np.asarray(expected))
    assert encodings[path] == ('pruned_quantized' if path.startswith('layers_0') else 'quantized')
  np.testing.assert_array_equal(leaf(loaded, 'embed/token/embedding'),
                                leaf(params, 'embed/token/embedding'))
  assert encodings['embed/token/embedding'] == 'dense'


def test_pruned_fp32_and_prequantized_leaves_round_trip(tmp_path):
  params = tiny_params()
  masks = prune.magnitude_masks(params, 0.5)
  qtree = quant.quantize_tree(prune.apply_masks(params, masks), 5, symmetric=False,
                              include=r'layers_1/mlp')
  compressed = storage.compress_tree(qtree, masks)
  loaded, manifest = storage.load_compressed(storage.save_compressed(tmp_path / 'c', compressed))
  encodings = {e['path']: e['encoding'] for e in manifest['leaves']}
  assert encodings['layers_0/mlp/wi/kernel'] == 'pruned'
  assert encodings['layers_1/mlp/wi/kernel'] == 'pruned_quantized'
  np.testing.assert_array_equal(leaf(loaded, 'layers_0/mlp/wi/kernel'),
                                leaf(prune.apply_masks(params, masks), 'layers_0/mlp/wi/kernel'))
  np.testing.assert_array_equal(leaf(loaded, 'layers_1/mlp/wo/kernel'),
                                quant.dequantize(leaf(qtree, 'layers_1/mlp/wo/kernel')))


@pytest.mark.parametrize('bits,sparsity', [(8, None), (4, None), (3, 0.5), (6, 0.9)])
def test_stored_bytes_match_analytic_size(bits, sparsity):
  params = tiny_params(hidden=64, mlp=256, vocab=100)
  masks = None if sparsity is None else prune.magnitude_masks(params, sparsity)
  compressed = storage.compress_tree(params, masks, dict(bits=bits))
  counted = storage.stored_bytes(compressed)
  selected = set(prune.prunable_paths(params))
  analytic = 0.0
  for path, x in prune.flatten_with_paths(params)[0]:
    if path not in selected:
      analytic += 4 * x.size
      continue
    kept = x.size if sparsity is None else x.size - round(sparsity * x.size)
    mask_bytes = 0 if sparsity is None else min(x.size / 8, kept)  # bitmap or uint8 deltas
    analytic += bits * kept / 8 + mask_bytes + 2 * x.shape[-1]  # float16 scales
  assert counted['compressed_bytes'] == pytest.approx(analytic, rel=0.02)
  assert counted['dense_fp32_bytes'] == 4 * sum(x.size for x in jax.tree.leaves(params))


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize('sparsity', [-0.1, 1.0])
def test_bad_sparsity(sparsity):
  with pytest.raises(ValueError, match=r'sparsity must be in \[0, 1\), got ' + str(sparsity)):
    prune.magnitude_masks(tiny_params(), sparsity)
  with pytest.raises(ValueError, match=str(sparsity)):
    prune.gradual_magnitude_pruning(sparsity, 0, 10)


@pytest.mark.parametrize('bits', [1, 9, 4.0])
def test_bad_bits(bits, tmp_path):
  with pytest.raises(ValueError, match=rf'bits must be an integer in 2\.\.8, got {bits}'):
    quant.quantize(np.ones((2, 2), np.float32), bits)
  with pytest.raises(ValueError, match='bits must be'):
    storage.compress_tree(tiny_params(), quant=dict(bits=bits))


def test_pattern_matching_nothing():
  pattern = r'decoder_layers_\d+'
  with pytest.raises(ValueError, match=re.escape(f'{pattern!r} matches no parameter')):
    prune.magnitude_masks(tiny_params(), 0.5, include=pattern)
  with pytest.raises(ValueError, match="'nonexistent' matches no parameter"):
    quant.quantize_tree(tiny_params(), 8, exclude='nonexistent')


def test_missing_and_half_written_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match='No compressed checkpoint at .*nope'):
    storage.load_compressed(tmp_path / 'nope')
  half = tmp_path / 'half'
  (half / 'arrays').mkdir(parents=True)
  with pytest.raises(storage.CompressedCheckpointError, match='manifest.json is missing'):
    storage.load_compressed(half)


def test_existing_output_and_failed_saves_leave_nothing_partial(tmp_path, monkeypatch):
  compressed = storage.compress_tree(tiny_params(), quant=dict(bits=4))
  existing = tmp_path / 'out'
  existing.mkdir()
  (existing / 'keep.txt').write_text('precious')
  with pytest.raises(FileExistsError, match='already exists'):
    storage.save_compressed(existing, compressed)
  assert os.listdir(existing) == ['keep.txt']

  with pytest.raises(ValueError, match='JSON-serializable'):
    storage.save_compressed(tmp_path / 'bad_extra', compressed, {'x': object()})

  def explode(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(storage.ocp.Checkpointer, 'save', explode)
  with pytest.raises(OSError, match='disk full'):
    storage.save_compressed(tmp_path / 'failed', compressed)
  assert sorted(os.listdir(tmp_path)) == ['out']  # no target, no temporary sibling
