"""Performance paths give the same numbers as the reference paths they replace.

Attention through jax.nn.dot_product_attention ('xla', 'cudnn' on a GPU, 'auto') against the
explicit einsum path, with padding; the erf GELU against jax.nn.gelu; the int8 matmul
against float; the side-by-side benchmark in its tiny mode (speed is not asserted here).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainbig_jax.compress import int8
from trainbig_jax.models.encoder import Encoder, EncoderConfig, attention_implementation, gelu

REPO = Path(__file__).resolve().parents[1]
CFG = EncoderConfig(vocab_size=97, num_layers=2, hidden=32, num_heads=2, mlp_dim=64,
                    max_len=16, dropout=0.0, attention_dropout=0.0)


def padded_tokens() -> np.ndarray:
  """Rows with 16, 11, 3 and 0 real tokens; the rest is padding (id 0)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, CFG.vocab_size, size=(4, 16))
  for row, length in enumerate((16, 11, 3, 0)):
    tokens[row, length:] = CFG.pad_id
  return tokens


@pytest.fixture(scope='module')
def params():
  return Encoder(CFG).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params']


def logits_of(params, attention: str, dtype: str = 'float32', train: bool = False,
              attention_dropout: float = 0.0):
  cfg = dataclasses.replace(CFG, attention=attention, dtype=dtype,
                            attention_dropout=attention_dropout)
  return jax.jit(lambda p, t: Encoder(cfg).apply({'params': p}, t, train=train,
                                                 rngs={'dropout': jax.random.key(1)}))(
      params, padded_tokens())


def implementations() -> list[str]:
  cudnn = jax.default_backend() == 'gpu'
  return ['xla', 'auto'] + (['cudnn'] if cudnn else [])


@pytest.mark.parametrize('attention', implementations())
def test_attention_paths_agree_with_einsum_with_padding_fp32(params, attention):
  if attention == 'cudnn':
    pytest.skip('cuDNN attention takes bf16; checked below')
  reference = logits_of(params, 'einsum')
  got = logits_of(params, attention)
  np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)
  # Padding matters: the padded rows differ from what unmasked attention gives.
  unmasked = dataclasses.replace(CFG, pad_id=-1)
  no_mask = Encoder(unmasked).apply({'params': params}, padded_tokens())
  assert np.abs(np.asarray(no_mask[1]) - np.asarray(reference[1])).max() > 1e-3


@pytest.mark.parametrize('attention', implementations())
def test_attention_paths_agree_in_bf16_within_rounding(params, attention):
  reference = np.asarray(logits_of(params, 'einsum'), np.float32)
  einsum_bf16 = np.asarray(logits_of(params, 'einsum', 'bfloat16'), np.float32)
  got = np.asarray(logits_of(params, attention, 'bfloat16'), np.float32)
  real = padded_tokens() != CFG.pad_id  # fully padded rows: any finite value will do
  assert np.isfinite(got).all()
  rounding = np.abs(einsum_bf16 - reference)[real].max()
  assert np.abs(got - einsum_bf16)[real].max() <= 2 * rounding + 1e-2


def test_attention_gradients_agree(params):
  def grads(attention):
    cfg = dataclasses.replace(CFG, attention=attention)
    loss = lambda p: jnp.sum(Encoder(cfg).apply({'params': p}, padded_tokens()) ** 2)
    return jax.jit(jax.grad(loss))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               grads('xla'), grads('einsum'))


def test_cudnn_lengths_mean_the_same_padding_as_the_mask():
  # The cuDNN path passes key lengths instead of a mask; XLA takes both, so the meaning of
  # the lengths is checked here on any backend.
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(4, 16, 2, 8)), jnp.float32) for _ in range(3))
  key_mask = padded_tokens() != 0
  lengths = jnp.maximum(jnp.sum(key_mask, axis=1, dtype=jnp.int32), 1)
  by_mask = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])
  by_lengths = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(by_lengths[:3], by_mask[:3], atol=1e-6)


def test_training_with_attention_dropout_uses_the_einsum_path(params):
  # Fused kernels have no attention dropout: with it, every setting trains the same way.
  einsum = logits_of(params, 'einsum', train=True, attention_dropout=0.3)
  xla = logits_of(params, 'xla', train=True, attention_dropout=0.3)
  np.testing.assert_array_equal(xla, einsum)
  assert np.abs(np.asarray(einsum) - np.asarray(logits_of(params, 'einsum'))).max() > 1e-3


def test_auto_and_bad_attention_settings():
  assert attention_implementation(dataclasses.replace(CFG, attention='auto')) == (
      'cudnn' if jax.default_backend() == 'gpu' else 'xla')
  assert attention_implementation(dataclasses.replace(CFG, attention='auto',
                                                      dtype='float32')) == 'xla'
  with pytest.raises(ValueError, match="model.attention='flash' is invalid"):
    attention_implementation(dataclasses.replace(CFG, attention='flash'))


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 10001)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x),
                             jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, False)))(x), atol=2e-6)


def test_int8_matmul_is_an_integer_matmul_close_to_float():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
  w = rng.normal(size=(64, 48)).astype(np.float32) * np.linspace(0.1, 2.0, 48)
  kernel = int8.kernel_from_float(w)
  assert kernel.codes.dtype == np.int8 and kernel.scale.shape == (48,)
  got = jax.jit(int8.int8_matmul)(x, kernel)
  reference = np.asarray(x) @ w
  error = np.abs(np.asarray(got) - reference).max() / np.abs(reference).max()
  assert 1e-5 < error < 0.02  # quantized (not float), yet close
  hlo = jax.jit(int8.int8_matmul).lower(x, kernel).as_text()
  assert 'xi8>' in hlo and 'preferred_element_type' not in hlo or 'i32' in hlo
  assert any('dot_general' in line and 'xi8>' in line and 'i32>' in line
             for line in hlo.splitlines())


def test_vs_pytorch_tiny_runs_both_sides():
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import vs_pytorch
  result = vs_pytorch.main(['--tiny'])
  (row,) = result['sizes']
  # The same model on both sides; transformers adds one token-type embedding row.
  assert row['params_torch'] - row['params_jax'] == row['hidden']
  assert row['jax_tokens_per_s'] > 0 and row['torch_tokens_per_s'] > 0
  assert row['ratio'] == pytest.approx(row['jax_tokens_per_s'] / row['torch_tokens_per_s'])
  # At the share needed, jax's step would run at 1.2x the peer's tokens/s.
  needed_jax_s = row['torch_step_s'] / result['target_ratio']
  assert result['target_ratio'] == 1.2 and row['jax_share_for_target'] == pytest.approx(
      row['jax_matmul_share'] * row['jax_step_s'] / needed_jax_s)
  # Same initial loss scale: both start near log(vocab) on the same batches.
  assert abs(row['jax_loss'] - row['torch_loss']) < 1.0


def test_vs_pytorch_set_overrides_the_jax_side_config(capsys):
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import vs_pytorch
  args = vs_pytorch.parse_args(['--tiny', '--set=model.scan_layers=true,model.remat=full,'
                                'train.grad_clip=0.5'])
  config = vs_pytorch.size_config('1x32', args, {'model.remat': 'dots_saveable'})
  assert (config.model.scan_layers, config.model.remat, config.train.grad_clip) == (
      True, 'dots_saveable', 0.5)  # a caller's overrides after --set's
  with pytest.raises(SystemExit):
    vs_pytorch.parse_args(['--tiny', '--set=xla_cpu_enable_fast_math=true'])
  assert "xla_cpu_enable_fast_math are not model.* or train.* fields" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    vs_pytorch.parse_args(['--tiny', '--set=model.remat'])
  assert "'model.remat' in 'model.remat' is not KEY=VALUE" in capsys.readouterr().err


def test_ab_step_reports_remat_memory_and_skips_what_does_not_fit(monkeypatch):
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import ab_step
  size = ['--sizes=2x32', '--seq_len=32', '--batch_size=64', '--vocab_size=128', '--rounds=1']
  policies = [f'--variant={p}:model.remat={p}' for p in ('none', 'full')]
  result = ab_step.main(size + ['--set=model.scan_layers=true'] + policies)
  none, full = result['variants']['none'], result['variants']['full']
  assert none['fits'] and full['fits'] and none['speedup'] == 1.0
  # Under nn.scan, full rematerialisation keeps only each layer's input for the backward pass.
  assert full['peak_bytes'] < 0.7 * none['peak_bytes']
  # On a device that holds only the rematerialised step, the other is listed, not run.
  limit = (none['peak_bytes'] + full['peak_bytes']) // 2
  monkeypatch.setattr(ab_step, 'device_bytes_limit', lambda: limit)
  result = ab_step.main(size + ['--set=model.scan_layers=true'] + policies)
  assert result['variants']['none'] == {'fits': False, 'peak_bytes': none['peak_bytes']}
  assert result['variants']['full']['fits'] and result['variants']['full']['speedup'] == 1.0
  # Layers unrolled and under nn.scan have different parameter trees: one state each.
  result = ab_step.main(size + ['--variant=unrolled:model.remat=none',
                                '--variant=scanned:model.remat=full,model.scan_layers=true'])
  assert result['variants']['scanned']['peak_bytes'] == full['peak_bytes']
  assert all(v['fits'] for v in result['variants'].values())
  with pytest.raises(ValueError, match="config.model has no field 'remmat'"):
    ab_step.main(size + ['--variant=a:model.remmat=full'])


class CountingIterator:
  """Host batches numbered 0, 1, ...; its state is the number drawn; fails at `fail_at`."""

  def __init__(self, count: int, fail_at: int | None = None):
    self.drawn, self.count, self.fail_at = 0, count, fail_at

  def __next__(self):  # no __iter__: the loop's iterators need only __next__ and states
    if self.drawn == self.fail_at:
      raise OSError('disk gone')
    if self.drawn == self.count:
      raise StopIteration
    self.drawn += 1
    return {'inputs': np.full((8, 4), self.drawn - 1, np.int32)}

  def get_state(self):
    return {'drawn': self.drawn}


def test_device_prefetch_keeps_the_consumed_data_position():
  from trainbig_jax.train import partitioning
  from trainbig_jax.train.prefetch import DevicePrefetch
  mesh = partitioning.make_mesh((-1, 1, 1))
  source = CountingIterator(5)
  batches = DevicePrefetch(source, mesh, size=2)
  assert batches.get_state() == {'drawn': 0}
  first = next(batches)
  assert first['inputs'].sharding.mesh.shape == mesh.shape  # already on the devices
  assert int(first['inputs'][0, 0]) == 0
  while source.drawn < 3:  # the thread reads ahead ...
    pass
  assert batches.get_state() == {'drawn': 1}  # ... but the position is what was consumed
  assert [int(b['inputs'][0, 0]) for b in batches] == [1, 2, 3, 4]
  assert batches.get_state() == {'drawn': 5}
  with pytest.raises(StopIteration):
    next(batches)
  batches.close()
  inline = DevicePrefetch(CountingIterator(3), mesh, size=0)  # no read-ahead at all
  assert int(next(inline)['inputs'][0, 0]) == 0 and inline.get_state() == {'drawn': 1}
  assert inline._iterator.drawn == 1
  failing = DevicePrefetch(CountingIterator(5, fail_at=1), mesh)
  next(failing)
  with pytest.raises(OSError, match='disk gone'):
    next(failing)
  failing.close()
