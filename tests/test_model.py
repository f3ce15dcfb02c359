"""Encoder: parity with HF RoBERTa, pre-LN, bf16, padding, classifier head, dropout."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses  # noqa: E402
import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from trainbig_jax.models.encoder import Encoder, EncoderConfig  # noqa: E402
from trainbig_jax.models.hf_convert import (params_to_roberta_state_dict,  # noqa: E402
                                            roberta_config)

PAD = 0
CFG = EncoderConfig(vocab_size=300, num_layers=2, hidden=64, num_heads=4, mlp_dim=128,
                    max_len=40, dropout=0.0, attention_dropout=0.0, pad_id=PAD)
BATCH, LENGTH = 4, 24
LENGTHS = (24, 17, 9, 1)  # rows 1..3 are right-padded


def _tokens(seed=0, lengths=LENGTHS, length=LENGTH):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, size=(len(lengths), length))  # no pad inside
  for row, n in enumerate(lengths):
    tokens[row, n:] = PAD
  return tokens.astype(np.int32)


def _perturb(params, seed=1):
  """Random LayerNorm scales/biases and dense biases, so a mis-mapped one shows up; dense
  kernels get std 1/sqrt(fan_in) so attention is far from uniform (with the 0.02 init a
  query/key mix-up moves the logits by less than the tolerance)."""
  rng = np.random.default_rng(seed)

  def f(path, x):
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), x.dtype)
    if name == 'bias':
      return jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
    if name == 'kernel':
      return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[0]), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(f, params)


@functools.partial(jax.jit, static_argnames=('cfg', 'train', 'task', 'method'))
def _apply(cfg, params, tokens, train=False, task='mlm', method=None, rngs=None):
  kwargs = {} if method else {'task': task}
  return Encoder(cfg).apply(params, tokens, train, method=method, rngs=rngs, **kwargs)


def _hidden_and_logits(module, tokens, train):
  return module.encode(tokens, train), module(tokens, train)


def _init(cfg, seed=0, task='mlm'):
  init = jax.jit(functools.partial(Encoder(cfg).init, task=task))
  params = init(jax.random.key(seed), jnp.asarray(_tokens()))
  return _perturb(nn.meta.unbox(params), seed + 1)


@pytest.fixture(scope='module')
def post_ln():
  return _init(CFG)


@pytest.fixture(scope='module')
def post_ln_logits(post_ln):
  return np.asarray(_apply(CFG, post_ln, jnp.asarray(_tokens())))


CLS_CFG = dataclasses.replace(CFG, num_classes=3)


@pytest.fixture(scope='module')
def classifier():
  # The heads are created lazily: init with the task that will be trained.
  return _init(CLS_CFG, seed=3, task='classify')


def _hf_logits(model_cls, cfg, state_dict, tokens):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_config = transformers.RobertaConfig(**roberta_config(cfg))
  hf_config._attn_implementation = 'eager'
  model = getattr(transformers, model_cls)(hf_config).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  input_ids = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    out = model(input_ids=input_ids, attention_mask=(input_ids != cfg.pad_id).long())
  return out.logits.numpy()


def test_matches_hf_roberta(post_ln, post_ln_logits):
  tokens = _tokens()
  state_dict = params_to_roberta_state_dict(post_ln, CFG)
  hf = _hf_logits('RobertaForMaskedLM', CFG, state_dict, tokens)
  real = tokens != PAD
  assert hf.shape == post_ln_logits.shape == (BATCH, LENGTH, CFG.vocab_size)
  diff = np.abs(hf - post_ln_logits)[real].max()
  print(f'max |ours - HF| at real positions: {diff:.3g}')
  assert diff <= 1e-4
  # Not vacuous: the perturbed model gives logits well above the tolerance.
  assert np.abs(post_ln_logits[real]).max() > 0.5


def test_matches_hf_roberta_classifier(classifier):
  tokens = _tokens()
  ours = np.asarray(_apply(CLS_CFG, classifier, jnp.asarray(tokens), task='classify'))
  state_dict = params_to_roberta_state_dict(classifier, CLS_CFG, task='classify')
  hf = _hf_logits('RobertaForSequenceClassification', CLS_CFG, state_dict, tokens)
  assert ours.shape == hf.shape == (BATCH, 3)
  np.testing.assert_allclose(ours, hf, atol=1e-4, rtol=0)


def test_convert_rejects_pre_ln():
  with pytest.raises(ValueError, match='post-LN'):
    params_to_roberta_state_dict({}, dataclasses.replace(CFG, pre_ln=True))


def test_pre_ln_runs_and_differs(post_ln, post_ln_logits):
  cfg = dataclasses.replace(CFG, pre_ln=True)
  pre = nn.meta.unbox(jax.eval_shape(Encoder(cfg).init, jax.random.key(0),
                                     jnp.asarray(_tokens())))['params']
  assert 'final_norm' in pre and 'norm' not in pre['embed']
  # Same weights as the post-LN model wherever the trees overlap.
  shared = dict(post_ln['params'])
  shared['embed'] = {k: v for k, v in shared['embed'].items() if k != 'norm'}
  shared['final_norm'] = post_ln['params']['embed']['norm']  # some non-trivial LayerNorm
  assert jax.tree.structure(shared) == jax.tree.structure(pre)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(pre)))
  logits = np.asarray(_apply(cfg, {'params': shared}, jnp.asarray(_tokens())))
  assert logits.shape == post_ln_logits.shape and np.all(np.isfinite(logits))
  real = _tokens() != PAD
  assert np.abs(logits - post_ln_logits)[real].max() > 1e-2


def test_bf16_activations_fp32_params(post_ln, post_ln_logits):
  cfg = dataclasses.replace(CFG, dtype='bfloat16')
  params = nn.meta.unbox(jax.eval_shape(Encoder(cfg).init, jax.random.key(0),
                                        jnp.asarray(_tokens())))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jnp.asarray(_tokens())
  hidden, logits = _apply(cfg, post_ln, tokens, method=_hidden_and_logits)
  assert hidden.dtype == jnp.bfloat16
  logits = np.asarray(logits)
  assert logits.dtype == np.float32
  real = _tokens() != PAD
  err = np.abs(logits - post_ln_logits)[real].max()
  scale = np.abs(post_ln_logits[real]).max()
  assert err <= 0.05 * scale, (err, scale)


def test_padding_invariance(post_ln, post_ln_logits):
  tokens = _tokens()
  pad = tokens == PAD
  assert pad.any()
  # The key mask comes from the pad id, so "other content at padded positions" means more or
  # less padding: extra trailing pads must not change the logits at real positions ...
  longer = np.concatenate([tokens, np.full((BATCH, 8), PAD, np.int32)], axis=1)[::-1]
  logits = np.asarray(_apply(CFG, post_ln, jnp.asarray(longer)))[::-1, :LENGTH]
  # ... nor must the other rows of the batch (the rows are reversed here).
  real = ~pad
  np.testing.assert_allclose(logits[real], post_ln_logits[real], atol=1e-5, rtol=0)


def test_classification_head_shape(post_ln, classifier):
  tokens = jnp.asarray(_tokens())
  params = classifier['params']
  assert 'classifier' in params and 'mlm_head' not in params
  assert params['classifier']['out']['kernel'].shape == (CFG.hidden, 3)
  logits = _apply(CLS_CFG, classifier, tokens, task='classify')
  assert logits.shape == (BATCH, 3) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match='num_classes'):
    jax.eval_shape(functools.partial(Encoder(CFG).apply, task='classify'), post_ln, tokens)
  with pytest.raises(ValueError, match='Unknown task'):
    jax.eval_shape(functools.partial(Encoder(CLS_CFG).apply, task='nope'), classifier, tokens)


def test_dropout_only_in_train(post_ln):
  cfg = dataclasses.replace(CFG, dropout=0.1, attention_dropout=0.1)
  tokens = jnp.asarray(_tokens())
  r1, r2 = jax.random.key(1), jax.random.key(2)
  train_1 = _apply(cfg, post_ln, tokens, True, rngs={'dropout': r1})
  train_1b = _apply(cfg, post_ln, tokens, True, rngs={'dropout': r1})
  train_2 = _apply(cfg, post_ln, tokens, True, rngs={'dropout': r2})
  np.testing.assert_array_equal(train_1, train_1b)
  assert np.abs(np.asarray(train_1 - train_2)).max() > 1e-3
  eval_1 = _apply(cfg, post_ln, tokens, False, rngs={'dropout': r1})
  eval_2 = _apply(cfg, post_ln, tokens, False, rngs={'dropout': r2})
  np.testing.assert_array_equal(eval_1, eval_2)
  np.testing.assert_array_equal(eval_1, _apply(cfg, post_ln, tokens))  # no rng needed
  # Eval with dropout configured equals the dropout-free model.
  np.testing.assert_allclose(eval_1, _apply(CFG, post_ln, tokens), atol=1e-6, rtol=0)
