"""Masked-LM pretraining: config checks, then data + model + the shared train loop."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainbig_jax.data import mlm, sources
from trainbig_jax.data.tokenizer import Tokenizer, train_or_load_tokenizer
from trainbig_jax.models.encoder import ATTENTION, DTYPES, Encoder, encoder_config
from trainbig_jax.train import checkpoint, distributed, loop, partitioning
from trainbig_jax.train.state import make_optimizer
from trainbig_jax.train.steps import mlm_sums


class ConfigError(ValueError):
  """A config value is out of its allowed range."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def check_model_config(m: ml_collections.ConfigDict) -> None:
  for name in ('num_layers', 'hidden', 'num_heads', 'mlp_dim', 'max_len'):
    _require(isinstance(m[name], int) and m[name] > 0,
             f'model.{name}={m[name]!r} is invalid: it must be a positive integer.')
  _require(m.hidden % m.num_heads == 0,
           f'model.num_heads={m.num_heads} does not divide model.hidden={m.hidden}; '
           f'choose heads among the divisors of {m.hidden}.')
  _require(m.dtype in DTYPES, f'model.dtype={m.dtype!r} is invalid; allowed: {", ".join(DTYPES)}.')
  for name in ('dropout', 'attention_dropout'):
    _require(0.0 <= m[name] < 1.0, f'model.{name}={m[name]!r} is invalid: allowed [0, 1).')
  attention = m.get('attention', 'auto')
  _require(attention in ATTENTION,
           f'model.attention={attention!r} is invalid; allowed: {", ".join(ATTENTION)}.')


def check_train_config(c: ml_collections.ConfigDict, num_devices: int) -> None:
  t = c.train
  for name in ('batch_size', 'grad_accum_steps', 'total_steps', 'log_every', 'eval_every',
               'checkpoint_every', 'keep_checkpoints'):
    _require(isinstance(t[name], int) and t[name] > 0,
             f'train.{name}={t[name]!r} is invalid: it must be a positive integer.')
  _require(t.budget_s >= 0, f'train.budget_s={t.budget_s!r} is invalid: seconds >= 0 (0: none).')
  _require(t.learning_rate > 0, f'train.learning_rate={t.learning_rate!r} must be > 0.')
  _require(t.warmup_steps >= 0, f'train.warmup_steps={t.warmup_steps!r} must be >= 0.')
  mesh_shape = partitioning.resolve_mesh_shape(c.mesh.shape, num_devices)
  batch_shards = mesh_shape[0] * mesh_shape[1]
  micro = t.batch_size // t.grad_accum_steps
  _require(t.batch_size % t.grad_accum_steps == 0,
           f'train.batch_size={t.batch_size} is not divisible by '
           f'train.grad_accum_steps={t.grad_accum_steps}.')
  _require(micro % batch_shards == 0,
           f'train.batch_size={t.batch_size} gives micro-batches of {micro}, not divisible by '
           f'the {batch_shards} data x fsdp shards of mesh {mesh_shape}.')
  _require(t.batch_size % jax.process_count() == 0,
           f'train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} '
           f'processes.')


def check_pretrain_config(c: ml_collections.ConfigDict) -> None:
  check_model_config(c.model)
  d = c.data
  _require(isinstance(d.vocab_size, int) and d.vocab_size >= 16,
           f'data.vocab_size={d.vocab_size!r} is invalid: it must be an integer >= 16.')
  _require(isinstance(d.seq_len, int) and d.seq_len >= 4,
           f'data.seq_len={d.seq_len!r} is invalid: it must be an integer >= 4.')
  _require(d.seq_len <= c.model.max_len,
           f'data.seq_len={d.seq_len} exceeds model.max_len={c.model.max_len} positions.')
  _require(0.0 < d.mask_rate < 1.0, f'data.mask_rate={d.mask_rate!r} is invalid: allowed (0, 1).')
  _require(0.0 <= d.mask_token_prob and 0.0 <= d.random_token_prob
           and d.mask_token_prob + d.random_token_prob <= 1.0,
           f'data.mask_token_prob={d.mask_token_prob!r} and data.random_token_prob='
           f'{d.random_token_prob!r} must be >= 0 and sum to at most 1.')
  check_train_config(c, jax.device_count())


def build_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Encoder:
  """The one way to build the encoder of a run from its config and tokenizer."""
  return Encoder(encoder_config(config.model, vocab_size=tokenizer.vocab_size,
                                pad_id=tokenizer.pad_id))


def init_params_fn(model: Encoder, seq_len: int, task: str = 'mlm'):
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens, task=task)['params']
  return init


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> loop.Summary:
  """Trains (or resumes) an MLM run in `workdir`; returns where it stopped."""
  check_pretrain_config(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # Process 0 prepares the dataset and tokenizer; the others then open what it wrote.
  with distributed.primary_first('trainbig:pretrain_prepare'):
    checkpoint.write_config(workdir, config)
    sources.prepare(config.data.dataset, config.data.data_dir)
    tokenizer = train_or_load_tokenizer(config.data, str(workdir))
    tokenizer.copy_to(workdir)  # the tokenizer travels with every checkpoint
  model = build_model(config, tokenizer)
  index, count = jax.process_index(), jax.process_count()
  eval_batches = mlm.pretrain_eval_batches(config, tokenizer, process_index=index,
                                           process_count=count)
  job = loop.Job(
      config=config, workdir=workdir,
      sums_fn=mlm_sums(model, mlm.max_predictions(config.data.seq_len, config.data.mask_rate)),
      init_params=init_params_fn(model, config.data.seq_len),
      train_iterator=mlm.pretrain_train_iterator(config, tokenizer, process_index=index,
                                                 process_count=count),
      eval_batches=lambda: eval_batches, tx=make_optimizer(config.train))
  return loop.run(job)
