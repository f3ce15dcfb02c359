"""`trainbig eval`: XLA-compiled evaluation of a dense or compressed checkpoint.

The checkpoint's own config says what to evaluate: a pretraining run on its MLM validation
batches, a fine-tuning run on its task's validation split. A compressed checkpoint is
dequantized into a dense tree and evaluated by exactly the same compiled step; with
`int8=True` (`--int8`) its Dense layers run as int8 matmuls instead (compress/int8.py).
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

from trainbig_jax.compress.checkpoints import load_checkpoint_params
from trainbig_jax.compress.int8 import int8_eval_inputs
from trainbig_jax.data import mlm
from trainbig_jax.data.tokenizer import load_tokenizer
from trainbig_jax.models.encoder import Encoder, encoder_config
from trainbig_jax.train import checkpoint, loop, partitioning
from trainbig_jax.train.finetune import classification_eval_batches
from trainbig_jax.train.pretrain import init_params_fn
from trainbig_jax.train.state import params_shardings
from trainbig_jax.train.steps import classification_sums, make_eval_step, mlm_sums


def _mesh_for(config) -> jax.sharding.Mesh:
  try:
    return partitioning.make_mesh(config.mesh.shape)
  except partitioning.MeshError as e:  # evaluated on other hardware than it trained on
    logging.info('%s Evaluating data-parallel over all devices instead.', e)
    return partitioning.make_mesh((-1, 1, 1))


def evaluate_checkpoint(path: str | os.PathLike, int8: bool = False) -> dict[str, Any]:
  """Evaluates a run folder or compressed checkpoint; returns metrics and storage facts."""
  path = Path(path)
  if not path.exists():
    raise checkpoint.CheckpointError(f'--checkpoint={path} does not exist.')
  config = checkpoint.read_config(path)
  tokenizer = load_tokenizer(str(path / checkpoint.TOKENIZER_FILE))
  params, facts = load_checkpoint_params(path)
  model = Encoder(encoder_config(config.model, vocab_size=tokenizer.vocab_size,
                                 pad_id=tokenizer.pad_id))
  if 'task' in config:
    task, seq_len, sums_fn = config.task, config.max_len, classification_sums(model)
    batches = lambda: classification_eval_batches(config, tokenizer)
  else:
    task, seq_len = 'mlm', config.data.seq_len
    sums_fn = mlm_sums(model, mlm.max_predictions(seq_len, config.data.mask_rate))
    eval_batches = mlm.pretrain_eval_batches(config, tokenizer,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
    batches = lambda: eval_batches
  mesh = _mesh_for(config)
  shardings = params_shardings(init_params_fn(model, seq_len, 'classify' if task != 'mlm'
                                              else 'mlm'), mesh)
  leaves = jax.tree.leaves(params)
  if int8:
    params, shardings, sums_fn = int8_eval_inputs(params, shardings, sums_fn, mesh, path)
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
    seconds = time.perf_counter() - start
  examples = sum(int(np.sum(b['weights'] > 0)) if task != 'mlm' else b['inputs'].shape[0]
                 for b in batches())
  return {
      'checkpoint': str(path), 'task': task, 'matmuls': 'int8' if int8 else 'float', **metrics,
      'total_params': sum(int(x.size) for x in leaves),
      'nonzero_params': sum(int(np.count_nonzero(x)) for x in leaves),
      **facts, 'eval_examples': examples, 'eval_seconds': seconds,
      'examples_per_s': examples / max(seconds, 1e-9),
  }
