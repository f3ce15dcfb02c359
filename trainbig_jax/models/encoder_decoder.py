"""Transformer encoder-decoder for translation (Vaswani et al. 2017; fairseq/Marian layout).

One SentencePiece vocabulary serves both languages: a single embedding table feeds the encoder
and the decoder and, transposed, is the output projection. Embeddings are scaled by
sqrt(hidden). Positions are sinusoidal (no parameters) or learned, by config. Post-LN (the
original Transformer, Marian) or pre-LN (fairseq's `--*-normalize-before`, with a final norm
after each stack).

Packed rows: `*_segmentation` (0 = padding, 1, 2, ... one id per pair) and `*_position`
(restarting at 0 per pair) keep packed pairs apart in encoder self-attention, decoder causal
self-attention and cross-attention. Without them a row is one pair and pad tokens are padding.

The MLP, layer norm, dense layers and logical axis names are the encoder's
(`models/encoder.py`), so sharding rules and compression treat both families alike. Attention
is its own module here: it needs cross-attention, full [query, key] masks and a decode cache.

Parameter tree:
  shared_embedding/embedding  [vocab, hidden]   (tied: encoder input, decoder input, output)
  encoder/positions/position/embedding, decoder/...   (learned positions only)
  encoder/layers_i/{attention,attention_norm,mlp,mlp_norm}/...
  decoder/layers_i/{attention,attention_norm,cross_attention,cross_attention_norm,mlp,mlp_norm}/...
  encoder/final_norm, decoder/final_norm   (pre-LN only)
  final_logits_bias  [vocab]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trainbig_jax.models.axes import (ACT_EMBED, ACT_HEADS, BATCH, EMBED, HEADS, LENGTH,
                                      POSITION, VOCAB)
from trainbig_jax.models.encoder import DTYPES, Mlp, _constrain, _dense, _layer_norm

POSITION_KINDS = ('sinusoidal', 'learned')


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  vocab_size: int
  num_encoder_layers: int
  num_decoder_layers: int
  hidden: int
  num_heads: int
  mlp_dim: int
  max_len: int  # positions per pair (source or target, eos included)
  dropout: float = 0.1
  attention_dropout: float = 0.0
  pre_ln: bool = False
  positions: str = 'sinusoidal'
  dtype: str = 'float32'
  layer_norm_eps: float = 1e-5
  pad_id: int = 0
  bos_id: int = 2
  eos_id: int = 3

  @property
  def head_dim(self) -> int:
    return self.hidden // self.num_heads


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
  """[length, dim]: sin in the first half of the features, cos in the second (as Marian and
  fairseq; tensor2tensor's timing signal has the same layout)."""
  half = dim // 2
  # Frequencies 10000^(-2i/dim) as Marian (fairseq uses 10000^(-i/(half-1))).
  inv = 1.0 / np.power(10000.0, 2 * np.arange(half) / dim)
  angles = np.arange(length)[:, None] * inv[None, :]
  table = np.zeros((length, dim), np.float32)
  table[:, :half] = np.sin(angles)
  table[:, half:2 * half] = np.cos(angles)
  return table


def segment_mask(q_segments: jax.Array, k_segments: jax.Array,
                 causal: bool = False) -> jax.Array:
  """[b, 1, q, k] bool: query and key in the same non-padding segment (and key <= query)."""
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
  if causal:
    q, k = q_segments.shape[1], k_segments.shape[1]
    mask &= jnp.arange(q)[:, None] >= jnp.arange(k)[None, :]
  return mask[:, None]


class Attention(nn.Module):
  """Multi-head attention of `x` over `context` (itself for self-attention).

  With `decode=True` on a self-attention layer, keys and values are kept in the 'cache'
  collection: the first call (with the full target length) only allocates it; each later call
  takes one position, writes its key/value at `cache_index` and attends to positions <= it.
  """
  cfg: EncoderDecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None, train: bool,
               decode: bool = False) -> jax.Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]

    def heads(name, y):
      y = _dense(cfg.hidden, (EMBED, HEADS), dtype, name)(y)
      y = _constrain(y, BATCH, LENGTH, ACT_HEADS)
      return y.reshape(y.shape[0], y.shape[1], cfg.num_heads, cfg.head_dim)

    q, k, v = heads('query', x), heads('key', context), heads('value', context)
    if decode:
      initialized = self.has_variable('cache', 'cached_key')
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
      if initialized:
        if x.shape[1] != 1:
          raise ValueError(f'Incremental decoding takes one position per call, got {x.shape[1]}.')
        index = cache_index.value
        k = jax.lax.dynamic_update_slice(cached_key.value, k, (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_value.value, v, (0, index, 0, 0))
        cached_key.value, cached_value.value = k, v
        cache_index.value = index + 1
        mask = (jnp.arange(k.shape[1]) <= index)[None, None, None, :]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(cfg.head_dim).astype(jnp.float32)
    if mask is not None:
      # Finite, so a row with no allowed key (padding) gives a uniform average, not NaN.
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    probs = nn.Dropout(cfg.attention_dropout, deterministic=not train)(probs)
    y = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(x.shape[0], x.shape[1], cfg.hidden)
    y = _constrain(y, BATCH, LENGTH, ACT_HEADS)
    return _dense(cfg.hidden, (HEADS, EMBED), dtype, 'out')(y)


def _residual(cfg: EncoderDecoderConfig, block, x: jax.Array, norm: nn.LayerNorm,
              train: bool) -> jax.Array:
  """x + block, normalised after (post-LN) or with the block's input normalised (pre-LN)."""
  drop = nn.Dropout(cfg.dropout, deterministic=not train)
  dtype = DTYPES[cfg.dtype]
  if cfg.pre_ln:
    return x + drop(block(norm(x).astype(dtype)))
  return norm(x + drop(block(x))).astype(dtype)


class EncoderLayer(nn.Module):
  cfg: EncoderDecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.cfg
    attention = Attention(cfg, name='attention')
    mlp = Mlp(cfg, name='mlp')
    x = _residual(cfg, lambda h: attention(h, h, mask, train), x,
                  _layer_norm(cfg, 'attention_norm'), train)
    x = _residual(cfg, lambda h: mlp(h, train), x, _layer_norm(cfg, 'mlp_norm'), train)
    return _constrain(x, BATCH, LENGTH, ACT_EMBED)


class DecoderLayer(nn.Module):
  cfg: EncoderDecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, encoded: jax.Array, self_mask: jax.Array | None,
               cross_mask: jax.Array, train: bool, decode: bool) -> jax.Array:
    cfg = self.cfg
    attention = Attention(cfg, name='attention')
    cross = Attention(cfg, name='cross_attention')
    mlp = Mlp(cfg, name='mlp')
    x = _residual(cfg, lambda h: attention(h, h, self_mask, train, decode), x,
                  _layer_norm(cfg, 'attention_norm'), train)
    x = _residual(cfg, lambda h: cross(h, encoded, cross_mask, train), x,
                  _layer_norm(cfg, 'cross_attention_norm'), train)
    x = _residual(cfg, lambda h: mlp(h, train), x, _layer_norm(cfg, 'mlp_norm'), train)
    return _constrain(x, BATCH, LENGTH, ACT_EMBED)


class Positions(nn.Module):
  """Position vectors [b, l, hidden] for integer positions [b, l]."""
  cfg: EncoderDecoderConfig

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.positions == 'learned':
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (POSITION, EMBED))
      return nn.Embed(cfg.max_len, cfg.hidden, param_dtype=jnp.float32, embedding_init=init,
                      name='position')(positions)
    return jnp.asarray(sinusoidal_table(cfg.max_len, cfg.hidden))[positions]


def _default_positions(tokens: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def shift_right(targets: jax.Array, segmentation: jax.Array | None, bos_id: int) -> jax.Array:
  """Decoder inputs: targets moved one position right within each segment, bos first."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  first = jnp.ones_like(targets, bool).at[:, 1:].set(False)
  if segmentation is not None:
    first |= segmentation != jnp.pad(segmentation, ((0, 0), (1, 0)))[:, :-1]
  shifted = jnp.where(first, bos_id, shifted)
  if segmentation is not None:
    shifted = jnp.where(segmentation > 0, shifted, 0)
  return shifted


def _embed(cfg: EncoderDecoderConfig, embedding: nn.Embed, positions_module: Positions,
           tokens: jax.Array, positions: jax.Array, train: bool) -> jax.Array:
  x = embedding(tokens) * jnp.sqrt(cfg.hidden).astype(jnp.float32) + positions_module(positions)
  x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
  return _constrain(x.astype(DTYPES[cfg.dtype]), BATCH, LENGTH, ACT_EMBED)


class TransformerEncoder(nn.Module):
  cfg: EncoderDecoderConfig

  @nn.compact
  def __call__(self, embedding: nn.Embed, inputs: jax.Array, segments: jax.Array,
               positions: jax.Array, train: bool) -> jax.Array:
    cfg = self.cfg
    x = _embed(cfg, embedding, Positions(cfg, name='positions'), inputs, positions, train)
    mask = segment_mask(segments, segments)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f'layers_{i}')(x, mask, train)
    if cfg.pre_ln:
      x = _layer_norm(cfg, 'final_norm')(x).astype(DTYPES[cfg.dtype])
    return x


class TransformerDecoder(nn.Module):
  cfg: EncoderDecoderConfig

  @nn.compact
  def __call__(self, embedding: nn.Embed, encoded: jax.Array, source_segments: jax.Array,
               decoder_inputs: jax.Array, target_segments: jax.Array, positions: jax.Array,
               train: bool, decode: bool) -> jax.Array:
    cfg = self.cfg
    # While decoding incrementally the cache masks the positions not yet written.
    self_mask = None if decode else segment_mask(target_segments, target_segments, causal=True)
    cross_mask = segment_mask(target_segments, source_segments)
    y = _embed(cfg, embedding, Positions(cfg, name='positions'), decoder_inputs, positions,
               train)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, name=f'layers_{i}')(y, encoded, self_mask, cross_mask, train, decode)
    if cfg.pre_ln:
      y = _layer_norm(cfg, 'final_norm')(y)
    return y


class EncoderDecoder(nn.Module):
  """(inputs [b, ls], targets [b, lt]) -> next-token logits [b, lt, vocab] (fp32)."""
  cfg: EncoderDecoderConfig

  def setup(self):
    cfg = self.cfg
    if cfg.positions not in POSITION_KINDS:
      raise ValueError(f'model.positions={cfg.positions!r} is invalid; allowed: '
                       f'{", ".join(POSITION_KINDS)}.')
    init = nn.initializers.normal(cfg.hidden ** -0.5)  # unit variance after the sqrt scale
    self.shared_embedding = nn.Embed(
        cfg.vocab_size, cfg.hidden, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(init, (VOCAB, EMBED)))
    self.encoder = TransformerEncoder(cfg)
    self.decoder = TransformerDecoder(cfg)
    self.final_logits_bias = self.param(
        'final_logits_bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          (VOCAB,)), (cfg.vocab_size,))

  def _segments(self, tokens, segmentation):
    if segmentation is None:
      return (tokens != self.cfg.pad_id).astype(jnp.int32)
    return segmentation

  def encode(self, inputs: jax.Array, inputs_segmentation: jax.Array | None = None,
             inputs_position: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Encoder states [b, ls, hidden]."""
    positions = _default_positions(inputs) if inputs_position is None else inputs_position
    return self.encoder(self.shared_embedding, inputs,
                        self._segments(inputs, inputs_segmentation), positions, train)

  def decode(self, encoded: jax.Array, inputs: jax.Array, decoder_inputs: jax.Array,
             inputs_segmentation: jax.Array | None = None,
             targets_segmentation: jax.Array | None = None,
             targets_position: jax.Array | None = None, train: bool = False,
             decode: bool = False) -> jax.Array:
    """Logits [b, lt, vocab] for decoder inputs (already shifted right).

    decode=True: incremental decoding with the 'cache' collection; after a first call that
    allocates the cache (any [b, max_decode_len] inputs), `decoder_inputs` is one position
    [b, 1] and `targets_position` its index [b, 1] (rows are one pair each).
    """
    # Decoder inputs start with bos, so the decoder's padding is told by the targets'
    # segmentation; without one every position is real (padding is weighted out of the loss).
    target_segments = (jnp.ones_like(decoder_inputs, jnp.int32)
                       if targets_segmentation is None or decode else targets_segmentation)
    positions = (_default_positions(decoder_inputs) if targets_position is None
                 else targets_position)
    y = self.decoder(self.shared_embedding, encoded, self._segments(inputs, inputs_segmentation),
                     decoder_inputs, target_segments, positions, train, decode)
    logits = self.shared_embedding.attend(y.astype(jnp.float32)) + self.final_logits_bias
    return _constrain(logits, BATCH, LENGTH, VOCAB)

  def __call__(self, inputs: jax.Array, targets: jax.Array,
               inputs_segmentation: jax.Array | None = None,
               targets_segmentation: jax.Array | None = None,
               inputs_position: jax.Array | None = None,
               targets_position: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Teacher-forced logits: position t predicts targets[t] from targets[<t] of its pair."""
    encoded = self.encode(inputs, inputs_segmentation, inputs_position, train)
    decoder_inputs = shift_right(targets, targets_segmentation, self.cfg.bos_id)
    return self.decode(encoded, inputs, decoder_inputs, inputs_segmentation,
                       targets_segmentation, targets_position, train)


def encoder_decoder_config(model_config: Any, vocab_size: int, pad_id: int = 0,
                           bos_id: int = 2, eos_id: int = 3) -> EncoderDecoderConfig:
  """EncoderDecoderConfig from the `model` section of an ml_collections config."""
  fields = ({f.name for f in dataclasses.fields(EncoderDecoderConfig)}
            - {'vocab_size', 'pad_id', 'bos_id', 'eos_id'})
  return EncoderDecoderConfig(vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
                              eos_id=eos_id,
                              **{k: model_config[k] for k in fields if k in model_config})


def label_smoothed_sums(model: EncoderDecoder, label_smoothing: float = 0.1):
  """sums_fn(params, batch, rng, train) -> {'loss', 'weight', 'correct', 'tokens'} summed over
  target tokens != pad (the contract of train/steps.py).

  In training `loss` is the label-smoothed cross-entropy (mass `label_smoothing` spread
  uniformly over the vocabulary, as fairseq and flax's wmt example); in evaluation it is the
  plain cross-entropy, so eval_loss is a log-perplexity comparable across smoothing settings.
  """
  def sums(params, batch, rng, train):
    logits = model.apply(
        {'params': params}, batch['inputs'], batch['targets'],
        batch.get('inputs_segmentation'), batch.get('targets_segmentation'),
        batch.get('inputs_position'), batch.get('targets_position'), train=train,
        rngs={'dropout': rng})
    targets = batch['targets']
    weights = (targets != model.cfg.pad_id).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if train and label_smoothing > 0:
      loss = (1.0 - label_smoothing) * loss - label_smoothing * jnp.mean(log_probs, axis=-1)
    correct = jnp.argmax(logits, -1) == targets
    return {'loss': jnp.sum(loss * weights), 'weight': jnp.sum(weights),
            'correct': jnp.sum(correct * weights),
            'tokens': (jnp.sum(batch['inputs'] != model.cfg.pad_id)
                       + jnp.sum(weights)).astype(jnp.float32)}
  return sums
