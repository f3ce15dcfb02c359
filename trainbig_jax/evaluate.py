"""`trainbig eval`: XLA-compiled evaluation of a dense or compressed checkpoint.

The checkpoint's own config names its task (trainbig_jax/tasks), which says what to evaluate:
a pretraining run on its MLM validation batches, a fine-tuning run on its dataset's
validation split. A compressed checkpoint is dequantized into a dense tree and evaluated by
exactly the same compiled step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from trainbig_jax import tasks
from trainbig_jax.compress.checkpoints import load_checkpoint_params
from trainbig_jax.data.tokenizer import load_tokenizer
from trainbig_jax.train import checkpoint, loop, partitioning
from trainbig_jax.train.state import params_shardings
from trainbig_jax.train.steps import make_eval_step


def _mesh_for(config) -> jax.sharding.Mesh:
  try:
    return partitioning.make_mesh(config.mesh.shape)
  except partitioning.MeshError as e:  # evaluated on other hardware than it trained on
    logging.info('%s Evaluating data-parallel over all devices instead.', e)
    return partitioning.make_mesh((-1, 1, 1))


def evaluate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
  """Evaluates a run folder or compressed checkpoint; returns metrics and storage facts."""
  path = Path(path)
  if not path.exists():
    raise checkpoint.CheckpointError(f'--checkpoint={path} does not exist.')
  config = checkpoint.read_config(path)
  tokenizer = load_tokenizer(str(path / checkpoint.TOKENIZER_FILE))
  params, facts = load_checkpoint_params(path)
  task = tasks.task_of(config)
  model = task.build_model(config, tokenizer)
  sums_fn = task.sums_fn(model, config)
  eval_batches = task.eval_batches(config, tokenizer)
  batches = lambda: eval_batches
  mesh = _mesh_for(config)
  shardings = params_shardings(task.init_params_fn(model, config), mesh)
  try:
    params = jax.device_put(params, shardings)
  except ValueError as e:
    raise checkpoint.CheckpointError(
        f'{path} holds parameters that do not fit its own model config ({e}).') from None
  eval_step = jax.jit(make_eval_step(sums_fn),
                      in_shardings=(shardings, partitioning.batch_sharding(mesh)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    first = next(iter(batches()))
    eval_step.lower(params, partitioning.global_batch(first, mesh)).compile()  # not timed
    start = time.perf_counter()
    metrics = loop.evaluate(eval_step, params, batches(), mesh)
    extra_metrics = task.extra_metrics_fn(model, config, tokenizer)
    if extra_metrics is not None:
      metrics.update(extra_metrics(params))
    seconds = time.perf_counter() - start
  leaves = jax.tree.leaves(jax.device_get(params))
  examples = sum(task.count_examples(b) for b in batches())
  return {
      'checkpoint': str(path), 'task': config.get('task', task.NAME), 'task_kind': task.NAME,
      'primary_metric': task.PRIMARY_METRIC, 'primary_mode': task.PRIMARY_MODE, **metrics,
      'total_params': sum(int(x.size) for x in leaves),
      'nonzero_params': sum(int(np.count_nonzero(x)) for x in leaves),
      **facts, 'eval_examples': examples, 'eval_seconds': seconds,
      'examples_per_s': examples / max(seconds, 1e-9),
  }
