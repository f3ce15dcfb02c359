"""`trainbig eval`: XLA-compiled evaluation of a dense or compressed checkpoint.

The checkpoint's own config names its task (trainbig_jax/tasks), which says what to evaluate:
a pretraining run on its MLM validation batches, a fine-tuning run on its dataset's
validation split. A compressed checkpoint is dequantized into a dense tree and evaluated by
exactly the same compiled step; with
`int8=True` (`--int8`) its Dense layers run as int8 matmuls instead (compress/int8.py), for
the summed metrics (eval_loss, eval_accuracy) alone.
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
from jax.sharding import NamedSharding, PartitionSpec as P

from trainbig_jax import tasks
from trainbig_jax.compress.checkpoints import load_checkpoint_params
from trainbig_jax.compress.int8 import int8_eval_inputs
from trainbig_jax.data.tokenizer import load_tokenizer
from trainbig_jax.models import layer_stack
from trainbig_jax.train import checkpoint, loop, partitioning
from trainbig_jax.train.state import check_params_fit, params_shardings
from trainbig_jax.train.steps import make_eval_step


def _mesh_for(config) -> jax.sharding.Mesh:
  try:
    return partitioning.make_mesh(config.mesh.shape)
  except partitioning.MeshError as e:  # evaluated on other hardware than it trained on
    logging.info('%s Evaluating data-parallel over all devices instead.', e)
    return partitioning.make_mesh((-1, 1, 1))


def make_per_example_step(sums_fn):
  """(params, batch) -> the task's sums of each example alone ({'loss': [B], 'weight': [B],
  ...}): the sums function vmapped over size-1 batches, so any task's evaluation splits into
  per-example values without knowing the task (padding examples come out with weight 0)."""
  def step(params, batch):
    def one(example):
      return sums_fn(params, jax.tree.map(lambda x: x[None], example), jax.random.key(0), False)
    return jax.vmap(one)(batch)
  return step


def per_example_sums(per_example_step, params, batches, mesh) -> dict[str, np.ndarray]:
  """Every real example's sums in evaluation order: {'loss', 'weight', 'correct'} arrays.

  `per_example_step` returns its values replicated, so every process gets all processes'
  examples (in global batch order) and sums them to the same totals."""
  parts = []
  for batch in batches:
    sums = jax.device_get(per_example_step(params, partitioning.global_batch(batch, mesh)))
    parts.append({k: np.asarray(sums[k], np.float64) for k in ('loss', 'weight', 'correct')})
  if not parts:
    raise ValueError('The evaluation split gave no batches.')
  out = {k: np.concatenate([p[k] for p in parts]) for k in ('loss', 'weight', 'correct')}
  real = out['weight'] > 0
  return {k: v[real] for k, v in out.items()}


def evaluate_checkpoint(path: str | os.PathLike, int8: bool = False,
                        per_example: bool = False) -> dict[str, Any]:
  """Evaluates a run folder or compressed checkpoint; returns metrics and storage facts.

  One pass over the evaluation data either way. With `per_example`, that pass keeps each
  real example's loss, weight and correct sums (see `per_example_sums`) and the summed
  metrics are derived from them (sum(loss)/sum(weight), sum(correct)/sum(weight): the same
  numbers up to float32 rounding); the task's further metrics come with their per-example
  parts where it has them (translation: each sentence's BLEU statistics, 'bleu'). They are
  in result['per_example'], for paired comparisons (experiments/uncertainty.py).
  With `int8`, only the summed metrics are evaluated (decoding and further splits run on
  the float parameters), so a task whose primary metric is not summed is refused.
  """
  path = Path(path)
  if not path.exists():
    raise checkpoint.CheckpointError(f'--checkpoint={path} does not exist.')
  config = checkpoint.read_config(path)
  tokenizer = load_tokenizer(str(path / checkpoint.TOKENIZER_FILE))
  params, facts = load_checkpoint_params(path)
  task = tasks.task_of(config)
  # Per-layer, as restore_params and compressed checkpoints give the parameters.
  config.model = layer_stack.per_layer_model_config(config.model)
  model = task.build_model(config, tokenizer)
  check_params_fit(params, task.init_params_fn(model, config), str(path),
                   f'its config and tokenizer ({tokenizer.vocab_size} pieces)')
  sums_fn = task.sums_fn(model, config)
  batches = task.eval_batches(config, tokenizer)
  mesh = _mesh_for(config)
  shardings = params_shardings(task.init_params_fn(model, config), mesh)
  leaves = jax.tree.leaves(params)
  if int8:
    if task.PRIMARY_METRIC not in loop.SUMMED_METRICS:
      raise ValueError(f'--int8 evaluates the summed metrics ({", ".join(loop.SUMMED_METRICS)})'
                       f'; {path} is a {task.NAME!r} run, whose {task.PRIMARY_METRIC} needs '
                       f'the float path.')
    params, shardings, sums_fn = int8_eval_inputs(params, shardings, sums_fn, mesh, path)
  try:
    params = jax.device_put(params, shardings)
  except ValueError as e:
    raise checkpoint.CheckpointError(
        f'{path} holds parameters that do not fit its own model config ({e}).') from None
  in_shardings = (shardings, partitioning.batch_sharding(mesh))
  if per_example:
    step = jax.jit(make_per_example_step(sums_fn), in_shardings=in_shardings,
                   out_shardings=NamedSharding(mesh, P()))
  else:
    step = jax.jit(make_eval_step(sums_fn), in_shardings=in_shardings)
  values = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    first = next(iter(batches))
    step.lower(params, partitioning.global_batch(first, mesh)).compile()  # not timed
    start = time.perf_counter()
    if per_example:
      values = per_example_sums(step, params, batches, mesh)
      metrics = loop.summed_metrics({k: np.sum(v) for k, v in values.items()})
    else:
      metrics = loop.evaluate(step, params, batches, mesh)
    if not int8:
      with_examples = (task.per_example_metrics_fn(model, config, tokenizer) if per_example
                       else None)
      if with_examples is not None:
        extra, extra_values = with_examples(params)
        values.update(extra_values)
      else:
        extra_metrics = task.extra_metrics_fn(model, config, tokenizer)
        extra = extra_metrics(params) if extra_metrics is not None else {}
      metrics.update(extra)
    seconds = time.perf_counter() - start
  examples = sum(task.count_examples(b) for b in batches)
  return {
      'checkpoint': str(path), 'task': config.get('task', task.NAME), 'task_kind': task.NAME,
      'primary_metric': task.PRIMARY_METRIC, 'primary_mode': task.PRIMARY_MODE,
      'matmuls': 'int8' if int8 else 'float', **metrics,
      'total_params': sum(int(x.size) for x in leaves),
      'nonzero_params': sum(int(np.count_nonzero(x)) for x in leaves),
      **facts, 'eval_examples': examples, 'eval_seconds': seconds,
      'examples_per_s': examples / max(seconds, 1e-9),
      **({'per_example': values} if per_example else {}),
  }
