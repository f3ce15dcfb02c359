"""Layers under nn.scan and rematerialisation: the same maths as the per-layer stack.

Scanned and per-layer encoders with the same weights give the same MLM loss and gradients;
every remat policy gives the same gradients; stacked <-> per-layer trees convert exactly, and
a checkpoint stored stacked reads back per layer (what compression and evaluation see).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.models import layer_stack
from trainbig_jax.models.encoder import REMAT_POLICIES, Encoder, encoder_config
from trainbig_jax.tasks import mlm as mlm_task
from trainbig_jax.train import checkpoint
from trainbig_jax.train.checks import ConfigError

VOCAB = 97


def tiny_model(scan_layers=False, remat='none', pre_ln=False):
  c = pretrain_configs.get_config('tiny')
  c.model.num_layers = 3
  c.model.pre_ln = pre_ln
  c.model.scan_layers = scan_layers
  c.model.remat = remat
  mlm_task.check_model_config(c.model)
  return Encoder(encoder_config(c.model, vocab_size=VOCAB, pad_id=0)), c


@pytest.fixture(scope='module')
def reference():
  """Per-layer model, its weights, a masked batch, and its loss and gradients."""
  model, c = tiny_model()
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, VOCAB, size=(4, c.data.seq_len)).astype(np.int32)
  tokens[:, -3:] = 0  # padding
  weights = (rng.random(tokens.shape) < 0.15).astype(np.float32)
  weights[:, 0] = 1.0
  weights[:, -3:] = 0.0
  batch = {'inputs': jnp.where(weights > 0, 4, tokens), 'targets': jnp.asarray(tokens),
           'weights': jnp.asarray(weights)}
  params = jax.device_get(nn.meta.unbox(model.init(jax.random.key(0), batch['inputs'])['params']))
  loss, grads = loss_and_grads(model, c, params, batch)
  return params, batch, loss, grads, c


def loss_and_grads(model, c, params, batch):
  sums = mlm_task.sums_fn(model, c)
  def loss(p):
    s = sums(p, batch, jax.random.key(1), True)
    return s['loss'] / s['weight']
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), jax.device_get(grads)


def assert_trees_close(a, b, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5)


def test_scanned_layers_store_stacked_parameters():
  model, c = tiny_model(scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.ones((1, 8), jnp.int32))['params'])
  assert 'layers' in shapes and not any(k.startswith('layers_') for k in shapes)
  kernel = shapes['layers']['mlp']['wi']['kernel']
  assert kernel.value.shape == (3, c.model.hidden, c.model.mlp_dim)
  assert kernel.names == ('layers', 'embed', 'mlp')  # sharded like the per-layer kernel


@pytest.mark.parametrize('remat', list(REMAT_POLICIES))
def test_scan_and_remat_give_the_same_loss_and_gradients(reference, remat):
  params, batch, loss, grads, c = reference
  model, _ = tiny_model(scan_layers=True, remat=remat)
  scan_loss, scan_grads = loss_and_grads(model, c, layer_stack.stack_layers(params), batch)
  assert abs(scan_loss - loss) < 1e-5
  assert_trees_close(layer_stack.unstack_layers(scan_grads), grads)


def test_remat_without_scan_gives_the_same_gradients(reference):
  params, batch, loss, grads, c = reference
  model, _ = tiny_model(remat='dots_saveable')
  remat_loss, remat_grads = loss_and_grads(model, c, params, batch)
  assert abs(remat_loss - loss) < 1e-5
  assert_trees_close(remat_grads, grads)


def test_stack_unstack_round_trip_and_errors(reference):
  params = reference[0]
  stacked = layer_stack.stack_layers(params)
  np.testing.assert_array_equal(stacked['layers']['attention']['query']['kernel'][2],
                                params['layers_2']['attention']['query']['kernel'])
  assert_trees_close(layer_stack.unstack_layers(stacked), params, atol=0)
  assert layer_stack.to_layout(stacked, scanned=True) is not stacked  # copies, no aliasing
  with pytest.raises(layer_stack.LayoutError, match='numbered 0..L-1'):
    layer_stack.stack_layers({k: v for k, v in params.items() if k != 'layers_1'})
  with pytest.raises(layer_stack.LayoutError, match='both stacked'):
    layer_stack.unstack_layers({**stacked, 'layers_0': params['layers_0']})


def test_stacked_checkpoint_restores_per_layer(reference, tmp_path):
  """What eval, compress and fine-tune read from a scanned run: per-layer kernels."""
  params = reference[0]
  stacked = layer_stack.stack_layers(params)
  mngr = checkpoint.manager(tmp_path)
  state = {'step': np.int32(1), 'params': stacked, 'opt_state': {}}
  checkpoint.save(mngr, 1, state, {'position': 0}, {'wall_time_s': 0.0})
  mngr.close()
  restored = checkpoint.restore_params(tmp_path)
  assert sorted(k for k in restored if k.startswith('layers')) == ['layers_0', 'layers_1',
                                                                     'layers_2']
  assert_trees_close(restored, params, atol=0)


def test_bad_remat_policy_is_one_line():
  c = pretrain_configs.get_config('tiny')
  c.model.remat = 'some'
  with pytest.raises(ConfigError, match="model.remat='some' is invalid; allowed: none"):
    mlm_task.check_model_config(c.model)
