"""Encoder-decoder: Marian parity, packing, decode cache, beam search, overfitting to BLEU."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from trainbig_jax.models import decoding  # noqa: E402
from trainbig_jax.models.encoder_decoder import (EncoderDecoder,  # noqa: E402
                                                 EncoderDecoderConfig, label_smoothed_sums,
                                                 shift_right)
from trainbig_jax.models.hf_convert import marian_config, params_to_marian_state_dict  # noqa: E402

PAD, BOS, EOS = 0, 2, 3
CFG = EncoderDecoderConfig(vocab_size=64, num_encoder_layers=2, num_decoder_layers=2, hidden=32,
                           num_heads=4, mlp_dim=64, max_len=24, dropout=0.0,
                           attention_dropout=0.0)
VARIANTS = {'post_ln_sinusoidal': CFG,
            'pre_ln_learned': dataclasses.replace(CFG, pre_ln=True, positions='learned')}


def _perturb(params, seed=1):
  """Random norms, biases and 1/sqrt(fan_in) kernels: attention far from uniform, so a
  mis-mapped or mis-masked weight moves the logits well past the tolerances."""
  rng = np.random.default_rng(seed)

  def f(path, x):
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), x.dtype)
    if name in ('bias', 'final_logits_bias'):
      return jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
    if name == 'kernel':
      return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(x.shape[0]), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(f, params)


def _pairs(seed=0, lengths=((7, 5), (4, 9), (10, 3))):
  """Random (source, target) id lists, each ending with eos; no special ids inside."""
  rng = np.random.default_rng(seed)
  return [(list(rng.integers(5, CFG.vocab_size, ls - 1)) + [EOS],
           list(rng.integers(5, CFG.vocab_size, lt - 1)) + [EOS]) for ls, lt in lengths]


def _padded(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


@pytest.fixture(scope='module', params=list(VARIANTS))
def model_params(request):
  cfg = VARIANTS[request.param]
  model = EncoderDecoder(cfg)
  x = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), x, x)['params'])
  return model, _perturb(params)


def test_marian_parity():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model = EncoderDecoder(CFG)
  x = jnp.zeros((1, 8), jnp.int32)
  params = _perturb(nn.unbox(model.init(jax.random.key(0), x, x)['params']))
  pairs = _pairs()
  inputs = _padded([s for s, _ in pairs], 12)
  targets = _padded([t for _, t in pairs], 10)
  ours = np.asarray(model.apply({'params': params}, inputs, targets))

  hf = transformers.MarianMTModel(transformers.MarianConfig(**marian_config(CFG))).eval()
  state = {k: torch.from_numpy(v) for k, v in params_to_marian_state_dict(params, CFG).items()}
  missing, unexpected = hf.load_state_dict(state, strict=False)
  assert not unexpected
  assert all('embed_positions' in k for k in missing), missing  # Marian's own sinusoids
  decoder_inputs = np.asarray(shift_right(jnp.asarray(targets), None, BOS))
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(inputs.astype(np.int64)),
                attention_mask=torch.from_numpy((inputs != PAD).astype(np.int64)),
                decoder_input_ids=torch.from_numpy(decoder_inputs.astype(np.int64))).logits
  real = targets != PAD
  np.testing.assert_allclose(ours[real], theirs.numpy()[real], atol=1e-4, rtol=1e-4)
  assert np.abs(ours[real]).max() > 1.0  # not trivially small logits


def test_packed_pairs_get_their_own_loss(model_params):
  model, params = model_params
  pairs = _pairs(seed=2)
  src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
  pack = 24

  def packed(rows):
    tokens, seg, pos = np.zeros((1, pack), np.int32), np.zeros((1, pack), np.int32), \
        np.zeros((1, pack), np.int32)
    at = 0
    for i, r in enumerate(rows):
      tokens[0, at:at + len(r)], seg[0, at:at + len(r)] = r, i + 1
      pos[0, at:at + len(r)] = np.arange(len(r))
      at += len(r)
    return tokens, seg, pos

  inputs, inputs_seg, inputs_pos = packed(src)
  targets, targets_seg, targets_pos = packed(tgt)
  batch = dict(inputs=inputs, inputs_segmentation=inputs_seg, inputs_position=inputs_pos,
               targets=targets, targets_segmentation=targets_seg,
               targets_position=targets_pos)
  sums = label_smoothed_sums(model, label_smoothing=0.1)
  rng = jax.random.key(0)
  together = sums(params, batch, rng, True)  # smoothed loss; dropout is 0 in these configs
  alone = [sums(params, dict(inputs=_padded([s], 12), targets=_padded([t], 10)), rng, True)
           for s, t in pairs]
  for key in ('loss', 'weight', 'correct'):
    np.testing.assert_allclose(together[key], sum(a[key] for a in alone), rtol=1e-5)
  # Per pair too (a leak between pairs could cancel in the total): compare token log-probs.
  logits = model.apply({'params': params}, inputs, targets, inputs_seg, targets_seg, inputs_pos,
                       targets_pos)
  at = 0
  for s, t in pairs:
    single = model.apply({'params': params}, _padded([s], 12), _padded([t], 10))
    np.testing.assert_allclose(logits[0, at:at + len(t)], single[0, :len(t)], atol=1e-4)
    at += len(t)


def test_label_smoothing_matches_optax(model_params):
  model, params = model_params
  pairs = _pairs(seed=3)
  batch = dict(inputs=_padded([s for s, _ in pairs], 12), targets=_padded([t for _, t in pairs], 10))
  sums = label_smoothed_sums(model, label_smoothing=0.2)
  logits = model.apply({'params': params}, batch['inputs'], batch['targets'])
  weights = batch['targets'] != PAD
  for train, smoothing in ((True, 0.2), (False, 0.0)):  # eval reports the plain NLL
    got = sums(params, batch, jax.random.key(0), train)
    labels = optax.smooth_labels(jax.nn.one_hot(batch['targets'], CFG.vocab_size), smoothing)
    want = jnp.sum(optax.softmax_cross_entropy(logits, labels) * weights)
    np.testing.assert_allclose(got['loss'], want, rtol=1e-5)
    assert got['weight'] == weights.sum()


def test_cached_decoding_gives_full_forward_logits(model_params):
  model, params = model_params
  pairs = _pairs(seed=4)
  inputs = jnp.asarray(_padded([s for s, _ in pairs], 12))
  targets = jnp.asarray(_padded([t for _, t in pairs], 10))
  full = jax.nn.log_softmax(model.apply({'params': params}, inputs, targets))
  encoded = model.apply({'params': params}, inputs, method=EncoderDecoder.encode)
  cache = decoding._init_cache(model, params, encoded, inputs, targets.shape[1])
  decoder_inputs = shift_right(targets, None, BOS)
  step = jax.jit(lambda c, tok, i: decoding._step_logits(model, params, c, encoded, inputs,
                                                          tok, i))
  for i in range(targets.shape[1]):
    log_probs, cache = step(cache, decoder_inputs[:, i], jnp.array(i))
    np.testing.assert_allclose(log_probs, full[:, i], atol=1e-4)


def test_beam_one_is_greedy_and_beam_scores_are_log_probs():
  model = EncoderDecoder(CFG)
  x = jnp.zeros((1, 8), jnp.int32)
  params = _perturb(nn.unbox(model.init(jax.random.key(0), x, x)['params']))
  pairs = _pairs(seed=5, lengths=((6, 2), (9, 2), (3, 2), (11, 2)))
  inputs = jnp.asarray(_padded([s for s, _ in pairs] + [[]], 12))  # + an all-padding row
  max_len = 9
  greedy = decoding.make_decode_fn(model, max_len)(params, inputs)
  # With fairseq's rules a beam of 1 finishes at its first eos, whatever the length penalty.
  beam1, _ = jax.jit(lambda p, x: decoding.beam_search(model, p, x, max_len, 1, 1.0,
                                                       'fairseq'))(params, inputs)
  np.testing.assert_array_equal(beam1, greedy)
  assert np.all(np.asarray(greedy[-1]) == PAD)  # the padding row decodes to nothing

  # With no length penalty, beam 4's best log-probability is at least greedy's.
  def logp(tokens):
    targets = jnp.where(tokens == PAD, PAD, tokens)
    lp = jax.nn.log_softmax(model.apply({'params': params}, inputs, targets))
    tok = jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return np.asarray(jnp.sum(tok * (targets != PAD), -1))

  beam4, score4 = jax.jit(lambda p, x: decoding.beam_search(model, p, x, max_len, 4, 0.0))(
      params, inputs)
  real = slice(0, len(pairs))
  assert np.all(logp(beam4)[real] >= logp(greedy)[real] - 1e-4)
  np.testing.assert_allclose(score4[real], logp(beam4)[real], atol=1e-3)


def test_length_penalties():
  np.testing.assert_allclose(decoding.length_penalty(7, 0.6, 'gnmt'), (12 / 6) ** 0.6)
  np.testing.assert_allclose(decoding.length_penalty(7, 0.6, 'fairseq'), 7 ** 0.6, rtol=1e-6)
  with pytest.raises(ValueError, match='allowed: gnmt, fairseq'):
    decoding.length_penalty(7, 0.6, 'wu')
  with pytest.raises(ValueError, match='beam_size'):
    decoding.make_decode_fn(EncoderDecoder(CFG), 8, beam_size=0)


def test_tiny_model_overfits_to_bleu_above_90():
  sacrebleu = pytest.importorskip('sacrebleu')
  words_en = 'the cat dog sat on a mat red blue green house big small runs'.split()
  words_fr = 'le chat chien assis sur un tapis rouge bleu vert maison grand petit court'.split()
  sentences = ['the cat sat on a mat', 'a big red dog runs', 'the small house is blue',
               'a green cat on the house', 'the dog sat', 'big blue mat']
  en_vocab = {w: i + 5 for i, w in enumerate(words_en + ['is'])}
  fr_words = dict(zip(words_en + ['is'], words_fr + ['est']))
  fr_vocab = {w: i + 5 + len(en_vocab) for i, w in enumerate(fr_words.values())}
  fr_of_id = {i: w for w, i in fr_vocab.items()}
  src = [[en_vocab[w] for w in s.split()] + [EOS] for s in sentences]
  refs = [' '.join(fr_words[w] for w in s.split()) for s in sentences]
  tgt = [[fr_vocab[w] for w in r.split()] + [EOS] for r in refs]
  cfg = EncoderDecoderConfig(vocab_size=48, num_encoder_layers=1, num_decoder_layers=1,
                             hidden=32, num_heads=2, mlp_dim=64, max_len=16, dropout=0.0,
                             attention_dropout=0.0)
  model = EncoderDecoder(cfg)
  batch = dict(inputs=_padded(src, 8), targets=_padded(tgt, 8))
  params = nn.unbox(model.init(jax.random.key(0), batch['inputs'], batch['targets'])['params'])
  tx = optax.adam(3e-3)
  sums = label_smoothed_sums(model, label_smoothing=0.0)

  @jax.jit
  def train(params, opt_state):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: sums(p, batch, jax.random.key(0), True)['loss'])(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, opt_state), None, length=150)[0]

  params, _ = train(params, tx.init(params))
  out = decoding.make_decode_fn(model, 8, beam_size=2)(params, jnp.asarray(batch['inputs']))
  hyps = [' '.join(fr_of_id.get(t, '?') for t in row)
          for row in decoding.strip_special(out, EOS, PAD)]
  bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
  assert bleu > 90, (bleu, hyps)
