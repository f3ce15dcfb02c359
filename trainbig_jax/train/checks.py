"""Config checks every task shares: the `train` and `mesh` sections of a run config."""

from __future__ import annotations

import math

import jax
import ml_collections

from trainbig_jax.train import partitioning


class ConfigError(ValueError):
  """A config value is out of its allowed range."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def check_train_config(c: ml_collections.ConfigDict, num_devices: int) -> None:
  t = c.train
  for name in ('batch_size', 'grad_accum_steps', 'total_steps', 'log_every', 'eval_every',
               'checkpoint_every', 'keep_checkpoints'):
    require(isinstance(t[name], int) and t[name] > 0,
            f'train.{name}={t[name]!r} is invalid: it must be a positive integer.')
  require(t.budget_s >= 0, f'train.budget_s={t.budget_s!r} is invalid: seconds >= 0 (0: none).')
  for name in ('budget_flops', 'budget_tokens'):
    value = t.get(name, 0.0)
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            and math.isfinite(value),
            f'train.{name}={value!r} is invalid: a finite number >= 0 (0: none).')
  require(t.learning_rate > 0, f'train.learning_rate={t.learning_rate!r} must be > 0.')
  require(t.warmup_steps >= 0, f'train.warmup_steps={t.warmup_steps!r} must be >= 0.')
  skips = t.get('max_nonfinite_skips', 0)
  require(isinstance(skips, int) and skips >= 0,
          f'train.max_nonfinite_skips={skips!r} must be an integer >= 0.')
  mesh_shape = partitioning.resolve_mesh_shape(c.mesh.shape, num_devices)
  batch_shards = mesh_shape[0] * mesh_shape[1]
  micro = t.batch_size // t.grad_accum_steps
  require(t.batch_size % t.grad_accum_steps == 0,
          f'train.batch_size={t.batch_size} is not divisible by '
          f'train.grad_accum_steps={t.grad_accum_steps}.')
  require(micro % batch_shards == 0,
          f'train.batch_size={t.batch_size} gives micro-batches of {micro}, not divisible by '
          f'the {batch_shards} data x fsdp shards of mesh {mesh_shape}.')
  require(t.batch_size % jax.process_count() == 0,
          f'train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} '
          f'processes.')
