"""Numerics pinned to independent references: quantization scales for every mode, MLM logits
at masked positions against full logits, the per-row target bound, and the pre-LN encoder
against PyTorch's nn.TransformerEncoderLayer(norm_first=True)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trainbig_jax.compress import quantize as quant
from trainbig_jax.data import mlm
from trainbig_jax.models.encoder import Encoder, EncoderConfig
from trainbig_jax.tasks.mlm import mlm_sums

# ----------------------------------------------------------------------------- quantization


def _f16_up(s: np.ndarray) -> np.ndarray:
  """The smallest float16 value >= s (the stored scale), computed in numpy."""
  h = s.astype(np.float16)
  h = np.where(h.astype(np.float32) < s, np.nextafter(h, np.float16(np.inf)), h)
  return h.astype(np.float32)


def reference_quantize(x: np.ndarray, bits: int, symmetric: bool, per_channel: bool):
  """Textbook uniform quantization (TFLite/PyTorch conventions), independent of the code."""
  axes = tuple(range(x.ndim - 1)) if per_channel and x.ndim >= 2 else None
  keep = dict(axis=axes, keepdims=True)
  if symmetric:
    q_max = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(x), **keep) / q_max
    scale = _f16_up(np.where(scale > 0, scale, 1.0).astype(np.float32))
    zero = np.zeros_like(scale, np.int32)
    codes = np.clip(np.round(x / scale), -q_max, q_max)
  else:
    q_max = 2 ** bits - 1
    lo, hi = np.minimum(np.min(x, **keep), 0), np.maximum(np.max(x, **keep), 0)
    scale = (hi - lo) / q_max
    scale = _f16_up(np.where(scale > 0, scale, 1.0).astype(np.float32))
    zero = np.clip(np.round(-lo / scale), 0, q_max).astype(np.int32)
    codes = np.clip(np.round(x / scale) + zero, 0, q_max)
  if axes is None:
    scale, zero = scale.reshape((1,) * x.ndim), zero.reshape((1,) * x.ndim)
  return codes, scale, zero


@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('per_channel', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_scales_zero_points_and_codes_match_the_textbook_formula(symmetric, per_channel, bits):
  rng = np.random.default_rng(bits)
  # Channels of very different ranges, one all-zero channel, one all-positive channel.
  x = (rng.standard_normal((16, 6)) * np.array([0.01, 1.0, 7.0, 0.3, 1.0, 0.05])
       ).astype(np.float32)
  x[:, 3] = 0.0
  x[:, 4] = np.abs(x[:, 4]) + 0.5
  q = quant.quantize(x, bits, symmetric=symmetric, per_channel=per_channel)
  codes, scale, zero = reference_quantize(x, bits, symmetric, per_channel)
  assert q.scale.shape == scale.shape
  np.testing.assert_array_equal(np.asarray(q.scale), scale)
  np.testing.assert_array_equal(np.asarray(q.zero_point), zero)
  np.testing.assert_array_equal(np.asarray(q.values).astype(np.int64), codes.astype(np.int64))
  assert q.values.dtype == (np.int8 if symmetric else np.uint8)
  assert q.channel_axis == (1 if per_channel else None)
  np.testing.assert_allclose(np.asarray(quant.dequantize(q)),
                             (codes - zero) * scale, rtol=0, atol=0)
  # fake_quant (QAT) rounds with the same scales.
  np.testing.assert_array_equal(
      np.asarray(quant.fake_quant(jnp.asarray(x), bits, symmetric=symmetric,
                                  per_channel=per_channel)), (codes - zero) * scale)


def test_per_channel_reduces_over_every_axis_but_the_channel_axis():
  x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
  q = quant.quantize(x, 8, channel_axis=1)
  assert q.scale.shape == (1, 4, 1) and q.channel_axis == 1
  expected = _f16_up((np.max(np.abs(x), axis=(0, 2), keepdims=True) / 127).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(q.scale), expected)
  assert quant.quantize(x, 8, channel_axis=-3).channel_axis == 0
  # A 1-D tensor is always per tensor.
  assert quant.quantize(x[0, 0], 8).channel_axis is None
  with pytest.raises(ValueError, match='channel_axis=3 is out of range for a 3-D tensor'):
    quant.quantize(x, 8, channel_axis=3)
  with pytest.raises(ValueError, match='channel_axis=-4 is out of range'):
    quant.quantize(x, 8, channel_axis=-4)


def test_code_ranges_and_bit_checks():
  assert quant.code_range(8, True) == (-127, 127)
  assert quant.code_range(2, True) == (-1, 1)
  assert quant.code_range(8, False) == (0, 255)
  assert quant.code_range(3, False) == (0, 7)
  for ok in (2, 8, np.int64(5)):
    assert quant.check_bits(ok) == int(ok)
  for bad in (1, 9, True, 4.0, '4', None):
    with pytest.raises(ValueError, match=r'bits must be an integer in 2\.\.8, got'):
      quant.check_bits(bad)
  with pytest.raises(ValueError, match='floating-point tensor, got dtype int32'):
    quant.quantize(np.arange(4, dtype=np.int32), 8)


def test_quantize_tree_selects_kernels_and_dequantize_tree_restores_them():
  rng = np.random.default_rng(1)
  params = {'layers_0': {'mlp': {'kernel': rng.standard_normal((8, 4)).astype(np.float32),
                      'bias': rng.standard_normal(4).astype(np.float32)}}}
  tree = quant.quantize_tree(params, 4, symmetric=False, per_channel=False)
  assert isinstance(tree['layers_0']['mlp']['kernel'], quant.QuantizedTensor)
  assert tree['layers_0']['mlp']['kernel'].bits == 4 and not tree['layers_0']['mlp']['kernel'].symmetric
  assert tree['layers_0']['mlp']['kernel'].shape == (8, 4) and not tree['layers_0']['mlp']['kernel'].per_channel
  assert tree['layers_0']['mlp']['bias'] is params['layers_0']['mlp']['bias']
  codes, scale, zero = reference_quantize(params['layers_0']['mlp']['kernel'], 4, False, False)
  back = quant.dequantize_tree(tree)
  np.testing.assert_array_equal(np.asarray(back['layers_0']['mlp']['kernel']), (codes - zero) * scale)
  excluded = quant.quantize_tree(params, 4, exclude='layers_0/mlp/kernel')
  assert not isinstance(excluded['layers_0']['mlp']['kernel'], quant.QuantizedTensor)
  fq = quant.fake_quant_tree(params, 3, per_channel=True, symmetric=True)
  codes, scale, zero = reference_quantize(params['layers_0']['mlp']['kernel'], 3, True, True)
  np.testing.assert_array_equal(np.asarray(fq['layers_0']['mlp']['kernel']), (codes - zero) * scale)
  np.testing.assert_array_equal(np.asarray(fq['layers_0']['mlp']['bias']), params['layers_0']['mlp']['bias'])


def test_fake_quant_gradient_is_straight_through_and_keeps_dtype():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), jnp.bfloat16)
  g = jax.grad(lambda w: jnp.sum(quant.fake_quant(w, 2) * 3.0))(x)
  np.testing.assert_array_equal(np.asarray(g, np.float32), 3.0)
  assert quant.fake_quant(x, 4).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- MLM

CFG = EncoderConfig(vocab_size=97, num_layers=1, hidden=32, num_heads=4, mlp_dim=64,
                    max_len=32, dropout=0.0, attention_dropout=0.0, pad_id=0)
SPECIALS = (0, 1, 2, 3)  # pad, bos, eos, mask


def _masked_batch(seed, batch=6, length=24, rate=0.15):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CFG.vocab_size, size=(batch, length)).astype(np.int32)
  tokens[:, 0] = 1
  for row, n in enumerate(rng.integers(3, length + 1, size=batch)):
    tokens[row, n - 1] = 2
    tokens[row, n:] = 0
  return mlm.mask_tokens(tokens, rng, vocab_size=CFG.vocab_size, mask_id=3,
                         special_ids=SPECIALS, mask_rate=rate)


def test_no_row_ever_has_more_targets_than_the_bound():
  rng = np.random.default_rng(0)
  for rate in (0.0, 0.1, 0.15, 0.5, 0.99, 1.0):
    for length in (3, 7, 24, 64):
      tokens = rng.integers(4, 50, size=(400, length))
      bound = mlm.max_predictions(length, rate)
      counts = mlm.mask_tokens(tokens, rng, vocab_size=50, mask_id=3, special_ids=SPECIALS,
                               mask_rate=rate)['weights'].sum(-1)
      assert counts.max() <= bound, (rate, length)
      # The bound is tight: floor(rate * n) + 1 is reached whenever rate * n is fractional.
      if (rate * length) % 1 and rate < 1:
        assert counts.max() == bound
      # Exact per-row count: floor(rate * n) or one more.
      assert counts.min() >= np.floor(rate * length)
  assert mlm.max_predictions(10, 1.0) == 10
  assert mlm.max_predictions(10, 0.15) == 2
  assert mlm.max_predictions(20, 0.15) == 4


def test_logits_at_masked_positions_equal_gathering_full_logits():
  model = Encoder(CFG)
  batch = {k: jnp.asarray(v) for k, v in _masked_batch(3).items()}
  params = jax.jit(model.init)(jax.random.key(0), batch['inputs'])['params']
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  apply = jax.jit(lambda p, x, pos: model.apply({'params': p}, x, positions=pos))
  full = apply(params, batch['inputs'], None)
  bound = mlm.max_predictions(batch['inputs'].shape[1], 0.15)
  positions = jax.lax.top_k(batch['weights'], bound)[1]
  picked = apply(params, batch['inputs'], positions)
  np.testing.assert_allclose(np.asarray(picked),
                             np.take_along_axis(np.asarray(full),
                                                np.asarray(positions)[..., None], axis=1),
                             rtol=1e-5, atol=1e-5)
  # Every masked position is among the picked ones.
  w = np.asarray(batch['weights'])
  picked_w = np.take_along_axis(w, np.asarray(positions), axis=1)
  np.testing.assert_array_equal(picked_w.sum(-1), w.sum(-1))
  # The loss sums of the bounded and the full computation agree.
  rng = jax.random.key(1)
  sums = lambda n: jax.jit(mlm_sums(model, n), static_argnums=3)(params, batch, rng, False)
  bounded, unbounded = sums(bound), sums(None)
  for k in ('loss', 'weight', 'correct', 'tokens'):
    np.testing.assert_allclose(float(bounded[k]), float(unbounded[k]), rtol=1e-5)
  # Reference sums from the full logits in numpy.
  logp = jax.nn.log_softmax(full.astype(jnp.float32), -1)
  t = np.asarray(batch['targets'])
  nll = -np.take_along_axis(np.asarray(logp), t[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(unbounded['loss']), float((nll * w).sum()), rtol=1e-5)
  correct = (np.asarray(full).argmax(-1) == t) * w
  assert float(unbounded['correct']) == correct.sum()
  assert float(unbounded['tokens']) == float((np.asarray(batch['inputs']) != 0).sum())
  assert float(unbounded['weight']) == w.sum()


# ----------------------------------------------------------------------------- pre-LN encoder

def test_pre_ln_encoder_matches_torch_norm_first_layers():
  cfg = dataclasses.replace(CFG, num_layers=2, pre_ln=True, layer_norm_eps=1e-5)
  rng = np.random.default_rng(7)
  tokens = rng.integers(4, cfg.vocab_size, size=(3, 16)).astype(np.int32)
  tokens[1, 11:] = 0
  tokens[2, 5:] = 0
  model = Encoder(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens))['params']
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  # Non-trivial norms and biases, kernels far from the tiny init, so a mis-wired one shows.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          {'scale': 1.0 + 0.3 * rng.standard_normal(x.shape),
           'bias': 0.3 * rng.standard_normal(x.shape),
           'kernel': rng.standard_normal(x.shape) / np.sqrt(x.shape[0])}.get(
               path[-1].key, np.asarray(x)), jnp.float32), params)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=Encoder.encode))
  ours = np.asarray(encode(params, jnp.asarray(tokens)))

  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
  layers = []
  for i in range(cfg.num_layers):
    p = params[f'layers_{i}']
    layer = torch.nn.TransformerEncoderLayer(
        cfg.hidden, cfg.num_heads, cfg.mlp_dim, dropout=0.0, activation='gelu',
        layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=True,
        dtype=torch.float64)
    a = p['attention']
    with torch.no_grad():
      layer.self_attn.in_proj_weight.copy_(torch.cat(
          [t(a[n]['kernel']).T for n in ('query', 'key', 'value')]))
      layer.self_attn.in_proj_bias.copy_(torch.cat([t(a[n]['bias'])
                                                    for n in ('query', 'key', 'value')]))
      layer.self_attn.out_proj.weight.copy_(t(a['out']['kernel']).T)
      layer.self_attn.out_proj.bias.copy_(t(a['out']['bias']))
      layer.linear1.weight.copy_(t(p['mlp']['wi']['kernel']).T)
      layer.linear1.bias.copy_(t(p['mlp']['wi']['bias']))
      layer.linear2.weight.copy_(t(p['mlp']['wo']['kernel']).T)
      layer.linear2.bias.copy_(t(p['mlp']['wo']['bias']))
      for norm, name in ((layer.norm1, 'attention_norm'), (layer.norm2, 'mlp_norm')):
        norm.weight.copy_(t(p[name]['scale']))
        norm.bias.copy_(t(p[name]['bias']))
    layers.append(layer.eval())
  final = torch.nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps, dtype=torch.float64)
  with torch.no_grad():
    final.weight.copy_(t(params['final_norm']['scale']))
    final.bias.copy_(t(params['final_norm']['bias']))
    emb = params['embed']
    x = t(np.asarray(emb['token']['embedding'])[tokens]
          + np.asarray(emb['position']['embedding'])[None, :tokens.shape[1]])
    pad = torch.tensor(tokens == cfg.pad_id)
    for layer in layers:
      x = layer(x, src_key_padding_mask=pad)
    ref = final(x).numpy()
  real = tokens != cfg.pad_id
  np.testing.assert_allclose(ours[real], ref[real], rtol=1e-4, atol=1e-4)
  assert np.abs(ours[real]).max() > 0.5  # not a trivially small output


def test_masking_chooses_exactly_its_count_in_every_row_of_any_shape():
  # mask_rate * n is an integer here, so every row masks exactly that many of its n tokens.
  for shape in ((10,), (4, 10), (2, 3, 10)):
    tokens = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) % 90 + 10
    out = mlm.mask_tokens(tokens, np.random.default_rng(0), vocab_size=100, mask_id=1,
                          special_ids=(0, 1), mask_rate=0.5)
    assert out['weights'].shape == shape
    np.testing.assert_array_equal(out['weights'].sum(-1), np.full(shape[:-1], 5.0))


def test_masking_refuses_bad_probabilities_in_one_line():
  for mask_token_prob, random_token_prob in ((0.95, 0.1), (-0.1, 0.1), (0.5, -0.1)):
    with pytest.raises(mlm.DataPipelineError) as err:
      mlm.mask_tokens(np.zeros((2, 4), np.int32), np.random.default_rng(0), vocab_size=10,
                      mask_id=1, special_ids=(0, 1), mask_token_prob=mask_token_prob,
                      random_token_prob=random_token_prob)
    assert str(err.value) == (f'mask_token_prob={mask_token_prob} and random_token_prob='
                              f'{random_token_prob} must be non-negative and sum to at most 1.')
  with pytest.raises(mlm.DataPipelineError, match=r'^mask_rate=1.5 must be in \[0, 1\]\.$'):
    mlm.mask_tokens(np.zeros((2, 4), np.int32), np.random.default_rng(0), vocab_size=10,
                    mask_id=1, special_ids=(0, 1), mask_rate=1.5)


def test_documents_without_the_text_feature_are_refused_naming_the_features(monkeypatch):
  import ml_collections
  monkeypatch.setattr(mlm.sources, 'data_source',
                      lambda dataset, split, data_dir: [{'year': 1990, 'speech': 'x'}])
  data = ml_collections.ConfigDict({'dataset': 'sotu', 'text_key': 'text', 'data_dir': None})
  with pytest.raises(mlm.DataPipelineError) as err:
    mlm._documents(data, 'train')
  assert str(err.value) == ("data.text_key='text' is not a feature of 'sotu'; it has: speech, "
                            "year.")

