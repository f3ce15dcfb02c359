"""Checks of a run's data before its first step, so a data problem ends the run in seconds.

For each split the run reads: the split exists, it holds enough examples for one global
batch (and at least one per process), the text fields are present and not all empty in a
sample of examples, and the tokenizer covers the text (its unknown-token rate over the sample
is logged, with a warning above UNK_RATE_WARNING).
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import logging
import ml_collections

from trainbig_jax.data import sources
from trainbig_jax.data.tokenizer import Tokenizer, as_text

SAMPLE_EXAMPLES = 64  # examples read per split, evenly spread
SAMPLE_CHARS = 2000  # characters of each sampled text that are tokenized: the check stays ~0.1 s
UNK_RATE_WARNING = 0.01


class DataCheckError(ValueError):
  """The run's data cannot feed it; found before training starts."""


def _sample(source, count: int) -> list[dict[str, Any]]:
  n = len(source)
  k = min(n, count)
  indices = [i * n // k for i in range(k)]
  return list(source.__getitems__(indices)) if hasattr(source, '__getitems__') else [
      source[i] for i in indices]


def check_split(dataset: str, split: str, data_dir: str | None, text_keys: Sequence[str],
                tokenizer: Tokenizer, *, min_examples: int, what: str) -> dict[str, float]:
  """Checks one split (see the module docstring); returns its size and unknown-token rate."""
  source = sources.data_source(dataset, split, data_dir)  # a missing split is an error here
  n = len(source)
  if n < min_examples:
    raise DataCheckError(f'Split {split!r} of {dataset!r} has {n} examples; {what} needs at '
                         f'least {min_examples}.')
  sample = _sample(source, SAMPLE_EXAMPLES)
  tokens = unknown = nonempty = chars = tokenized_chars = 0
  for key in text_keys:
    if key not in sample[0]:
      raise DataCheckError(f'Dataset {dataset!r} has no text field {key!r}; it has: '
                           f'{", ".join(sorted(sample[0]))}.')
  for example in sample:
    for key in text_keys:
      text = as_text(example[key])
      chars += len(text)
      if text.strip():
        nonempty += 1
        ids = tokenizer.encode(text[:SAMPLE_CHARS])
        tokenized_chars += len(text[:SAMPLE_CHARS])
        tokens += len(ids)
        unknown += sum(1 for i in ids if i == tokenizer.unk_id)
  if not nonempty:
    raise DataCheckError(f'Text field {", ".join(map(repr, text_keys))} of split {split!r} of '
                         f'{dataset!r} is empty in all {len(sample)} examples read.')
  unk_rate = unknown / max(tokens, 1)
  logging.info('data check: %s split %r: %d examples, unknown-token rate %.3f%% (%d sampled '
               'examples)', dataset, split, n, 100 * unk_rate, len(sample))
  if unk_rate > UNK_RATE_WARNING:
    logging.warning('data check: the tokenizer maps %.1f%% of the tokens of %s split %r to '
                    '<unk> (above %.0f%%): it was trained on other text; train one on this data '
                    '(leave data.tokenizer_path unset, new workdir).', 100 * unk_rate, dataset,
                    split, 100 * UNK_RATE_WARNING)
  # Tokens of the whole split, estimated from the sample's characters per token.
  est_tokens = n * chars / len(sample) * tokens / max(tokenized_chars, 1)
  return {'examples': n, 'unk_rate': unk_rate, 'tokens': est_tokens}


def check_pretrain_data(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                        process_count: int) -> None:
  """Pretraining: train and eval splits of data.dataset, each at least one example per
  process and (train) enough text for one global batch of full windows."""
  d = config.data
  stats = [check_split(d.dataset, split, d.data_dir, (d.text_key,), tokenizer,
                       min_examples=process_count, what=f'reading by {process_count} processes')
           for split in (d.train_split, d.eval_split)]
  needed = config.train.batch_size * (d.seq_len - 2)
  if stats[0]['tokens'] < needed:
    raise DataCheckError(
        f'Split {d.train_split!r} of {d.dataset!r} has about {int(stats[0]["tokens"])} tokens, '
        f'fewer than one global batch of {config.train.batch_size} x {d.seq_len - 2}.')


def check_classification_data(task, data_dir: str | None, tokenizer: Tokenizer, *,
                              global_batch: int, process_count: int) -> None:
  """Fine-tuning (`task`: a classification.TaskSpec): the train split holds one global batch,
  every eval split one example per process; text fields present, non-empty and covered by
  the pretrained tokenizer."""
  check_split(task.dataset, task.train_split, data_dir, task.text_keys, tokenizer,
              min_examples=global_batch, what=f'one global batch of {global_batch}')
  for split in task.eval_splits:
    check_split(task.dataset, split, data_dir, task.text_keys, tokenizer,
                min_examples=process_count, what=f'evaluation by {process_count} processes')
