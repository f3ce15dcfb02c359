"""Each process's block of a global training batch.

Every training pipeline (mlm.py, classification.py, translation.py) is defined once for the
whole job: the same examples, shuffle, tokenization, packing and masking on every process,
cut into global batches of `train.batch_size` rows. Global batch b is rows [b*G, (b+1)*G) of
that stream, and process p keeps rows [p*B, (p+1)*B) of it, B = G // process_count (the rows
its devices hold under the batch sharding, partitioning.global_batch).

Why: the data a run sees, and the iterator state after each step, do not depend on the
number of processes. The state is saved once with a checkpoint (train/checkpoint.py), and a
run resumes on another process count and mesh at the same global batch, with no example
repeated or skipped; a run on 1 process and on 8 sees the same batches.

What it costs: every process reads, tokenizes and packs the whole stream (and masks whole
batches) to keep its 1/process_count of the rows, so the host work per process does not
shrink as processes are added. Grain worker processes (`data.worker_count`) spread that work
over a host's cores; they are needed once building a whole global batch takes longer than a
training step (benchmarks/train_throughput.py reports the ratio as pipeline_over_step).
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np


class BatchSplitError(ValueError):
  """A global batch that cannot be split evenly between the processes."""


def rows_per_process(global_batch: int, process_count: int, process_index: int) -> int:
  """B = global_batch // process_count, after checking that the split is exact."""
  if not 0 <= process_index < process_count:
    raise BatchSplitError(f'process_index={process_index} must be in [0, {process_count}).')
  if global_batch <= 0 or global_batch % process_count:
    raise BatchSplitError(
        f'train.batch_size={global_batch} must be a positive multiple of the process count '
        f'({process_count}).')
  return global_batch // process_count


def process_block(batch: dict[str, Any], *, process_index: int,
                  process_count: int) -> dict[str, Any]:
  """This process's rows [p*B, (p+1)*B) of every array of one global batch."""
  global_batch = len(next(iter(batch.values())))
  rows = rows_per_process(global_batch, process_count, process_index)
  start = process_index * rows
  return {k: np.asarray(v)[start:start + rows] for k, v in batch.items()}


def take_process_block(batches: grain.IterDataset, *, process_index: int,
                       process_count: int) -> grain.IterDataset:
  """`batches` (global) -> this process's block of each; the iterator state is unchanged
  (a map keeps its parent's state), so it is the same on every process."""
  if process_count == 1:
    return batches
  return batches.map(functools.partial(process_block, process_index=process_index,
                                       process_count=process_count))
