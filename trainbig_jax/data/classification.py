"""Sentence and sentence-pair classification data for fine-tuning a pretrained encoder.

Examples are encoded RoBERTa style with the encoder's SentencePiece tokenizer (bos acts as
<s>/CLS, eos as </s>/SEP) and batched by grain over a TFDS array_record data source:

  single:  <s> A </s>              pair:  <s> A </s></s> B </s>

Batches are dicts: 'inputs' int32 [b, max_len], 'labels' int32 [b], 'weights' float32 [b]
(1 for real examples, 0 for padding rows that fill the last batch of a single pass).

Training reads one stream for the whole job (examples -> shuffle, reshuffled every epoch ->
repeat -> encode -> global batch) and each process keeps its block of rows
(global_batches.py: what that costs, and why); evaluation gives each process every
process_count-th example, since one pass sees each example once whatever the split.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Sequence

import grain
import numpy as np

from trainbig_jax.data import global_batches, sources, user_files
# Encoding uses pad_id, bos_id, eos_id and encode(text) (piece ids without specials).
from trainbig_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Where a classification task's data lives and how its examples are laid out."""

  dataset: str  # TFDS name, prepared as array_record (or an embedded corpus)
  text_keys: tuple[str, ...]  # one key: single sentence; two keys: sentence pair
  label_key: str
  num_classes: int
  train_split: str
  eval_splits: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    # Embedded, offline SST-2 stand-in (see data/rotten_tomatoes.py).
    'rotten_tomatoes': TaskSpec('trainbig_rotten_tomatoes', ('sentence',), 'label', 2,
                                'train', ('validation',)),
    'sst2': TaskSpec('glue/sst2', ('sentence',), 'label', 2, 'train', ('validation',)),
    # The paper's fine-tuning task (Li et al. 2020, Section 5).
    'mnli': TaskSpec('glue/mnli', ('premise', 'hypothesis'), 'label', 3, 'train',
                     ('validation_matched', 'validation_mismatched')),
}


# Text columns of a files: task, tried in order when its name has no `?text=` option.
FILES_TEXT_COLUMNS = (('premise', 'hypothesis'), ('sentence1', 'sentence2'),
                      ('question', 'sentence'), ('text_a', 'text_b'), ('text',), ('sentence',))


def get_task(task_name: str, data_dir: str | None = None) -> TaskSpec:
  """The spec of `task_name`; one clear error naming the allowed tasks otherwise.

  A `files:GLOB` task (CSV/TSV/JSON lines/Parquet with text and label columns) is prepared
  into `data_dir` on first use: its classes come from the prepared label column.
  """
  if user_files.is_user_files_name(task_name):
    return _files_task(task_name, data_dir)
  if task_name not in TASKS:
    raise ValueError(f'Unknown classification task {task_name!r}; allowed: '
                     f'{", ".join(sorted(TASKS))} or files:GLOB.')
  return TASKS[task_name]


def _files_task(name: str, data_dir: str | None) -> TaskSpec:
  spec = user_files.parse_name(name)
  features = sources.prepare(name, data_dir).info.features
  label = features[spec.label] if spec.label in features else None
  if label is None or not hasattr(label, 'num_classes'):
    raise ValueError(f'Task {name!r} has no label column {spec.label!r}; its columns: '
                     f'{", ".join(features)} (name another with ?label=COLUMN).')
  text_keys = user_files.text_columns_option(name) or next(
      (keys for keys in FILES_TEXT_COLUMNS if all(k in features for k in keys)), None)
  if text_keys is None or not all(k in features for k in text_keys) or len(text_keys) > 2:
    raise ValueError(f'Task {name!r} needs one or two text columns among '
                     f'{", ".join(k for k in features if k != spec.label)}; name them with '
                     '?text=COLUMN[,COLUMN].')
  return TaskSpec(name, tuple(text_keys), spec.label, label.num_classes, 'train',
                  ('validation',))


def _truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths after removing tokens one at a time from the longer segment (ties: from B).

  Closed form of HF's 'longest_first' loop, so long premises cost O(1) rather than O(len).
  """
  if len_a + len_b <= budget:
    return len_a, len_b
  half_a, half_b = (budget + 1) // 2, budget // 2
  if len_b <= half_b:
    return budget - len_b, len_b
  if len_a <= half_a:
    return len_a, budget - len_a
  return half_a, half_b


def _text_budget(num_segments: int, max_len: int) -> int:
  """Room left for text after the special tokens; errors on layouts that cannot fit."""
  if num_segments not in (1, 2):
    raise ValueError(f'An example has 1 or 2 text segments, got {num_segments}.')
  num_special = 2 if num_segments == 1 else 4
  # At least one real token per segment, else the example carries no text.
  if max_len < num_special + num_segments:
    raise ValueError(f'max_len={max_len} is too short for a {num_segments}-segment example; '
                     f'it must be at least {num_special + num_segments}.')
  return max_len - num_special


def encode_example(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
  """Token ids int32[max_len] of one example: `<s> A </s>` or `<s> A </s></s> B </s>`.

  Text that does not fit is cut from the end of the longer segment first, so a short
  hypothesis survives a long premise; the rest is filled with pad_id.
  """
  budget = _text_budget(len(texts), max_len)
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  pieces = [list(tokenizer.encode(t)) for t in texts]
  if len(pieces) == 1:
    ids = [bos] + pieces[0][:budget] + [eos]
  else:
    len_a, len_b = _truncate_pair(len(pieces[0]), len(pieces[1]), budget)
    ids = [bos] + pieces[0][:len_a] + [eos, eos] + pieces[1][:len_b] + [eos]
  out = np.full((max_len,), tokenizer.pad_id, dtype=np.int32)
  out[:len(ids)] = ids
  return out


def _as_text(value: Any) -> str:
  # TFDS Text features come back from array_record sources as bytes.
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _encode_record(record: dict[str, Any], *, tokenizer: Tokenizer, spec: TaskSpec,
                   max_len: int) -> dict[str, np.ndarray]:
  texts = tuple(_as_text(record[k]) for k in spec.text_keys)
  return {
      'inputs': encode_example(tokenizer, texts, max_len),
      'labels': np.int32(record[spec.label_key]),
      'weights': np.float32(1.0),
  }


def _padding_row(max_len: int, pad_id: int) -> dict[str, np.ndarray]:
  return {
      'inputs': np.full((max_len,), pad_id, dtype=np.int32),
      'labels': np.int32(0),
      'weights': np.float32(0.0),
  }


def classification_iterator(
    task_name: str,
    split: str,
    tokenizer: Tokenizer,
    max_len: int,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = False,
    repeat: bool = False,
    data_dir: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """A checkpointable iterator (get_state/set_state) of this process's batches of `split`.

  `batch_size` is per process. Training (repeat=True): endless, full batches, this process's
  rows [i*batch_size, (i+1)*batch_size) of global batches of batch_size * process_count rows
  read from the whole split, so the data and the state (the same on every process) do not
  depend on the process count; with shuffle=True every epoch is a different permutation,
  fixed by `seed`. Evaluation (repeat=False): process i reads examples i::process_count, one
  pass in which every example of its shard appears exactly once, the last batch filled with
  weight-0 rows; every process yields the same number of batches, so multi-host eval steps
  stay in lockstep.
  """
  spec = get_task(task_name, data_dir)
  if batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count}).')
  _text_budget(len(spec.text_keys), max_len)  # fail on a bad max_len before reading data

  source = sources.data_source(spec.dataset, split, data_dir)
  num_examples = len(source)
  ds = grain.MapDataset.source(source)
  if not repeat:
    ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f'Split {split!r} of {spec.dataset!r} has {num_examples} examples, too '
                     f'few to give each of {process_count} processes one.')
  if shuffle:
    ds = ds.shuffle(seed=seed)
  encode = functools.partial(_encode_record, tokenizer=tokenizer, spec=spec, max_len=max_len)
  if repeat:
    global_rows = batch_size * process_count
    ds = ds.repeat(None).map(encode).batch(global_rows, drop_remainder=True)
    return global_batches.take_process_block(
        ds.to_iter_dataset(read_options), process_index=process_index,
        process_count=process_count).__iter__()
  else:
    # Pad to the batch count of the largest shard so all processes take equally many steps.
    largest_shard = -(-num_examples // process_count)
    padded_len = -(-largest_shard // batch_size) * batch_size
    ds = ds.map(encode)
    if padded_len > len(ds):
      pad = _padding_row(max_len, tokenizer.pad_id)
      padding = grain.MapDataset.range(padded_len - len(ds)).map(lambda _: pad)
      ds = grain.MapDataset.concatenate([ds, padding])
    ds = ds.batch(batch_size, drop_remainder=False)
  return ds.to_iter_dataset(read_options).__iter__()


def label_counts(task_name: str, split: str, data_dir: str | None = None) -> dict[int, int]:
  """How many examples of `split` carry each label (unlabelled ones, label < 0, skipped)."""
  spec = get_task(task_name, data_dir)
  source = sources.data_source(spec.dataset, split, data_dir)
  counts: collections.Counter[int] = collections.Counter()
  chunk = 4096  # batched reads: array_record serves a list of keys much faster than one by one
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
      label = int(record[spec.label_key])
      if label >= 0:
        counts[label] += 1
  return dict(counts)


def majority_class_accuracy(task_name: str, split: str, data_dir: str | None = None) -> float:
  """Accuracy of always predicting the most frequent label of `split`: the floor to beat."""
  counts = label_counts(task_name, split, data_dir)
  if not counts:
    raise ValueError(f'Split {split!r} of task {task_name!r} has no labelled examples.')
  return max(counts.values()) / sum(counts.values())
