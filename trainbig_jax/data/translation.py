"""Translation batches (packed for training, fixed-shape for evaluation) and BLEU/chrF scoring.

A translation dataset is any TFDS dataset with one text feature per language, named by the
language code: the embedded `trainbig_libreoffice_enfr` (data/libreoffice_help.py) and TFDS's
`wmt14_translate/fr-en` (features 'en', 'fr') go through the same code; `data.source_lang` and
`data.target_lang` pick the direction.

Encoding: source = encode(source_text)[:max_source_len - 1] + [eos], target likewise with
max_target_len. Truncation keeps eos, so a truncated pair still teaches the model to stop.

Train pipeline, the same for the whole job whatever its number of processes:

  pairs -> shuffle(shuffle_seed), reshuffled every epoch -> repeat -> encode
  -> first-fit packing into batch_size rows of pack_len -> global batch
  -> this process's block of rows (global_batches.py: what that costs, and why)

Packing is grain's FirstFitPackIterDataset with one packing bin per batch row: pairs are
placed, in order, in the first row where both their source and their target still fit, and a
round of rows is emitted as soon as a pair fits in none. `pack_len` must be at least
max_source_len and max_target_len, so a pair is never split across rows. Segment ids number
the pairs of a row from 1 (0 is padding) and positions restart at 0 for every pair.

Eval batches are unpacked (one pair per row) with fixed shapes, so decoding compiles once.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
import sacrebleu

from trainbig_jax.data import global_batches, sources
from trainbig_jax.data.mlm import DataPipelineError
from trainbig_jax.data.tokenizer import Tokenizer, as_text

# Pairs are short (tens of tokens), so a small prefetch keeps up with a training step.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
# grain's names for the packing arrays -> the contract's (flax wmt's) names.
_PACKED_NAMES = {
    'inputs': 'inputs', 'inputs_segment_ids': 'inputs_segmentation',
    'inputs_positions': 'inputs_position', 'targets': 'targets',
    'targets_segment_ids': 'targets_segmentation', 'targets_positions': 'targets_position',
}


def translation_data_config() -> ml_collections.ConfigDict:
  """The `data` section of a translation run, with defaults for the embedded corpus."""
  c = ml_collections.ConfigDict()
  # 'trainbig_libreoffice_enfr' is built offline from Debian's LibreOffice help packages;
  # 'wmt14_translate/fr-en' (after `trainbig prepare --dataset=wmt14_translate/fr-en`) or any
  # dataset with one text feature per language goes through the same code.
  c.dataset = 'trainbig_libreoffice_enfr'
  c.data_dir = ml_collections.config_dict.placeholder(str)  # default: $TRAINBIG_DATA_DIR or ~/.cache/trainbig_jax/tfds
  c.source_lang = 'en'
  c.target_lang = 'fr'
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.vocab_size = 32000  # one SentencePiece vocabulary for both languages
  c.tokenizer_path = ml_collections.config_dict.placeholder(str)  # None: train one on the train split
  c.tokenizer_max_chars = 50_000_000  # text of both languages fed to SentencePiece training
  c.max_source_len = 256  # tokens per source, eos included; longer ones are truncated
  c.max_target_len = 256  # tokens per target, eos included; also the decoding length
  c.pack_len = 256  # tokens per packed training row (source and target rows alike)
  c.shuffle_seed = 0
  c.eval_examples = 1000  # validation pairs decoded for BLEU during training (loss: all)
  return c


def check_translation_data_config(data: ml_collections.ConfigDict) -> None:
  """One clear error for a translation data config that cannot produce batches."""
  if data.source_lang == data.target_lang:
    raise DataPipelineError(f'data.source_lang and data.target_lang are both '
                            f'{data.source_lang!r}; a translation needs two languages.')
  for name in ('max_source_len', 'max_target_len'):
    if data[name] < 2:
      raise DataPipelineError(f'data.{name}={data[name]} must be at least 2 (a token and eos).')
  longest = max(data.max_source_len, data.max_target_len)
  if data.pack_len < longest:
    raise DataPipelineError(
        f'data.pack_len={data.pack_len} must be at least max(data.max_source_len, '
        f'data.max_target_len)={longest}, so that a pair always fits in one packed row.')
  if data.eval_examples < 0:
    raise DataPipelineError(f'data.eval_examples={data.eval_examples} must be >= 0.')


def _pair_source(data: ml_collections.ConfigDict, split: str):
  """The data source of one split, checked to carry both language features."""
  source = sources.data_source(data.dataset, split, data.data_dir)
  if len(source) == 0:
    raise DataPipelineError(f'Split {split!r} of dataset {data.dataset!r} is empty.')
  example = source[0]
  for name in ('source_lang', 'target_lang'):
    if data[name] not in example:
      raise DataPipelineError(
          f'data.{name}={data[name]!r} is not a feature of {data.dataset!r}; it has: '
          f'{", ".join(sorted(example))}.')
  return source


def encode_text(tokenizer: Tokenizer, text: str, max_len: int) -> np.ndarray:
  """int32 ids of `text` followed by eos, at most `max_len` of them (eos kept)."""
  ids = tokenizer.encode(text)[:max_len - 1]
  ids.append(tokenizer.eos_id)
  return np.asarray(ids, dtype=np.int32)


def _encode_pair(example: dict[str, Any], *, tokenizer: Tokenizer,
                 data: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  return {
      'inputs': encode_text(tokenizer, as_text(example[data.source_lang]), data.max_source_len),
      'targets': encode_text(tokenizer, as_text(example[data.target_lang]),
                             data.max_target_len),
  }


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {_PACKED_NAMES[k]: np.asarray(v, np.int32) for k, v in row.items()}


def translation_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                               process_index: int = 0,
                               process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's packed training batches.

  All processes pack the same global batches of config.train.batch_size rows from the train
  split, shuffled with `data.shuffle_seed` (a new order every epoch); process p keeps rows
  [p*B, (p+1)*B), B = batch_size // process_count. Batches: 'inputs', 'inputs_segmentation',
  'inputs_position', 'targets', 'targets_segmentation', 'targets_position', int32
  [B, pack_len]; segment k of 'inputs' and of 'targets' are the same pair. The state
  (`get_state()`, JSON-serializable, the same on every process) restores with `set_state` to
  the same next batches on any process count.
  """
  data = config.data
  check_translation_data_config(data)
  global_rows = config.train.batch_size
  global_batches.rows_per_process(global_rows, process_count, process_index)
  source = _pair_source(data, data.train_split)
  # ShuffleMapDataset reseeds with seed + epoch for each pass of the repeat.
  pairs = grain.MapDataset.source(source).shuffle(seed=data.shuffle_seed).repeat(None)
  encoded = pairs.map(functools.partial(_encode_pair, tokenizer=tokenizer, data=data))
  packed = grain.experimental.FirstFitPackIterDataset(
      encoded.to_iter_dataset(_READ_OPTIONS),
      length_struct={'inputs': data.pack_len, 'targets': data.pack_len},
      num_packing_bins=global_rows, seed=data.shuffle_seed, shuffle_bins=True)
  batches = packed.map(_rename_packed).batch(global_rows, drop_remainder=True)
  return iter(global_batches.take_process_block(batches, process_index=process_index,
                                                process_count=process_count))


def translation_pairs(config: ml_collections.ConfigDict, split: str | None = None,
                      limit: int | None = None) -> list[tuple[str, str]]:
  """(source_text, target_text) of the first `limit` pairs of `split` (default: the eval
  split), in split order: index i is the pair eval batches mark with example_index i."""
  data = config.data
  if limit is not None and limit < 0:
    raise DataPipelineError(f'limit={limit} must be >= 0 (or None for the whole split).')
  source = _pair_source(data, split or data.eval_split)
  count = len(source) if limit is None else min(limit, len(source))
  # One batched read: array_record serves a list of keys much faster than one by one.
  records = source.__getitems__(range(count)) if count else []
  return [(as_text(r[data.source_lang]), as_text(r[data.target_lang])) for r in records]


def translation_eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                             process_index: int = 0, process_count: int = 1,
                             split: str | None = None,
                             limit: int | None = None) -> list[dict[str, np.ndarray]]:
  """This process's share of the unpacked evaluation batches of `split` (default: eval split).

  The first `limit` pairs (all if None) in split order make global batches of
  config.train.batch_size rows; process p keeps rows [p * b, (p + 1) * b) of each, b =
  batch_size // process_count, so every process runs the same number of batches. Batches:
  'inputs' int32 [b, max_source_len], 'targets' int32 [b, max_target_len] (pad-filled), and
  'example_index' int32 [b], the pair's index in the split, -1 for the all-pad rows that fill
  the last batch.
  """
  data = config.data
  check_translation_data_config(data)
  global_rows = config.train.batch_size
  rows = global_batches.rows_per_process(global_rows, process_count, process_index)
  split = split or data.eval_split
  pairs = translation_pairs(config, split, limit)
  if not pairs:
    raise DataPipelineError(f'limit={limit} leaves no pairs of split {split!r} to evaluate.')
  num_batches = -(-len(pairs) // global_rows)
  batches = []
  for batch in range(num_batches):
    start = batch * global_rows + process_index * rows
    indices = np.arange(start, start + rows)
    inputs = np.full((rows, data.max_source_len), tokenizer.pad_id, np.int32)
    targets = np.full((rows, data.max_target_len), tokenizer.pad_id, np.int32)
    for row, index in enumerate(indices[indices < len(pairs)]):
      source_ids = encode_text(tokenizer, pairs[index][0], data.max_source_len)
      target_ids = encode_text(tokenizer, pairs[index][1], data.max_target_len)
      inputs[row, :len(source_ids)] = source_ids
      targets[row, :len(target_ids)] = target_ids
    batches.append({
        'inputs': inputs,
        'targets': targets,
        'example_index': np.where(indices < len(pairs), indices, -1).astype(np.int32),
    })
  return batches


def detokenize(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  """Text of generated ids: everything before the first eos, pad and bos dropped."""
  ids = [int(i) for i in ids]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode([i for i in ids if i not in (tokenizer.pad_id, tokenizer.bos_id)])


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """sacreBLEU corpus BLEU (13a tokenization) and chrF of detokenized text, one reference per
  hypothesis: {'bleu': 0-100, 'chrf': 0-100}."""
  hypotheses, references = list(hypotheses), list(references)
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references; '
                     'scoring needs one reference per hypothesis.')
  if not hypotheses:
    raise ValueError('No hypotheses to score.')
  return {
      'bleu': float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
      'chrf': float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
  }


def copy_source_scores(config: ml_collections.ConfigDict, split: str | None = None,
                       limit: int | None = None) -> dict[str, float]:
  """corpus_scores of "translating" by copying the source unchanged: the floor a model must
  beat. Not negligible between related languages in software documentation, where menu
  names, numbers and code pass through (BLEU 6.0 on the embedded validation split)."""
  pairs = translation_pairs(config, split, limit)
  if not pairs:
    raise DataPipelineError(f'limit={limit} leaves no pairs to score.')
  return corpus_scores([source for source, _ in pairs], [target for _, target in pairs])
