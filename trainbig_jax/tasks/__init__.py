"""Tasks: what one kind of run trains and evaluates; `train/` is the machinery they share.

A task is a module registered in TASKS by name ('mlm', 'classify'; translation adds
'translate') and looked up with `get_task(name)`, or `task_of(config)` for a run config or a
run folder's config.json. Every task module defines (the `Task` protocol below):

  NAME: str                          its registry name, recorded as `config.task_kind`
  PRIMARY_METRIC: str                the eval metric that decides "best", e.g. 'eval_accuracy'
  PRIMARY_MODE: str                  'max' (higher is better) or 'min' (lower is better)
  check_config(config) -> None       raises train.checks.ConfigError (one line) on a bad value
  build_model(config, tokenizer) -> flax.linen.Module
  init_params_fn(model, config) -> (rng -> boxed params, with logical axis names)
  sums_fn(model, config) -> SumsFn   evaluation sums {'loss', 'weight', 'correct', 'tokens'}
                                     (train/steps.py); training may wrap it (e.g. QAT)
  eval_batches(config, tokenizer, split=None) -> Iterable[Batch]
                                     this process's share of the validation split (the
                                     config's own when split is None); re-iterable: every
                                     iter() is one whole pass (a list will do)
  count_examples(batch) -> int       real (not padding) examples in an eval batch
  extra_metrics_fn(model, config, tokenizer) -> (params -> {name: float}) | None
                                     metrics beyond the summed eval_loss/eval_accuracy (e.g.
                                     eval_bleu from decoding), called under the mesh with
                                     sharded params by the train loop and by `trainbig eval`
  per_example_metrics_fn(model, config, tokenizer)
      -> (params -> ({name: float}, {name: array over examples})) | None
                                     extra_metrics_fn's metrics together with each evaluated
                                     example's part of them (translation: per-sentence BLEU
                                     statistics), from the same single pass; None when the
                                     task's extra metrics have no per-example parts
  train(config, workdir, *, init_checkpoint=None) -> train.loop.Summary
                                     trains or resumes a run in workdir; writes config.json
                                     with `task_kind` = NAME (mlm and translate through
                                     tasks/from_scratch.py)

Evaluation metrics are named: the loop turns the summed eval sums into `eval_loss` and
`eval_accuracy` (train/loop.evaluate), merges `extra_metrics_fn`'s dict, writes them to
metrics.jsonl, carries them in `Summary.metrics`, and a task that keeps its best checkpoint
(train/best.BestCheckpoint) ranks evaluations by PRIMARY_METRIC in PRIMARY_MODE.

The task of a run is `config.task_kind`: each config file sets it (configs/pretrain.py 'mlm',
configs/finetune.py 'classify'), `trainbig train` and `finetune` call that task's `train`, and
`eval`, `compress` and `sweep` read it back from config.json (`trainbig eval --json` reports
task_kind, primary_metric and primary_mode; sweep rows carry metric, metric_name and
higher_is_better). Folders written before the field existed still load: a config without it
is 'classify' when it has the classification field `task` (the dataset name, e.g.
'rotten_tomatoes'), otherwise 'mlm'.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import ml_collections

TASK_FIELD = 'task_kind'
TASKS: dict[str, str] = {
    'mlm': 'trainbig_jax.tasks.mlm',
    'classify': 'trainbig_jax.tasks.classify',
    'translate': 'trainbig_jax.tasks.translate',
}


class Task(Protocol):
  NAME: str
  PRIMARY_METRIC: str
  PRIMARY_MODE: str

  def check_config(self, config: ml_collections.ConfigDict) -> None: ...
  def build_model(self, config: ml_collections.ConfigDict, tokenizer: Any) -> Any: ...
  def init_params_fn(self, model: Any, config: ml_collections.ConfigDict
                     ) -> Callable[[Any], Any]: ...
  def sums_fn(self, model: Any, config: ml_collections.ConfigDict) -> Callable[..., Any]: ...
  def eval_batches(self, config: ml_collections.ConfigDict, tokenizer: Any,
                   split: str | None = None) -> Iterable[dict[str, Any]]: ...
  def count_examples(self, batch: dict[str, Any]) -> int: ...
  def extra_metrics_fn(self, model: Any, config: ml_collections.ConfigDict, tokenizer: Any
                       ) -> Callable[[Any], dict[str, float]] | None: ...
  def per_example_metrics_fn(self, model: Any, config: ml_collections.ConfigDict,
                             tokenizer: Any) -> Callable[[Any], tuple[dict[str, float],
                                                                      dict[str, Any]]] | None: ...
  def train(self, config: ml_collections.ConfigDict, workdir: Any, *,
            init_checkpoint: Any = None) -> Any: ...


class UnknownTaskError(ValueError):
  """A task name that is not registered."""


def get_task(name: str) -> Task:
  """The task module registered as `name`."""
  if name not in TASKS:
    raise UnknownTaskError(f'task_kind={name!r} is unknown; allowed: {", ".join(TASKS)}.')
  return importlib.import_module(TASKS[name])


def task_name(config: ml_collections.ConfigDict) -> str:
  """The registry name of a run config's task (older configs without the field included)."""
  if TASK_FIELD in config and config[TASK_FIELD] is not None:
    return config[TASK_FIELD]
  return 'classify' if 'task' in config else 'mlm'


def task_of(config: ml_collections.ConfigDict) -> Task:
  return get_task(task_name(config))

