"""Fine-tuning a pretrained encoder for classification, optionally compression-aware.

The encoder's size, vocabulary and tokenizer come from the init checkpoint (a pretraining
run folder); a fresh classification head is added. Compression-aware variants:
  * gradual magnitude pruning (Zhu & Gupta cubic ramp) as an optax transformation chained
    after AdamW: masks live in the optimizer state and pruned weights are exactly zero after
    every update, and fixed after the ramp ends;
  * quantization-aware training: the forward pass sees fake-quantized weights (straight-
    through gradient), so evaluation reports the accuracy of the quantized model.
The best evaluation (highest accuracy; for pruning, only once the ramp has ended) is kept in
WORKDIR/best/, which downstream commands (compress, eval) read by default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from trainbig_jax.compress import prune, quantize
from trainbig_jax.data import classification, sources
from trainbig_jax.data.tokenizer import load_tokenizer
from trainbig_jax.models import layer_stack
from trainbig_jax.models.encoder import Encoder, encoder_config
from trainbig_jax.train import checkpoint, distributed, loop
from trainbig_jax.train.pretrain import ConfigError, check_model_config, check_train_config
from trainbig_jax.train.state import make_optimizer
from trainbig_jax.train.steps import classification_sums

# Parts of the tree taken from the pretrained checkpoint; the heads are not.
ENCODER_PARTS = ('embed', 'final_norm')


def _is_encoder_part(name: str) -> bool:
  return name in ENCODER_PARTS or name.startswith('layers_')


def pruning_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  p, total = config.compression.prune, config.train.total_steps
  return int(p.begin_frac * total), int(p.end_frac * total)


def check_finetune_config(config: ml_collections.ConfigDict) -> None:
  classification.get_task(config.task)
  if not (isinstance(config.max_len, int) and config.max_len >= 4):
    raise ConfigError(f'max_len={config.max_len!r} is invalid: it must be an integer >= 4.')
  p, q = config.compression.prune, config.compression.qat
  if not 0.0 <= p.final_sparsity < 1.0:
    raise ConfigError(f'compression.prune.final_sparsity={p.final_sparsity!r} is invalid: '
                      f'allowed [0, 1).')
  if not 0.0 <= p.begin_frac <= p.end_frac <= 1.0:
    raise ConfigError(f'compression.prune.begin_frac={p.begin_frac!r} and end_frac='
                      f'{p.end_frac!r} must satisfy 0 <= begin_frac <= end_frac <= 1.')
  if q.bits != 0:
    quantize.check_bits(q.bits)
  check_train_config(config, jax.device_count())


def _model_config(config: ml_collections.ConfigDict, pretrain_config, num_classes: int):
  # Per-layer even after a scanned pretraining run: pruning and QAT select kernels by layer.
  m = layer_stack.per_layer_model_config(pretrain_config.model)
  m.dropout, m.attention_dropout = config.model.dropout, config.model.attention_dropout
  m.num_classes = num_classes
  check_model_config(m)
  return m


def load_pretrained(init_checkpoint: str | os.PathLike):
  """(pretrain config, tokenizer, encoder params) of a pretraining run folder."""
  run = Path(init_checkpoint)
  if not run.exists():
    raise checkpoint.CheckpointError(f'--init_checkpoint={run} does not exist.')
  pre_config = checkpoint.read_config(run)
  tokenizer_path = run / checkpoint.TOKENIZER_FILE
  if not tokenizer_path.exists():
    raise checkpoint.CheckpointError(f'{run} has no {checkpoint.TOKENIZER_FILE}; a pretrained '
                                     f'run folder carries its tokenizer.')
  params = checkpoint.restore_params(run)
  return pre_config, load_tokenizer(str(tokenizer_path)), params


def merge_pretrained(fresh: Any, pretrained: dict[str, Any], source: str) -> Any:
  """The fresh (boxed) tree with its encoder leaves replaced by the pretrained values.

  Every encoder leaf must exist in the checkpoint with the same shape; anything else means
  the checkpoint was written by another model (other width, depth or vocabulary).
  """
  fresh_flat = jax.tree_util.tree_flatten_with_path(fresh)[0]
  pre_flat = dict(jax.tree_util.tree_flatten_with_path(pretrained)[0])
  pre_by_name = {prune.path_str(k): v for k, v in pre_flat.items()}
  leaves = []
  for key, value in fresh_flat:
    name = prune.path_str(k for k in key if getattr(k, 'name', None) != 'value')
    if not _is_encoder_part(name.split('/')[0]):
      leaves.append(value)
      continue
    if name not in pre_by_name:
      raise checkpoint.CheckpointError(
          f'{source} is incompatible: it has no parameter {name} (another depth or layout?).')
    loaded = pre_by_name[name]
    if tuple(loaded.shape) != tuple(value.shape):
      raise checkpoint.CheckpointError(
          f'{source} is incompatible: {name} has shape {tuple(loaded.shape)} but this model '
          f'needs {tuple(value.shape)} (another width or vocabulary?).')
    leaves.append(jnp.asarray(loaded, value.dtype))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), leaves)


def finetune(config: ml_collections.ConfigDict, init_checkpoint: str | os.PathLike,
             workdir: str | os.PathLike) -> loop.Summary:
  check_finetune_config(config)
  task = classification.get_task(config.task)
  pre_config, tokenizer, pretrained = load_pretrained(init_checkpoint)
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    config.init_checkpoint = str(Path(init_checkpoint).absolute())
    config.model = _model_config(config, pre_config, task.num_classes)
  if config.max_len > config.model.max_len:
    raise ConfigError(f'max_len={config.max_len} exceeds the pretrained model\'s '
                      f'{config.model.max_len} positions.')
  model = Encoder(encoder_config(config.model, vocab_size=tokenizer.vocab_size,
                                 pad_id=tokenizer.pad_id))

  def init_params(rng):
    fresh = model.init(rng, jnp.zeros((1, config.max_len), jnp.int32), task='classify')['params']
    return merge_pretrained(fresh, pretrained, str(init_checkpoint))

  # An incompatible checkpoint fails here, before anything is written (abstract: no compute).
  jax.eval_shape(init_params, jax.random.key(0))
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with distributed.primary_first('trainbig:finetune_prepare'):
    checkpoint.write_config(workdir, config)
    tokenizer.copy_to(str(workdir))
    sources.prepare(task.dataset, config.data_dir)

  tx = make_optimizer(config.train)
  p, q = config.compression.prune, config.compression.qat
  if p.final_sparsity > 0:
    begin, end = pruning_steps(config)
    tx = prune.with_pruning(tx, p.final_sparsity, begin, end, update_every=p.update_every,
                            scope=p.scope, include=tuple(p.include), exclude=tuple(p.exclude))
  sums_fn = classification_sums(model)
  if q.bits:
    sums_fn = qat_sums(sums_fn, config)

  index, count = jax.process_index(), jax.process_count()
  per_process = config.train.batch_size // count
  common = dict(tokenizer=tokenizer, max_len=config.max_len, data_dir=config.data_dir,
                process_index=index, process_count=count)
  train_iterator = classification.classification_iterator(
      config.task, task.train_split, batch_size=per_process, seed=config.seed, shuffle=True,
      repeat=True, **common)

  def eval_batches():
    return classification_eval_batches(config, tokenizer)

  best = BestCheckpoint(workdir, min_step=pruning_steps(config)[1] if p.final_sparsity else 0)
  job = loop.Job(config=config, workdir=workdir, sums_fn=sums_fn, init_params=init_params,
                 train_iterator=train_iterator, eval_batches=eval_batches, tx=tx,
                 on_eval=best.consider)
  summary = loop.run(job)
  best.close()
  return summary


def classification_eval_batches(config: ml_collections.ConfigDict, tokenizer,
                                split: str | None = None):
  """One pass over the task's (first) validation split, this process's share."""
  task = classification.get_task(config.task)
  return classification.classification_iterator(
      config.task, split or task.eval_splits[0], tokenizer=tokenizer, max_len=config.max_len,
      batch_size=config.train.batch_size // jax.process_count(), data_dir=config.data_dir,
      process_index=jax.process_index(), process_count=jax.process_count())


def qat_sums(sums_fn, config: ml_collections.ConfigDict):
  """The task's sums computed with fake-quantized weights (straight-through gradients)."""
  q = config.compression.qat

  def sums(params, batch, rng, train):
    quantized = quantize.fake_quant_tree(params, q.bits, symmetric=q.symmetric,
                                         per_channel=q.per_channel, include=tuple(q.include),
                                         exclude=tuple(q.exclude))
    return sums_fn(quantized, batch, rng, train)
  return sums


class BestCheckpoint:
  """Keeps the parameters of the most accurate evaluation in WORKDIR/best (Orbax, keep 1)."""

  def __init__(self, workdir: Path, min_step: int = 0):
    self.min_step = min_step
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False,
        best_fn=lambda m: m['eval_accuracy'], best_mode='max')
    self.mngr = ocp.CheckpointManager(workdir.absolute() / checkpoint.BEST_DIR, options=options,
                                      item_names=('state', 'metrics'))

  def consider(self, step: int, state, metrics: dict[str, float]) -> None:
    if step < self.min_step or step in self.mngr.all_steps():
      return
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': state.params}),
        metrics=ocp.args.JsonSave(metrics)), metrics=metrics)
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.close()
