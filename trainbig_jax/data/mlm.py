"""Masked-LM batches (RoBERTa recipe) as a checkpointable grain pipeline.

Train pipeline, the same for the whole job whatever its number of processes:

  documents -> shuffle(seed), reshuffled every epoch -> repeat -> tokenize (+ eos)
  -> pack into full-sentence windows -> global batch -> mask (seeded per batch number)
  -> this process's block of rows (global_batches.py: what that costs, and why)

Packing follows RoBERTa's FULL-SENTENCES input: documents are concatenated into one stream,
each followed by eos, the stream is cut into windows of seq_len - 2 tokens and each window
becomes `[bos] + window + [eos]`. A window may span documents; as in RoBERTa there is no
attention masking between them. Only a final partial window (finite splits) is padded.

Batches are dicts of numpy arrays: 'inputs' int32 [b, seq_len] (masked tokens), 'targets'
int32 [b, seq_len] (original tokens), 'weights' float32 [b, seq_len] (1.0 where the loss is
taken). Padding is `inputs == tokenizer.pad_id`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from trainbig_jax.data import global_batches, sources
from trainbig_jax.data.tokenizer import Tokenizer, as_text

# Eval masks use this seed regardless of config.seed, so runs of a sweep that differ in their
# seed are still scored on exactly the same masked positions.
EVAL_MASK_SEED = 12345
# Documents tokenized ahead of the packer; small, because one document already yields many
# windows and a restored iterator re-fills this buffer from scratch.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class DataPipelineError(ValueError):
  """The data config cannot produce MLM batches."""


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], mask_rate: float = 0.15,
                mask_token_prob: float = 0.8,
                random_token_prob: float = 0.1) -> dict[str, np.ndarray]:
  """RoBERTa masking of an int array of any shape.

  Each row (last axis) masks exactly int(mask_rate * n + u), u ~ U[0, 1), of its n tokens
  not in `special_ids` (which should include pad), chosen uniformly (as fairseq's RoBERTa
  does): the expected rate is exactly `mask_rate`, and a row never has more than
  floor(mask_rate * length) + 1 targets, which lets the model compute logits only there. A chosen position becomes `mask_id` with
  probability `mask_token_prob`, a uniformly random non-special token with probability
  `random_token_prob`, and stays unchanged otherwise. Returns 'inputs' (int32), 'targets'
  (the original tokens, int32) and 'weights' (float32, 1.0 at chosen positions).
  """
  if not 0.0 <= mask_rate <= 1.0:
    raise DataPipelineError(f'mask_rate={mask_rate} must be in [0, 1].')
  if (mask_token_prob < 0 or random_token_prob < 0
      or mask_token_prob + random_token_prob > 1.0 + 1e-9):
    raise DataPipelineError(
        f'mask_token_prob={mask_token_prob} and random_token_prob={random_token_prob} must be '
        'non-negative and sum to at most 1.')
  specials = np.unique(np.asarray(special_ids, dtype=np.int64))
  specials = specials[(specials >= 0) & (specials < vocab_size)]
  num_regular = vocab_size - len(specials)
  if num_regular <= 0:
    raise DataPipelineError(f'vocab_size={vocab_size} leaves no non-special tokens.')

  tokens = np.asarray(tokens, dtype=np.int32)
  chosen = _choose_exact_count(~np.isin(tokens, specials), mask_rate, rng)
  action = rng.random(tokens.shape)
  to_mask = chosen & (action < mask_token_prob)
  to_random = chosen & (action >= mask_token_prob) & (action < mask_token_prob
                                                      + random_token_prob)
  # A uniform index among the non-special ids, shifted past each special id (sorted) so that
  # it lands on the index-th non-special id.
  random_tokens = rng.integers(0, num_regular, size=tokens.shape, dtype=np.int64)
  for special in specials:
    random_tokens += random_tokens >= special

  inputs = np.where(to_mask, np.int32(mask_id), tokens)
  inputs = np.where(to_random, random_tokens.astype(np.int32), inputs)
  return {
      'inputs': inputs.astype(np.int32),
      'targets': tokens,
      'weights': chosen.astype(np.float32),
  }


def max_predictions(seq_len: int, mask_rate: float) -> int:
  """The most masked positions `mask_tokens` can choose in a row of seq_len tokens."""
  return min(seq_len, int(np.floor(mask_rate * seq_len)) + 1)


def _choose_exact_count(eligible: np.ndarray, rate: float, rng: np.random.Generator
                        ) -> np.ndarray:
  """Per row, a uniformly random subset of the eligible positions of randomly rounded size."""
  eligible = np.atleast_1d(eligible)
  count = np.floor(rate * eligible.sum(-1) + rng.random(eligible.shape[:-1])).astype(np.int64)
  scores = np.where(eligible, rng.random(eligible.shape), np.inf)
  rank = np.argsort(np.argsort(scores, axis=-1), axis=-1)
  return eligible & (rank < count[..., None])


class _PackedWindowsIterator(grain.DatasetIterator):
  """Cuts a stream of token arrays into `[bos] + window + [eos]` rows of seq_len tokens.

  Checkpoint: between two rows the only buffered data is the rest of the current document, so
  the state is the parent's state from just before that document was read plus the position
  in it. Restoring re-reads (and re-tokenizes) that one document.
  """

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, bos_id: int, eos_id: int,
               pad_id: int, max_consecutive_empty: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
    self._max_consecutive_empty = max_consecutive_empty
    self._doc_state = self._parent.get_state()
    self._doc: np.ndarray | None = None
    self._pos = 0

  def _next_document(self) -> bool:
    """Moves to the next non-empty document; False when the parent is exhausted."""
    for _ in range(self._max_consecutive_empty + 1):
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        self._doc, self._pos, self._doc_state = None, 0, state
        return False
      self._doc, self._pos, self._doc_state = doc, 0, state
      if len(doc):
        return True
    raise DataPipelineError(
        f'{self._max_consecutive_empty + 1} documents in a row tokenized to nothing; the '
        'dataset split has no text.')

  def __next__(self) -> np.ndarray:
    width = self._seq_len - 2
    pieces = []
    filled = 0
    while filled < width:
      if self._doc is None or self._pos >= len(self._doc):
        if not self._next_document():
          break
      take = min(width - filled, len(self._doc) - self._pos)
      pieces.append(self._doc[self._pos:self._pos + take])
      self._pos += take
      filled += take
    if not filled:
      raise StopIteration
    row = np.full(self._seq_len, self._pad_id, dtype=np.int32)
    row[0] = self._bos_id
    row[1:1 + filled] = np.concatenate(pieces)
    row[1 + filled] = self._eos_id
    return row

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._doc_state, 'position': self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._doc_state = state['parent']
    try:
      self._doc = next(self._parent)
    except StopIteration:
      self._doc = None
    self._pos = state['position']


class PackedWindowsIterDataset(grain.IterDataset):
  """grain IterDataset over 1-D token arrays -> int32 [seq_len] full-sentence rows."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, bos_id: int, eos_id: int,
               pad_id: int, max_consecutive_empty: int = 10_000):
    super().__init__(parent)
    if seq_len < 3:
      raise DataPipelineError(f'seq_len={seq_len} must be at least 3 (bos, a token, eos).')
    self._kwargs = dict(seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                        max_consecutive_empty=max_consecutive_empty)

  def __iter__(self) -> _PackedWindowsIterator:
    return _PackedWindowsIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return f'PackedWindowsIterDataset(seq_len={self._kwargs["seq_len"]})'


def _tokenize_document(example: dict[str, Any], *, tokenizer: Tokenizer,
                       text_key: str) -> np.ndarray:
  """int32 token ids of one document followed by eos; empty for a document without text."""
  text = as_text(example[text_key])
  if not text.strip():
    return np.zeros((0,), np.int32)
  ids = tokenizer.encode(text)
  ids.append(tokenizer.eos_id)
  return np.asarray(ids, dtype=np.int32)


def _mask_batch(rows: np.ndarray, rng: np.random.Generator, *, tokenizer: Tokenizer,
                data_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  return mask_tokens(rows, rng, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                     special_ids=tokenizer.special_ids, mask_rate=data_config.mask_rate,
                     mask_token_prob=data_config.mask_token_prob,
                     random_token_prob=data_config.random_token_prob)


def _documents(data_config: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
  source = sources.data_source(data_config.dataset, split, data_config.data_dir)
  if len(source) == 0:
    raise DataPipelineError(
        f'Split {split!r} of dataset {data_config.dataset!r} is empty; MLM needs documents.')
  example = source[0]
  if data_config.text_key not in example:
    raise DataPipelineError(
        f'data.text_key={data_config.text_key!r} is not a feature of {data_config.dataset!r}; '
        f'it has: {", ".join(sorted(example))}.')
  return grain.MapDataset.source(source)


def pretrain_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                            process_index: int = 0,
                            process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's masked training batches.

  All processes build the same global batches of config.train.batch_size rows from the train
  split, shuffled with `config.seed` (a new order every epoch) and masked with an RNG from
  (config.seed, batch number); process p keeps rows [p*B, (p+1)*B), B = batch_size //
  process_count. A run is reproducible, its data does not depend on the process count, and
  the state (`get_state()`, JSON-serializable, the same on every process) restores with
  `set_state` to the same next batches on any process count.
  """
  data = config.data
  global_batches.rows_per_process(config.train.batch_size, process_count, process_index)
  if not 0 <= config.seed < 2**32:
    raise DataPipelineError(f'seed={config.seed} must be in [0, 2**32).')
  docs = _documents(data, data.train_split)
  num_docs = len(docs)
  # ShuffleMapDataset reseeds with seed + epoch for each pass of the repeat.
  docs = docs.shuffle(seed=config.seed).repeat(None)
  tokens = docs.map(functools.partial(_tokenize_document, tokenizer=tokenizer,
                                      text_key=data.text_key))
  rows = PackedWindowsIterDataset(
      tokens.to_iter_dataset(_READ_OPTIONS), seq_len=data.seq_len, bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      max_consecutive_empty=num_docs)  # a whole epoch without text: the split has none
  # random_map draws batch i's RNG from (mask_seed, i). The seed is the one the first
  # process used when each process read its own documents, so single-process runs (and
  # their checkpoints) see the same batches as then.
  mask_seed = int(np.random.SeedSequence([config.seed, 0]).generate_state(1)[0])
  batches = rows.batch(config.train.batch_size, drop_remainder=True).random_map(
      functools.partial(_mask_batch, tokenizer=tokenizer, data_config=data), seed=mask_seed)
  batches = global_batches.take_process_block(batches, process_index=process_index,
                                              process_count=process_count)
  if data.worker_count > 0:
    # grain's worker start reads its absl flags; outside an absl app (notebooks, tests) they
    # are unparsed and reading them raises, so accept their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return iter(batches)


def pretrain_eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                          process_index: int = 0,
                          process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The fixed evaluation set: this process's rows of up to `data.num_eval_batches` batches.

  Every process builds the same global batches (eval split in source order, masked with
  EVAL_MASK_SEED) and keeps its own block of batch_size // process_count rows, so all processes
  run the same number of eval steps and the global eval set does not depend on the process
  count. A split too small for num_eval_batches gives as many full batches as it has, and at
  least one, whose missing rows are padding with weight 0.
  """
  data = config.data
  global_batch = config.train.batch_size
  global_batches.rows_per_process(global_batch, process_count, process_index)
  if data.num_eval_batches <= 0:
    raise DataPipelineError(f'data.num_eval_batches={data.num_eval_batches} must be positive.')
  docs = _documents(data, data.eval_split)
  tokens = docs.map(functools.partial(_tokenize_document, tokenizer=tokenizer,
                                      text_key=data.text_key))
  rows_ds = PackedWindowsIterDataset(
      tokens.to_iter_dataset(_READ_OPTIONS), seq_len=data.seq_len, bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_consecutive_empty=len(docs))
  wanted = data.num_eval_batches * global_batch
  rows = []
  for row in rows_ds:
    rows.append(row)
    if len(rows) == wanted:
      break
  if not rows:
    raise DataPipelineError(
        f'Split {data.eval_split!r} of {data.dataset!r} has no text to evaluate on.')
  num_batches = max(1, len(rows) // global_batch)
  rows = rows[:num_batches * global_batch]
  pad_row = np.full(data.seq_len, tokenizer.pad_id, np.int32)
  rows += [pad_row] * (num_batches * global_batch - len(rows))
  all_rows = np.stack(rows).reshape(num_batches, global_batch, data.seq_len)

  batches = []
  for i in range(num_batches):
    rng = np.random.default_rng([EVAL_MASK_SEED, i])
    batch = _mask_batch(all_rows[i], rng, tokenizer=tokenizer, data_config=data)
    batches.append(global_batches.process_block(batch, process_index=process_index,
                                                process_count=process_count))
  return batches
