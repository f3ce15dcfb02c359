"""Translation with a transformer encoder-decoder; the task named 'translate'.

Training reads packed pairs (data/translation.py) and minimises label-smoothed cross-entropy.
Evaluation reports `eval_loss` (plain cross-entropy per target token) on the whole
validation split, and `eval_bleu` / `eval_chrf` (sacreBLEU, detokenized) from decoding the
first `data.eval_examples` validation pairs with the config's `decode` settings (beam size,
length penalty). The primary metric is eval_bleu, higher is better.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trainbig_jax import files
from trainbig_jax.data import sources, translation
from trainbig_jax.data.tokenizer import Tokenizer, train_or_load_tokenizer
from trainbig_jax.models import decoding
from trainbig_jax.models.encoder import DTYPES
from trainbig_jax.models.encoder_decoder import (POSITION_KINDS, EncoderDecoder,
                                                 encoder_decoder_config, label_smoothed_sums)
from trainbig_jax.train import checkpoint, distributed, loop, partitioning
from trainbig_jax.train.checks import ConfigError, check_train_config, require
from trainbig_jax.train.state import make_optimizer
from trainbig_jax.train.steps import Batch, SumsFn

NAME = 'translate'
PRIMARY_METRIC = 'eval_bleu'
PRIMARY_MODE = 'max'


def check_model_config(m: ml_collections.ConfigDict) -> None:
  for name in ('num_encoder_layers', 'num_decoder_layers', 'hidden', 'num_heads', 'mlp_dim',
               'max_len'):
    require(isinstance(m[name], int) and m[name] > 0,
            f'model.{name}={m[name]!r} is invalid: it must be a positive integer.')
  require(m.hidden % m.num_heads == 0,
          f'model.num_heads={m.num_heads} does not divide model.hidden={m.hidden}; '
          f'choose heads among the divisors of {m.hidden}.')
  require(m.hidden % 2 == 0 or m.positions != 'sinusoidal',
          f'model.hidden={m.hidden} must be even for sinusoidal positions.')
  require(m.dtype in DTYPES, f'model.dtype={m.dtype!r} is invalid; allowed: {", ".join(DTYPES)}.')
  require(m.positions in POSITION_KINDS, f'model.positions={m.positions!r} is invalid; '
          f'allowed: {", ".join(POSITION_KINDS)}.')
  for name in ('dropout', 'attention_dropout', 'label_smoothing'):
    require(0.0 <= m[name] < 1.0, f'model.{name}={m[name]!r} is invalid: allowed [0, 1).')


def check_config(config: ml_collections.ConfigDict) -> None:
  check_model_config(config.model)
  d, m, dec = config.data, config.model, config.decode
  require(isinstance(d.vocab_size, int) and d.vocab_size >= 16,
          f'data.vocab_size={d.vocab_size!r} is invalid: it must be an integer >= 16.')
  translation.check_translation_data_config(d)
  for name in ('max_source_len', 'max_target_len'):
    require(d[name] <= m.max_len,
            f'data.{name}={d[name]} exceeds model.max_len={m.max_len} positions.')
  require(isinstance(dec.beam_size, int) and dec.beam_size >= 1,
          f'decode.beam_size={dec.beam_size!r} is invalid: it must be a positive integer.')
  require(dec.length_penalty in decoding.LENGTH_PENALTIES,
          f'decode.length_penalty={dec.length_penalty!r} is invalid; allowed: '
          f'{", ".join(decoding.LENGTH_PENALTIES)}.')
  require(dec.alpha >= 0, f'decode.alpha={dec.alpha!r} is invalid: it must be >= 0.')
  check_train_config(config, jax.device_count())


def build_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> EncoderDecoder:
  """The one way to build the translation model of a run from its config and tokenizer."""
  return EncoderDecoder(encoder_decoder_config(
      config.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
      bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))


def init_params_fn(model: EncoderDecoder,
                   config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  def init(rng):
    inputs = jnp.zeros((1, config.data.max_source_len), jnp.int32)
    targets = jnp.zeros((1, config.data.max_target_len), jnp.int32)
    return model.init(rng, inputs, targets)['params']
  return init


def sums_fn(model: EncoderDecoder, config: ml_collections.ConfigDict) -> SumsFn:
  return label_smoothed_sums(model, config.model.label_smoothing)


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 split: str | None = None) -> list[Batch]:
  """The whole validation split (the config's, or `split`), this process's share."""
  return translation.translation_eval_batches(
      config, tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), split=split)


def count_examples(batch: Batch) -> int:
  return int(np.sum(batch['example_index'] >= 0))


def translator(model: EncoderDecoder, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, shardings: Any
               ) -> Callable[[Any, Batch], np.ndarray]:
  """(sharded params, this process's batch with 'inputs') -> all processes' output token
  rows, in global batch order, on every process. Compiled once per batch shape."""
  d = config.decode
  decode = decoding.make_decode_fn(model, config.data.max_target_len, d.beam_size, d.alpha,
                                   d.length_penalty)
  step = jax.jit(lambda params, inputs: decode(params, inputs),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))

  def translate(params, batch):
    inputs = partitioning.global_batch({'inputs': batch['inputs']}, mesh)['inputs']
    return np.asarray(jax.device_get(step(params, inputs)))
  return translate


def _params_mesh(params: Any) -> tuple[jax.sharding.Mesh, Any]:
  """The mesh sharded params live on, and their shardings."""
  shardings = jax.tree.map(lambda x: x.sharding, params)
  return jax.tree.leaves(shardings)[0].mesh, shardings


def extra_metrics_fn(model: EncoderDecoder, config: ml_collections.ConfigDict,
                     tokenizer: Tokenizer) -> Callable[[Any], dict[str, float]] | None:
  """params -> {'eval_bleu', 'eval_chrf'} from decoding the first data.eval_examples
  validation pairs (a fixed subset, so evaluations compare and stay cheap)."""
  limit = config.data.eval_examples
  if limit == 0:
    return None
  index, count = jax.process_index(), jax.process_count()
  batches = translation.translation_eval_batches(config, tokenizer, process_index=index,
                                                 process_count=count, limit=limit)
  references = [target for _, target in translation.translation_pairs(config, limit=limit)]
  compiled = {}

  def metrics(params):
    mesh, shardings = _params_mesh(params)
    if mesh not in compiled:
      compiled.clear()
      compiled[mesh] = translator(model, config, mesh, shardings)
    hypotheses = [''] * len(references)
    global_rows = config.train.batch_size
    for number, batch in enumerate(batches):
      rows = compiled[mesh](params, batch)
      for row, example in enumerate(range(number * global_rows, (number + 1) * global_rows)):
        if example < len(references):
          hypotheses[example] = translation.detokenize(tokenizer, rows[row])
    scores = translation.corpus_scores(hypotheses, references)
    return {'eval_bleu': scores['bleu'], 'eval_chrf': scores['chrf']}
  return metrics


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          init_checkpoint: str | os.PathLike | None = None) -> loop.Summary:
  """Trains (or resumes) a translation run in `workdir`; returns where it stopped."""
  if init_checkpoint is not None:
    raise ConfigError('translation trains from scratch; it takes no --init_checkpoint.')
  check_config(config)
  config = ml_collections.ConfigDict(config.to_dict())
  config.task_kind = NAME
  workdir = Path(workdir)
  # Process 0 prepares the dataset and the shared tokenizer; the others then open them.
  with files.removed_on_failure(workdir, remove=jax.process_index() == 0), \
       distributed.primary_first('trainbig:translate_prepare'):
    checkpoint.write_config(workdir, config)
    sources.prepare(config.data.dataset, config.data.data_dir)
    tokenizer = train_or_load_tokenizer(config.data, str(workdir))
    tokenizer.copy_to(workdir)  # the tokenizer travels with every checkpoint
  model = build_model(config, tokenizer)
  index, count = jax.process_index(), jax.process_count()
  batches = eval_batches(config, tokenizer)
  job = loop.Job(
      config=config, workdir=workdir, sums_fn=sums_fn(model, config),
      init_params=init_params_fn(model, config),
      train_iterator=translation.translation_train_iterator(config, tokenizer,
                                                            process_index=index,
                                                            process_count=count),
      eval_batches=lambda: batches, tx=make_optimizer(config.train),
      extra_metrics=extra_metrics_fn(model, config, tokenizer))
  return loop.run(job)
