"""Masked-LM pretraining of the encoder (RoBERTa style); the task named 'mlm'."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from trainbig_jax import files
from trainbig_jax.data import checks, mlm, sources
from trainbig_jax.data.tokenizer import Tokenizer, train_or_load_tokenizer
from trainbig_jax.models.encoder import (ATTENTION, DTYPES, REMAT_POLICIES, Encoder,
                                         encoder_config)
from trainbig_jax.train import checkpoint, distributed, flops, loop
from trainbig_jax.train.checks import ConfigError, check_train_config, require
from trainbig_jax.train.state import make_optimizer
from trainbig_jax.train.steps import Batch, SumsFn

NAME = 'mlm'
PRIMARY_METRIC = 'eval_loss'
PRIMARY_MODE = 'min'


def check_model_config(m: ml_collections.ConfigDict) -> None:
  """The encoder's size and numerics (shared with classification, which reuses the encoder)."""
  for name in ('num_layers', 'hidden', 'num_heads', 'mlp_dim', 'max_len'):
    require(isinstance(m[name], int) and m[name] > 0,
            f'model.{name}={m[name]!r} is invalid: it must be a positive integer.')
  require(m.hidden % m.num_heads == 0,
          f'model.num_heads={m.num_heads} does not divide model.hidden={m.hidden}; '
          f'choose heads among the divisors of {m.hidden}.')
  require(m.dtype in DTYPES, f'model.dtype={m.dtype!r} is invalid; allowed: {", ".join(DTYPES)}.')
  remat = m.get('remat', 'none')
  require(remat in REMAT_POLICIES,
          f'model.remat={remat!r} is invalid; allowed: {", ".join(REMAT_POLICIES)}.')
  require(isinstance(m.get('scan_layers', False), bool),
          f'model.scan_layers={m.get("scan_layers")!r} is invalid: True or False.')
  for name in ('dropout', 'attention_dropout'):
    require(0.0 <= m[name] < 1.0, f'model.{name}={m[name]!r} is invalid: allowed [0, 1).')
  attention = m.get('attention', 'auto')
  require(attention in ATTENTION,
          f'model.attention={attention!r} is invalid; allowed: {", ".join(ATTENTION)}.')


def check_config(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """All checks of a pretraining config, for `num_devices` (default: this process's job)."""
  check_model_config(c.model)
  d = c.data
  require(isinstance(d.vocab_size, int) and d.vocab_size >= 16,
          f'data.vocab_size={d.vocab_size!r} is invalid: it must be an integer >= 16.')
  require(isinstance(d.seq_len, int) and d.seq_len >= 4,
          f'data.seq_len={d.seq_len!r} is invalid: it must be an integer >= 4.')
  require(d.seq_len <= c.model.max_len,
          f'data.seq_len={d.seq_len} exceeds model.max_len={c.model.max_len} positions.')
  require(0.0 < d.mask_rate < 1.0, f'data.mask_rate={d.mask_rate!r} is invalid: allowed (0, 1).')
  require(0.0 <= d.mask_token_prob and 0.0 <= d.random_token_prob
          and d.mask_token_prob + d.random_token_prob <= 1.0,
          f'data.mask_token_prob={d.mask_token_prob!r} and data.random_token_prob='
          f'{d.random_token_prob!r} must be >= 0 and sum to at most 1.')
  check_train_config(c, jax.device_count() if num_devices is None else num_devices)


def build_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Encoder:
  """The one way to build the encoder of a run from its config and tokenizer."""
  return Encoder(encoder_config(config.model, vocab_size=tokenizer.vocab_size,
                                pad_id=tokenizer.pad_id))


def encoder_init_fn(model: Encoder, seq_len: int, head: str = 'mlm') -> Callable[[Any], Any]:
  """rng -> boxed encoder params with the given head ('mlm' or 'classify')."""
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens, task=head)['params']
  return init


def init_params_fn(model: Encoder, config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  return encoder_init_fn(model, config.data.seq_len, 'mlm')


def mlm_sums(model: nn.Module, max_predictions: int | None = None) -> SumsFn:
  """Masked-LM cross-entropy and accuracy summed over the masked positions.

  With `max_predictions`, logits are computed only at (up to) that many masked positions per
  sequence, picked by top_k on the weights; the data pipeline masks an exact count per
  sequence, so a bound of ceil(mask_rate * length) loses nothing.
  """
  def sums(params, batch, rng, train):
    inputs, targets, weights = batch['inputs'], batch['targets'], batch['weights']
    positions = None
    if max_predictions is not None and max_predictions < inputs.shape[1]:
      positions = jax.lax.top_k(weights, max_predictions)[1]
      targets = jnp.take_along_axis(targets, positions, axis=1)
      weights = jnp.take_along_axis(weights, positions, axis=1)
    logits = model.apply({'params': params}, inputs, train=train, task='mlm',
                         positions=positions, rngs={'dropout': rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # The target has the largest logit: one max over the vocabulary, which the loss's
    # logsumexp also takes, instead of an argmax (a slow variadic reduce on XLA CPU).
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = target_logits >= jnp.max(logits, axis=-1)
    return {'loss': jnp.sum(loss * weights), 'weight': jnp.sum(weights),
            'correct': jnp.sum(correct * weights),
            'tokens': jnp.sum(inputs != model.cfg.pad_id).astype(jnp.float32)}
  return sums


def sums_fn(model: Encoder, config: ml_collections.ConfigDict) -> SumsFn:
  return mlm_sums(model, mlm.max_predictions(config.data.seq_len, config.data.mask_rate))


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 split: str | None = None) -> list[Batch]:
  """The fixed (pre-masked) validation batches, this process's share."""
  if split is not None and split != config.data.eval_split:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.eval_split = split
  return mlm.pretrain_eval_batches(config, tokenizer, process_index=jax.process_index(),
                                   process_count=jax.process_count())


def count_examples(batch: Batch) -> int:
  return int(batch['inputs'].shape[0])


def extra_metrics_fn(model: Encoder, config: ml_collections.ConfigDict,
                     tokenizer: Tokenizer) -> None:
  return None


def flops_per_step(model: Encoder, config: ml_collections.ConfigDict) -> float:
  """Analytic training FLOPs of one optimizer step (train/flops.analytic_flops): the whole
  batch's positions pass through the encoder, the masked ones through the MLM head."""
  params = nn.unbox(jax.eval_shape(init_params_fn(model, config), jax.random.key(0)))
  d, batch = config.data, config.train.batch_size
  return flops.analytic_flops(params, config.model.num_layers, config.model.hidden, d.seq_len,
                              batch * d.seq_len,
                              batch * mlm.max_predictions(d.seq_len, d.mask_rate))


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> loop.Summary:
  """Trains (or resumes) an MLM run in `workdir`; returns where it stopped."""
  check_config(config)
  config = ml_collections.ConfigDict(config.to_dict())
  config.task_kind = NAME
  workdir = Path(workdir)
  with files.removed_on_failure(workdir, remove=jax.process_index() == 0):
    # Process 0 prepares the dataset and tokenizer; the others then open what it wrote.
    with distributed.primary_first('trainbig:pretrain_prepare'):
      checkpoint.write_config(workdir, config)
      sources.prepare(config.data.dataset, config.data.data_dir)
      tokenizer = train_or_load_tokenizer(config.data, str(workdir))
      tokenizer.copy_to(workdir)  # the tokenizer travels with every checkpoint
    checks.check_pretrain_data(config, tokenizer, process_count=jax.process_count())
  model = build_model(config, tokenizer)
  index, count = jax.process_index(), jax.process_count()
  batches = eval_batches(config, tokenizer)
  job = loop.Job(
      config=config, workdir=workdir, sums_fn=sums_fn(model, config),
      init_params=init_params_fn(model, config),
      train_iterator=mlm.pretrain_train_iterator(config, tokenizer, process_index=index,
                                                 process_count=count),
      eval_batches=lambda: batches, tx=make_optimizer(config.train),
      flops_per_step=flops_per_step(model, config))
  return loop.run(job)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          init_checkpoint: str | os.PathLike | None = None) -> loop.Summary:
  if init_checkpoint is not None:
    raise ConfigError('masked-LM pretraining starts from scratch; it takes no '
                      '--init_checkpoint (fine-tuning does: trainbig finetune).')
  return pretrain(config, workdir)
