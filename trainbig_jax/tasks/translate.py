"""Translation with a transformer encoder-decoder; the task named 'translate'.

Training reads packed pairs (data/translation.py) and minimises label-smoothed cross-entropy.
Evaluation reports `eval_loss` (plain cross-entropy per target token) on the whole
validation split, and `eval_bleu` / `eval_chrf` (sacreBLEU, detokenized) from decoding the
first `data.eval_examples` validation pairs with the config's `decode` settings (beam size,
length penalty). The primary metric is eval_bleu, higher is better. For paired comparisons
(the sweep's intervals) the same decoding also gives each sentence's BLEU statistics
(per_example_metrics_fn).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sacrebleu.metrics import BLEU

from trainbig_jax import tasks
from trainbig_jax.data import translation
from trainbig_jax.data.tokenizer import Tokenizer
from trainbig_jax.models import decoding
from trainbig_jax.models.encoder import DTYPES
from trainbig_jax.models.encoder_decoder import (POSITION_KINDS, EncoderDecoder,
                                                 encoder_decoder_config, label_smoothed_sums)
from trainbig_jax.tasks import from_scratch
from trainbig_jax.train import loop, partitioning
from trainbig_jax.train.checks import ConfigError, check_train_config, require
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


def _eval_subset_decoder(model: EncoderDecoder, config: ml_collections.ConfigDict,
                         tokenizer: Tokenizer
                         ) -> Callable[[Any], tuple[list[str], list[str]]] | None:
  """params -> (hypotheses, references) of the first data.eval_examples validation pairs
  (a fixed subset, so evaluations compare and stay cheap); None when that number is 0."""
  limit = config.data.eval_examples
  if limit == 0:
    return None
  index, count = jax.process_index(), jax.process_count()
  batches = translation.translation_eval_batches(config, tokenizer, process_index=index,
                                                 process_count=count, limit=limit)
  references = [target for _, target in translation.translation_pairs(config, limit=limit)]
  compiled = {}

  def decode(params):
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
    return hypotheses, references
  return decode


def _scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
  scores = translation.corpus_scores(hypotheses, references)
  return {'eval_bleu': scores['bleu'], 'eval_chrf': scores['chrf']}


def extra_metrics_fn(model: EncoderDecoder, config: ml_collections.ConfigDict,
                     tokenizer: Tokenizer) -> Callable[[Any], dict[str, float]] | None:
  """params -> {'eval_bleu', 'eval_chrf'} (sacreBLEU, detokenized) from decoding the first
  data.eval_examples validation pairs."""
  decode = _eval_subset_decoder(model, config, tokenizer)
  if decode is None:
    return None
  return lambda params: _scores(*decode(params))


# The per-sentence BLEU statistics, in sacreBLEU's order of a segment's statistics: what its
# corpus BLEU sums over sentences before it computes the score.
BLEU_STATISTICS = ('hyp_len', 'ref_len', 'correct_1', 'correct_2', 'correct_3', 'correct_4',
                   'total_1', 'total_2', 'total_3', 'total_4')


def sentence_bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]
                             ) -> np.ndarray:
  """[sentences, 10] BLEU sufficient statistics (BLEU_STATISTICS) of each detokenized
  hypothesis against its one reference, from sacreBLEU's own sentence scoring (13a
  tokenization, as data/translation.corpus_scores): summed over any set of sentences they give that set's
  corpus BLEU (bleu_from_statistics), which is what a paired bootstrap resamples."""
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references; '
                     'scoring needs one reference per hypothesis.')
  # effective_order only changes sentence scores, not the statistics; it silences the
  # warning sacreBLEU gives for sentence-level BLEU without it.
  bleu = BLEU(effective_order=True)
  rows = []
  for hypothesis, reference in zip(hypotheses, references):
    s = bleu.sentence_score(hypothesis, [reference])
    rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
  return np.asarray(rows, np.float64).reshape(len(rows), len(BLEU_STATISTICS))


# sacreBLEU's corpus_bleu settings (smoothing, n-gram orders), read once: the bootstrap
# computes a score thousands of times.
_CORPUS_BLEU = BLEU()


def bleu_from_statistics(summed: Sequence[float]) -> float:
  """Corpus BLEU (sacreBLEU's corpus_bleu settings) from summed BLEU_STATISTICS."""
  defaults = _CORPUS_BLEU
  orders = defaults.max_ngram_order
  summed = np.rint(np.asarray(summed, np.float64)).astype(np.int64).tolist()  # counts
  return float(BLEU.compute_bleu(
      correct=summed[2:2 + orders], total=summed[2 + orders:], sys_len=summed[0],
      ref_len=summed[1], smooth_method=defaults.smooth_method,
      smooth_value=defaults.smooth_value, effective_order=defaults.effective_order,
      max_ngram_order=orders).score)


def per_example_metrics_fn(model: EncoderDecoder, config: ml_collections.ConfigDict,
                           tokenizer: Tokenizer
                           ) -> Callable[[Any], tuple[dict[str, float],
                                                      dict[str, np.ndarray]]] | None:
  """params -> (extra_metrics_fn's metrics, {'bleu': per-sentence BLEU statistics}) from one
  decoding of the same subset; eval_bleu (sacreBLEU's corpus score) is the corpus BLEU of
  the summed statistics."""
  decode = _eval_subset_decoder(model, config, tokenizer)
  if decode is None:
    return None

  def metrics(params):
    hypotheses, references = decode(params)
    return _scores(hypotheses, references), {
        'bleu': sentence_bleu_statistics(hypotheses, references)}
  return metrics


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          init_checkpoint: str | os.PathLike | None = None) -> loop.Summary:
  """Trains (or resumes) a translation run in `workdir`; returns where it stopped."""
  if init_checkpoint is not None:
    raise ConfigError('translation trains from scratch; it takes no --init_checkpoint.')
  return from_scratch.train(tasks.get_task(NAME), config, workdir,
                            translation.translation_train_iterator)
