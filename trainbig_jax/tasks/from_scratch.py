"""Training a task's model from scratch: what masked-LM pretraining and translation share.

Both check the config, record it with the task's name, prepare the dataset and the run's
tokenizer (process 0 first, the others then open what it wrote), build the model and hand the
loop a Job of the task's own parts. Classification differs (it starts from a pretrained
encoder and its tokenizer) and builds its Job itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections

from trainbig_jax import files
from trainbig_jax.data import sources
from trainbig_jax.data.tokenizer import Tokenizer, train_or_load_tokenizer
from trainbig_jax.tasks import Task
from trainbig_jax.train import checkpoint, distributed, loop
from trainbig_jax.train.state import make_optimizer

# (config, tokenizer, *, process_index, process_count) -> this process's training batches.
TrainIteratorFn = Callable[..., Iterator[Any]]


def train(task: Task, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          train_iterator: TrainIteratorFn, *,
          check_data: Callable[[ml_collections.ConfigDict, Tokenizer], None] | None = None,
          flops_per_step: Callable[[Any, ml_collections.ConfigDict], float] | None = None
          ) -> loop.Summary:
  """Trains (or resumes) `task`'s model from scratch in `workdir`; returns where it stopped.

  `check_data` checks the prepared data against the config before anything trains;
  `flops_per_step(model, config)` gives the analytic FLOPs of a step where the task counts
  them (a FLOP budget needs it).
  """
  task.check_config(config)
  config = ml_collections.ConfigDict(config.to_dict())
  config.task_kind = task.NAME
  workdir = Path(workdir)
  # A setup that fails (bad data, a tokenizer of the wrong size) leaves no half-made run folder.
  with files.removed_on_failure(workdir, remove=jax.process_index() == 0):
    with distributed.primary_first(f'trainbig:{task.NAME}_prepare'):
      checkpoint.write_config(workdir, config)
      sources.prepare(config.data.dataset, config.data.data_dir)
      tokenizer = train_or_load_tokenizer(config.data, str(workdir))
      tokenizer.copy_to(workdir)  # the tokenizer travels with every checkpoint
    if check_data is not None:
      check_data(config, tokenizer)
  model = task.build_model(config, tokenizer)
  batches = task.eval_batches(config, tokenizer)
  job = loop.Job(
      config=config, workdir=workdir, sums_fn=task.sums_fn(model, config),
      init_params=task.init_params_fn(model, config),
      train_iterator=train_iterator(config, tokenizer, process_index=jax.process_index(),
                                    process_count=jax.process_count()),
      eval_batches=lambda: batches, tx=make_optimizer(config.train),
      extra_metrics=task.extra_metrics_fn(model, config, tokenizer),
      flops_per_step=flops_per_step(model, config) if flops_per_step is not None else 0.0)
  return loop.run(job)
