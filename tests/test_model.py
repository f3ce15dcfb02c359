"""Encoder: parity with HF RoBERTa, pre-LN, bf16, padding, classifier head, dropout."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses  # noqa: E402

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
  """Random LayerNorm scales/biases and dense biases, so a mis-mapped one shows up."""
  rng = np.random.default_rng(seed)

  def f(path, x):
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), x.dtype)
    if name == 'bias':
      return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(f, params)


def _init(cfg, seed=0):
  params = Encoder(cfg).init(jax.random.key(seed), jnp.asarray(_tokens()))
  return _perturb(nn.meta.unbox(params), seed + 1)


@pytest.fixture(scope='module')
def post_ln():
  return _init(CFG)


@pytest.fixture(scope='module')
def post_ln_logits(post_ln):
  return np.asarray(Encoder(CFG).apply(post_ln, jnp.asarray(_tokens())))


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
  # Not vacuous: the logits have spread, and differ between positions.
  assert np.abs(post_ln_logits[real]).max() > 0.5


def test_matches_hf_roberta_classifier():
  cfg = dataclasses.replace(CFG, num_classes=3)
  params = _init(cfg, seed=3)
  tokens = _tokens(seed=4)
  ours = np.asarray(Encoder(cfg).apply(params, jnp.asarray(tokens), task='classify'))
  state_dict = params_to_roberta_state_dict(params, cfg, task='classify')
  hf = _hf_logits('RobertaForSequenceClassification', cfg, state_dict, tokens)
  assert ours.shape == hf.shape == (BATCH, 3)
  np.testing.assert_allclose(ours, hf, atol=1e-4, rtol=0)


def test_convert_rejects_pre_ln():
  with pytest.raises(ValueError, match='post-LN'):
    params_to_roberta_state_dict({}, dataclasses.replace(CFG, pre_ln=True))


def test_pre_ln_runs_and_differs(post_ln, post_ln_logits):
  cfg = dataclasses.replace(CFG, pre_ln=True)
  pre = _init(cfg)
  assert 'final_norm' in pre['params'] and 'norm' not in pre['params']['embed']
  assert 'embed_norm' not in pre['params']
  # Same weights as the post-LN model wherever the trees overlap.
  shared = {k: v for k, v in post_ln['params'].items()}
  shared['embed'] = {k: v for k, v in shared['embed'].items() if k != 'norm'}
  shared['final_norm'] = pre['params']['final_norm']
  assert jax.tree.structure(shared) == jax.tree.structure(pre['params'])
  logits = np.asarray(Encoder(cfg).apply({'params': shared}, jnp.asarray(_tokens())))
  assert logits.shape == post_ln_logits.shape and np.all(np.isfinite(logits))
  real = _tokens() != PAD
  assert np.abs(logits - post_ln_logits)[real].max() > 1e-2


def test_bf16_activations_fp32_params(post_ln, post_ln_logits):
  cfg = dataclasses.replace(CFG, dtype='bfloat16')
  params = nn.meta.unbox(Encoder(cfg).init(jax.random.key(0), jnp.asarray(_tokens())))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jnp.asarray(_tokens())
  hidden = Encoder(cfg).apply(post_ln, tokens, method=Encoder.encode)
  assert hidden.dtype == jnp.bfloat16
  logits = np.asarray(Encoder(cfg).apply(post_ln, tokens))
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
  longer = np.concatenate([tokens, np.full((BATCH, 8), PAD, np.int32)], axis=1)
  logits = np.asarray(Encoder(CFG).apply(post_ln, jnp.asarray(longer)))[:, :LENGTH]
  real = ~pad
  np.testing.assert_allclose(logits[real], post_ln_logits[real], atol=1e-5, rtol=0)
  # ... nor must dropping the padding: each row alone, cut to its own length.
  for row, n in enumerate(LENGTHS):
    alone = np.asarray(Encoder(CFG).apply(post_ln, jnp.asarray(tokens[row:row + 1, :n])))
    np.testing.assert_allclose(alone[0], post_ln_logits[row, :n], atol=1e-5, rtol=0)


def test_classification_head_shape():
  cfg = dataclasses.replace(CFG, num_classes=3)
  model = Encoder(cfg)
  tokens = jnp.asarray(_tokens())
  params = model.init(jax.random.key(0), tokens)
  assert 'classifier' in params['params']
  logits = model.apply(params, tokens, task='classify')
  assert logits.shape == (BATCH, 3) and logits.dtype == jnp.float32
  assert model.apply(params, tokens).shape == (BATCH, LENGTH, cfg.vocab_size)
  with pytest.raises(ValueError, match='num_classes'):
    Encoder(CFG).apply(_init(CFG), tokens, task='classify')
  with pytest.raises(ValueError, match='Unknown task'):
    model.apply(params, tokens, task='nope')


def test_dropout_only_in_train(post_ln):
  cfg = dataclasses.replace(CFG, dropout=0.1, attention_dropout=0.1)
  model, tokens = Encoder(cfg), jnp.asarray(_tokens())
  r1, r2 = jax.random.key(1), jax.random.key(2)
  train_1 = model.apply(post_ln, tokens, train=True, rngs={'dropout': r1})
  train_1b = model.apply(post_ln, tokens, train=True, rngs={'dropout': r1})
  train_2 = model.apply(post_ln, tokens, train=True, rngs={'dropout': r2})
  np.testing.assert_array_equal(train_1, train_1b)
  assert np.abs(np.asarray(train_1 - train_2)).max() > 1e-3
  eval_1 = model.apply(post_ln, tokens, train=False, rngs={'dropout': r1})
  eval_2 = model.apply(post_ln, tokens, train=False, rngs={'dropout': r2})
  np.testing.assert_array_equal(eval_1, eval_2)
  np.testing.assert_array_equal(eval_1, model.apply(post_ln, tokens))  # no rng needed
  # Eval with dropout configured equals the dropout-free model.
  np.testing.assert_allclose(eval_1, Encoder(CFG).apply(post_ln, tokens), atol=0, rtol=0)
