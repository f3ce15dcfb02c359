"""Greedy decoding and beam search for the encoder-decoder, jit-compiled once per shape.

Both loops run to a fixed `max_decode_len` (a `lax.while_loop` that may stop early when every
row is finished), so a batch of short sentences and a batch of long ones share one compiled
program. Rows whose source is all padding (the filler of a last, partial batch) count as
finished from the start and come back as all-padding outputs; callers drop them.

Beam search follows fairseq's rules: each step expands the live hypotheses into 2 x beam
candidates; eos among the best `beam` candidates finishes a hypothesis, scored as its
log-probability divided by a length penalty; the best `beam` non-eos candidates stay live; a
sentence is done once it has `beam` finished hypotheses. With beam 1 this is greedy decoding.
Hypotheses still live at `max_decode_len` compete with the finished ones at that length.

Outputs are token ids [batch, max_decode_len]: the generated tokens, eos included, then pad.
Parameters may be sharded: the functions are pure and jit propagates their shardings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from trainbig_jax.models.encoder_decoder import EncoderDecoder

PyTree = Any
LENGTH_PENALTIES = ('gnmt', 'fairseq')
NEG_INF = -1.0e9  # finite, so that arithmetic on it stays finite


def length_penalty(length: jax.Array, alpha: float, form: str) -> jax.Array:
  """Divisor of a hypothesis' log-probability: GNMT ((5 + len) / 6)^alpha (Wu et al. 2016)
  or fairseq len^alpha; len counts the generated tokens, eos included."""
  length = jnp.asarray(length, jnp.float32)
  if form == 'gnmt':
    return ((5.0 + length) / 6.0) ** alpha
  if form == 'fairseq':
    return length ** alpha
  raise ValueError(f'length penalty {form!r} is invalid; allowed: {", ".join(LENGTH_PENALTIES)}.')


def _init_cache(model: EncoderDecoder, params: PyTree, encoded: jax.Array, inputs: jax.Array,
                max_decode_len: int) -> PyTree:
  """Zero keys/values for `max_decode_len` positions (shapes only are traced, nothing runs)."""
  dummy = jnp.zeros((inputs.shape[0], max_decode_len), jnp.int32)
  shapes = jax.eval_shape(
      lambda p, e, i: model.apply({'params': p}, e, i, dummy, decode=True,
                                  method=EncoderDecoder.decode, mutable=['cache'])[1]['cache'],
      params, encoded, inputs)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _step_logits(model: EncoderDecoder, params: PyTree, cache: PyTree, encoded: jax.Array,
                 inputs: jax.Array, tokens: jax.Array, index: jax.Array):
  """Log-probabilities [n, vocab] of the token after `tokens` [n] at position `index`."""
  positions = jnp.full((tokens.shape[0], 1), index, jnp.int32)
  logits, variables = model.apply(
      {'params': params, 'cache': cache}, encoded, inputs, tokens[:, None],
      targets_position=positions, decode=True, method=EncoderDecoder.decode, mutable=['cache'])
  log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32))
  return log_probs, variables['cache']


def _never_generated(log_probs: jax.Array, cfg) -> jax.Array:
  """pad and bos are never outputs (fairseq likewise bans pad)."""
  return log_probs.at[:, jnp.array([cfg.pad_id, cfg.bos_id])].set(NEG_INF)


def greedy_decode(model: EncoderDecoder, params: PyTree, inputs: jax.Array,
                  max_decode_len: int) -> jax.Array:
  """Most probable next token at each step: [batch, max_decode_len] token ids."""
  cfg = model.cfg
  batch = inputs.shape[0]
  encoded = model.apply({'params': params}, inputs, method=EncoderDecoder.encode)
  cache = _init_cache(model, params, encoded, inputs, max_decode_len)
  done = ~jnp.any(inputs != cfg.pad_id, axis=1)
  out = jnp.full((batch, max_decode_len), cfg.pad_id, jnp.int32)
  last = jnp.full((batch,), cfg.bos_id, jnp.int32)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_decode_len) & ~jnp.all(done)

  def body(state):
    i, cache, last, out, done = state
    log_probs, cache = _step_logits(model, params, cache, encoded, inputs, last, i)
    log_probs = _never_generated(log_probs, cfg)
    token = jnp.where(done, cfg.pad_id, jnp.argmax(log_probs, -1).astype(jnp.int32))
    out = out.at[:, i].set(token)
    return i + 1, cache, token, out, done | (token == cfg.eos_id)

  return jax.lax.while_loop(cond, body, (jnp.array(0), cache, last, out, done))[3]


def _gather_beams(x: jax.Array, beam_index: jax.Array) -> jax.Array:
  """x [batch, beams, ...], beam_index [batch, n] -> [batch, n, ...]."""
  return jnp.take_along_axis(x, beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2)),
                             axis=1)


def beam_search(model: EncoderDecoder, params: PyTree, inputs: jax.Array, max_decode_len: int,
                beam_size: int, alpha: float = 0.6,
                penalty: str = 'gnmt') -> tuple[jax.Array, jax.Array]:
  """Best hypothesis per row: (tokens [batch, max_decode_len], score [batch])."""
  cfg = model.cfg
  length_penalty(1, alpha, penalty)  # rejects an unknown form before tracing the loop
  batch, k = inputs.shape[0], beam_size
  flat_inputs = jnp.repeat(inputs, k, axis=0)  # row b*k + j is beam j of sentence b
  encoded = model.apply({'params': params}, flat_inputs, method=EncoderDecoder.encode)
  cache = _init_cache(model, params, encoded, flat_inputs, max_decode_len)

  live_seqs = jnp.zeros((batch, k, max_decode_len), jnp.int32)
  # Only beam 0 starts live, so the first step does not expand k copies of one prefix.
  live_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch, 1))
  finished_seqs = jnp.zeros((batch, k, max_decode_len), jnp.int32)
  finished_scores = jnp.full((batch, k), NEG_INF)
  finished_count = jnp.where(jnp.any(inputs != cfg.pad_id, axis=1), 0, k)
  last = jnp.full((batch, k), cfg.bos_id, jnp.int32)

  def cond(state):
    i, finished_count = state[0], state[-1]
    return (i < max_decode_len) & ~jnp.all(finished_count >= k)

  def body(state):
    i, cache, last, live_seqs, live_logp, finished_seqs, finished_scores, count = state
    log_probs, cache = _step_logits(model, params, cache, encoded, flat_inputs,
                                    last.reshape(-1), i)
    log_probs = _never_generated(log_probs, cfg)
    vocab = log_probs.shape[-1]
    scores = (live_logp[:, :, None] + log_probs.reshape(batch, k, vocab)).reshape(batch, -1)
    cand_logp, cand_index = jax.lax.top_k(scores, 2 * k)
    cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
    cand_seqs = _gather_beams(live_seqs, cand_beam).at[:, :, i].set(cand_token)
    is_eos = cand_token == cfg.eos_id
    sentence_done = (count >= k)[:, None]

    # eos among the best k candidates finishes a hypothesis (none for done sentences).
    finishing = is_eos & (jnp.arange(2 * k) < k)[None, :] & ~sentence_done
    cand_scores = jnp.where(finishing, cand_logp / length_penalty(i + 1, alpha, penalty),
                            NEG_INF)
    merged_scores = jnp.concatenate([finished_scores, cand_scores], axis=1)
    merged_seqs = jnp.concatenate([finished_seqs, cand_seqs], axis=1)
    finished_scores, keep = jax.lax.top_k(merged_scores, k)
    finished_seqs = _gather_beams(merged_seqs, keep)
    count = count + jnp.sum(finishing, axis=1)

    # The best k non-eos candidates stay live.
    live_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand_logp), k)
    live_seqs = _gather_beams(cand_seqs, keep)
    last = jnp.take_along_axis(cand_token, keep, axis=1)
    source = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(cand_beam, keep, 1)).reshape(-1)
    cache = jax.tree.map(lambda x: x[source] if x.ndim else x, cache)
    return i + 1, cache, last, live_seqs, live_logp, finished_seqs, finished_scores, count

  state = (jnp.array(0), cache, last, live_seqs, live_logp, finished_seqs, finished_scores,
           finished_count)
  i, _, _, live_seqs, live_logp, finished_seqs, finished_scores, count = jax.lax.while_loop(
      cond, body, state)
  # Sentences that ran out of length: their live hypotheses compete at the length reached.
  live_scores = jnp.where((count < k)[:, None], live_logp / length_penalty(i, alpha, penalty),
                          NEG_INF)
  scores = jnp.concatenate([finished_scores, live_scores], axis=1)
  seqs = jnp.concatenate([finished_seqs, live_seqs], axis=1)
  best = jnp.argmax(scores, axis=1)
  tokens = jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
  tokens = jnp.where(jnp.any(inputs != cfg.pad_id, axis=1)[:, None], tokens, cfg.pad_id)
  return tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


def make_decode_fn(model: EncoderDecoder, max_decode_len: int, beam_size: int = 1,
                   alpha: float = 0.6, penalty: str = 'gnmt') -> Callable[[PyTree, jax.Array],
                                                                          jax.Array]:
  """Jitted (params, inputs [batch, source_len]) -> tokens [batch, max_decode_len].

  beam_size 1 decodes greedily. One compilation per input shape: callers pad every batch to
  the same [batch, source_len].
  """
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size={beam_size!r} is invalid: it must be a positive integer.')
  length_penalty(1, alpha, penalty)
  if beam_size == 1:
    return jax.jit(functools.partial(greedy_decode, model, max_decode_len=max_decode_len))
  return jax.jit(lambda params, inputs: beam_search(model, params, inputs, max_decode_len,
                                                    beam_size, alpha, penalty)[0])


def strip_special(tokens, eos_id: int, pad_id: int = 0) -> list[list[int]]:
  """Token id rows -> lists of ids up to (not including) the first eos, padding removed."""
  rows = []
  for row in jax.device_get(tokens).tolist():
    out = []
    for t in row:
      if t == eos_id:
        break
      if t != pad_id:
        out.append(t)
    rows.append(out)
  return rows
