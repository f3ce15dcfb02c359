"""Sharded training equals single-device training, on every mesh layout."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.models.encoder import Encoder, encoder_config
from trainbig_jax.tasks.mlm import encoder_init_fn, mlm_sums
from trainbig_jax.train import partitioning
from trainbig_jax.train.state import create_sharded_state, make_optimizer
from trainbig_jax.train.steps import make_train_step

VOCAB = 512


def _config(accum=1):
  c = pretrain_configs.get_config('tiny')
  c.train.grad_accum_steps = accum
  c.model.dropout = c.model.attention_dropout = 0.1  # dropout must shard identically too
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, l = c.train.batch_size, c.data.seq_len
  targets = rng.integers(5, VOCAB, (b, l)).astype(np.int32)
  weights = (rng.random((b, l)) < 0.15).astype(np.float32)
  inputs = np.where(weights > 0, 4, targets).astype(np.int32)
  inputs[:, -3:] = 0  # some padding
  weights[:, -3:] = 0
  return {'inputs': inputs, 'targets': targets, 'weights': weights}


def _train(mesh_shape, devices, c, steps=2):
  mesh = partitioning.make_mesh(mesh_shape, devices)
  model = Encoder(encoder_config(c.model, vocab_size=VOCAB))
  tx = make_optimizer(c.train)
  state, shardings = create_sharded_state(encoder_init_fn(model, c.data.seq_len), tx, mesh,
                                          jax.random.key(0))
  step = jax.jit(make_train_step(mlm_sums(model), tx, c.train.grad_accum_steps),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh),
                               NamedSharding(mesh, P())),
                 out_shardings=(shardings, NamedSharding(mesh, P())))
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    for i in range(steps):
      batch = partitioning.global_batch(_batch(c, i), mesh)
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics['train_loss']))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope='module')
def reference():
  return _train((1, 1, 1), jax.devices()[:1], _config())


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_step_matches_single_device(reference, mesh_shape):
  ref_losses, ref_params, _ = reference
  losses, params, state = _train(mesh_shape, jax.devices(), _config())
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               params, ref_params)
  # The layout is really sharded as the rules say, not silently replicated.
  kernel = state.params['layers_0']['mlp']['wi']['kernel']
  fsdp, tensor = mesh_shape[1], mesh_shape[2]
  assert kernel.addressable_shards[0].data.shape == (32 // fsdp, 128 // tensor)


def test_gradient_accumulation_matches_full_batch(reference):
  ref_losses, ref_params, _ = reference
  losses, params, _ = _train((2, 2, 2), jax.devices(), _config(accum=2))
  # Dropout draws differ per micro-batch, so compare with dropout off on both sides.
  c1, c2 = _config(), _config(accum=2)
  for c in (c1, c2):
    c.model.dropout = c.model.attention_dropout = 0.0
  l1, p1, _ = _train((1, 1, 1), jax.devices()[:1], c1)
  l2, p2, _ = _train((2, 2, 2), jax.devices(), c2)
  np.testing.assert_allclose(l2, l1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), p2, p1)


@pytest.mark.parametrize('shape, message', [
    ((3, 1, 1), 'needs 3 devices'),
    ((-1, 3, 1), 'not divisible by 3'),
    ((8, 1), 'give 3 sizes'),
])
def test_bad_mesh_is_one_clear_error(shape, message):
  with pytest.raises(partitioning.MeshError, match=message):
    partitioning.make_mesh(shape)
