"""Fine-tuning a pretrained encoder for classification, optionally compression-aware.

The task named 'classify'. The encoder's size, vocabulary and tokenizer come from the init
checkpoint (a pretraining run folder); a fresh classification head is added. The dataset is
`config.task` (a name in data/classification.TASKS). Compression-aware variants:
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trainbig_jax import files
from trainbig_jax.compress import prune, quantize
from trainbig_jax.data import checks, classification, sources
from trainbig_jax.data.tokenizer import Tokenizer, load_tokenizer
from trainbig_jax.models import layer_stack
from trainbig_jax.models.encoder import Encoder, encoder_config
from trainbig_jax.models.layout import path_str
from trainbig_jax.tasks.mlm import check_model_config, encoder_init_fn
from trainbig_jax.train import checkpoint, distributed, loop
from trainbig_jax.train.best import BestCheckpoint
from trainbig_jax.train.checks import ConfigError, check_train_config
from trainbig_jax.train.state import make_optimizer
from trainbig_jax.train.steps import Batch, SumsFn, make_eval_step

NAME = 'classify'
PRIMARY_METRIC = 'eval_accuracy'
PRIMARY_MODE = 'max'

# Parts of the tree taken from the pretrained checkpoint; the heads are not.
ENCODER_PARTS = ('embed', 'final_norm')


def _is_encoder_part(name: str) -> bool:
  return name in ENCODER_PARTS or name.startswith('layers_')


def pruning_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  p, total = config.compression.prune, config.train.total_steps
  return int(p.begin_frac * total), int(p.end_frac * total)


def check_config(config: ml_collections.ConfigDict) -> None:
  classification.get_task(config.task, config.data_dir)
  if not (isinstance(config.max_len, int) and config.max_len >= 4):
    raise ConfigError(f'max_len={config.max_len!r} is invalid: it must be an integer >= 4.')
  p, q = config.compression.prune, config.compression.qat
  if not 0.0 <= p.final_sparsity < 1.0:
    raise ConfigError(f'compression.prune.final_sparsity={p.final_sparsity!r} is invalid: '
                      f'allowed [0, 1).')
  if not 0.0 <= p.begin_frac <= p.end_frac <= 1.0:
    raise ConfigError(f'compression.prune.begin_frac={p.begin_frac!r} and end_frac='
                      f'{p.end_frac!r} must satisfy 0 <= begin_frac <= end_frac <= 1.')
  quantize.check_setting_bits(q.bits)
  check_train_config(config, jax.device_count())


def _model_config(config: ml_collections.ConfigDict, pretrain_config, num_classes: int):
  # Per-layer even after a scanned pretraining run: pruning and QAT select kernels by layer.
  m = layer_stack.per_layer_model_config(pretrain_config.model)
  m.dropout, m.attention_dropout = config.model.dropout, config.model.attention_dropout
  m.num_classes = num_classes
  check_model_config(m)
  return m


def build_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Encoder:
  """The encoder with its classification head; `config.model` is the resolved one."""
  return Encoder(encoder_config(config.model, vocab_size=tokenizer.vocab_size,
                                pad_id=tokenizer.pad_id))


def init_params_fn(model: Encoder, config: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  return encoder_init_fn(model, config.max_len, 'classify')


def classification_sums(model: Encoder) -> SumsFn:
  """Cross-entropy and accuracy summed over the real (weight 1) examples."""
  def sums(params, batch, rng, train):
    logits = model.apply({'params': params}, batch['inputs'], train=train, task='classify',
                         rngs={'dropout': rng})
    weights = batch['weights']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    correct = jnp.argmax(logits, -1) == batch['labels']
    return {'loss': jnp.sum(loss * weights), 'weight': jnp.sum(weights),
            'correct': jnp.sum(correct * weights),
            'tokens': jnp.sum(batch['inputs'] != model.cfg.pad_id).astype(jnp.float32)}
  return sums


def sums_fn(model: Encoder, config: ml_collections.ConfigDict) -> SumsFn:
  return classification_sums(model)


class _Passes:
  """A re-iterable: every `iter()` starts a new pass (the grain iterator is single-pass)."""

  def __init__(self, make_iterator: Callable[[], Iterable[Batch]]):
    self._make_iterator = make_iterator

  def __iter__(self):
    return iter(self._make_iterator())


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 split: str | None = None) -> Iterable[Batch]:
  """Passes over the dataset's (first) validation split, this process's share."""
  spec = classification.get_task(config.task, config.data_dir)
  return _Passes(lambda: classification.classification_iterator(
      config.task, split or spec.eval_splits[0], tokenizer=tokenizer, max_len=config.max_len,
      batch_size=config.train.batch_size // jax.process_count(), data_dir=config.data_dir,
      process_index=jax.process_index(), process_count=jax.process_count()))


def count_examples(batch: Batch) -> int:
  return int(np.sum(batch['weights'] > 0))


def extra_metrics_fn(model: Encoder, config: ml_collections.ConfigDict,
                     tokenizer: Tokenizer) -> Callable[[Any], dict[str, float]] | None:
  """Loss and accuracy on the dataset's further validation splits (MNLI's mismatched one),
  named `eval_loss_<split>` and `eval_accuracy_<split>`; None when it has only one."""
  spec = classification.get_task(config.task, config.data_dir)
  further = spec.eval_splits[1:]
  if not further:
    return None
  step = jax.jit(make_eval_step(sums_fn(model, config)))
  passes = {split: eval_batches(config, tokenizer, split) for split in further}

  def metrics(params) -> dict[str, float]:
    mesh = jax.tree.leaves(params)[0].sharding.mesh  # the mesh the params live on
    out = {}
    for split, batches in passes.items():
      m = loop.evaluate(step, params, batches, mesh)
      out[f'eval_loss_{split}'] = m['eval_loss']
      out[f'eval_accuracy_{split}'] = m['eval_accuracy']
    return out
  return metrics


def per_example_metrics_fn(model: Encoder, config: ml_collections.ConfigDict,
                           tokenizer: Tokenizer) -> None:
  """None: the further splits are other examples than the per-example values cover."""
  return None


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
  pre_by_name = {path_str(k): v for k, v in pre_flat.items()}
  leaves = []
  for key, value in fresh_flat:
    name = path_str(k for k in key if getattr(k, 'name', None) != 'value')
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
  check_config(config)
  spec = classification.get_task(config.task, config.data_dir)
  pre_config, tokenizer, pretrained = load_pretrained(init_checkpoint)
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    config.task_kind = NAME
    config.init_checkpoint = str(Path(init_checkpoint).absolute())
    config.model = _model_config(config, pre_config, spec.num_classes)
  if config.max_len > config.model.max_len:
    raise ConfigError(f'max_len={config.max_len} exceeds the pretrained model\'s '
                      f'{config.model.max_len} positions.')
  model = build_model(config, tokenizer)
  fresh_params = init_params_fn(model, config)

  def init_params(rng):
    return merge_pretrained(fresh_params(rng), pretrained, str(init_checkpoint))

  # An incompatible checkpoint fails here, before anything is written (abstract: no compute).
  jax.eval_shape(init_params, jax.random.key(0))
  workdir = Path(workdir)
  with files.removed_on_failure(workdir, remove=jax.process_index() == 0):
    with distributed.primary_first('trainbig:finetune_prepare'):
      checkpoint.write_config(workdir, config)
      tokenizer.copy_to(str(workdir))
      sources.prepare(spec.dataset, config.data_dir)
    checks.check_classification_data(spec, config.data_dir, tokenizer,
                                     global_batch=config.train.batch_size,
                                     process_count=jax.process_count())

  tx = make_optimizer(config.train)
  p, q = config.compression.prune, config.compression.qat
  if p.final_sparsity > 0:
    begin, end = pruning_steps(config)
    tx = prune.with_pruning(tx, p.final_sparsity, begin, end, update_every=p.update_every,
                            scope=p.scope, include=tuple(p.include), exclude=tuple(p.exclude))
  sums = sums_fn(model, config)
  if q.bits != quantize.FLOAT_BITS:
    sums = quantize.qat_sums(sums, q)

  index, count = jax.process_index(), jax.process_count()
  train_iterator = classification.classification_iterator(
      config.task, spec.train_split, batch_size=config.train.batch_size // count,
      seed=config.seed, shuffle=True, repeat=True, tokenizer=tokenizer, max_len=config.max_len,
      data_dir=config.data_dir, process_index=index, process_count=count)

  best = BestCheckpoint(workdir, PRIMARY_METRIC, PRIMARY_MODE,
                        min_step=pruning_steps(config)[1] if p.final_sparsity else 0)
  validation = eval_batches(config, tokenizer)
  job = loop.Job(config=config, workdir=workdir, sums_fn=sums, init_params=init_params,
                 train_iterator=train_iterator, eval_batches=lambda: validation, tx=tx,
                 on_eval=best.consider,
                 extra_metrics=extra_metrics_fn(model, config, tokenizer))
  summary = loop.run(job)
  best.close()
  return summary


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          init_checkpoint: str | os.PathLike | None = None) -> loop.Summary:
  if init_checkpoint is None:
    raise ConfigError('classification fine-tuning starts from a pretrained run: give '
                      '--init_checkpoint=RUN (trainbig finetune).')
  return finetune(config, init_checkpoint, workdir)
