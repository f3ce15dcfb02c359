"""`trainbig sweep`: every model size under one wall-clock budget, fine-tuned, compressed, evaluated.

Layout of a sweep folder DIR:
  sweep.json                    the sweep config (a rerun must use the same one)
  tokenizer.model               shared by every size (trained once on the pretraining data)
  runs/<size>/pretrain/         a pretraining run (metrics.jsonl, checkpoints, ...)
  runs/<size>/finetune/         its fine-tuning run
  runs/<size>/compressed/<cell> compressed checkpoints
  results.jsonl                 one line per evaluated cell (see experiments/results.py)
Every stage is resumable: finished runs carry a summary.json, finished cells a line in
results.jsonl, and a rerun after an interruption does only what is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from trainbig_jax.compress.checkpoints import compress_checkpoint
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.data import classification
from trainbig_jax.data.tokenizer import train_or_load_tokenizer
from trainbig_jax.evaluate import evaluate_checkpoint
from trainbig_jax.experiments.results import RESULTS_FILE, load_results
from trainbig_jax.tasks.classify import finetune
from trainbig_jax.tasks.mlm import pretrain

SWEEP_FILE = 'sweep.json'
SUMMARY_FILE = 'summary.json'


class SweepError(ValueError):
  """A sweep config or folder that cannot be run."""


def size_name(layers: int, hidden: int) -> str:
  return f'L{layers}_H{hidden}'


def _override(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str) -> None:
  for key, value in overrides.items():
    if key not in config:
      raise SweepError(f'{where}.{key} is not a field of that config.')
    if isinstance(value, dict):
      _override(config[key], value, f'{where}.{key}')
    else:
      config[key] = value


def pretrain_config(sweep: ml_collections.ConfigDict, layers: int, hidden: int,
                    tokenizer_path: str) -> ml_collections.ConfigDict:
  c = pretrain_configs.get_config(sweep.pretrain_preset)
  _override(c, sweep.pretrain_overrides.to_dict(), 'pretrain_overrides')
  c.preset = size_name(layers, hidden)
  c.model.num_layers, c.model.hidden = layers, hidden
  c.model.num_heads = sweep.heads or max(1, hidden // 64)
  c.model.mlp_dim = 4 * hidden
  c.train.budget_s = float(sweep.pretrain_budget_s)
  c.train.total_steps = sweep.pretrain_total_steps
  # About 12 evaluations over the budget, evenly spaced in time whatever the model's speed.
  c.train.eval_every_s = float(sweep.pretrain_budget_s) / 12
  c.train.eval_every = 10 ** 9
  c.data.tokenizer_path = tokenizer_path
  return c


def finetune_config(sweep: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = finetune_configs.get_config(sweep.finetune_preset)
  _override(c, sweep.finetune_overrides.to_dict(), 'finetune_overrides')
  return c


def compression_cells(sweep: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The compression grid: (name, method, sparsity, bits, compress config) per cell."""
  def cell(method, sparsity, bits):
    c = compress_configs.get_config(sweep.compress_preset)
    c.prune.sparsity, c.quant.bits = float(sparsity), int(bits if bits < 32 else 0)
    if sweep.quantize_embeddings:
      c.quant.include = tuple(c.quant.include) + (r'embed/token/embedding$',)
    name = {'dense': 'dense', 'prune': f'prune{round(sparsity * 100)}',
            'quantize': f'int{bits}',
            'prune_quantize': f'prune{round(sparsity * 100)}_int{bits}'}[method]
    return dict(name=name, method=method, sparsity=float(sparsity), bits=int(bits), config=c)
  cells = [cell('dense', 0.0, 32)]
  cells += [cell('prune', s, 32) for s in sweep.sparsities]
  cells += [cell('quantize', 0.0, b) for b in sweep.bits]
  cells += [cell('prune_quantize', s, b) for s, b in sweep.prune_quantize]
  return cells


def check_sweep_config(sweep: ml_collections.ConfigDict) -> None:
  if not sweep.sizes:
    raise SweepError('sizes is empty; give at least one (layers, hidden) pair.')
  for size in sweep.sizes:
    if len(size) != 2 or any(not isinstance(v, int) or v <= 0 for v in size):
      raise SweepError(f'sizes entry {size!r} is invalid: give (layers, hidden) positive ints.')
  if sweep.pretrain_budget_s <= 0:
    raise SweepError(f'pretrain_budget_s={sweep.pretrain_budget_s!r} must be > 0 seconds.')
  for s in list(sweep.sparsities) + [s for s, _ in sweep.prune_quantize]:
    if not 0.0 < s < 1.0:
      raise SweepError(f'sparsity {s!r} in the grid is invalid: allowed (0, 1).')
  for b in list(sweep.bits) + [b for _, b in sweep.prune_quantize]:
    if not (isinstance(b, int) and 2 <= b <= 8):
      raise SweepError(f'bits {b!r} in the grid is invalid: allowed 2..8.')


def _claim_folder(workdir: Path, sweep: ml_collections.ConfigDict) -> None:
  path = workdir / SWEEP_FILE
  if path.exists():
    old = json.loads(path.read_text())
    if old != json.loads(sweep.to_json()):
      raise SweepError(f'{workdir} holds a sweep with other settings; use a new --workdir or '
                       f'the same config to resume it.')
    return
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(sweep.to_json(indent=2))
  os.replace(tmp, path)


def _stage(run_dir: Path, train_fn: Callable[[], Any]) -> dict[str, Any]:
  """Runs a training stage unless it already finished; returns its summary."""
  summary_path = run_dir / SUMMARY_FILE
  if summary_path.exists():
    return json.loads(summary_path.read_text())
  summary = train_fn().__dict__
  tmp = summary_path.with_suffix('.tmp')
  tmp.write_text(json.dumps(summary))
  os.replace(tmp, summary_path)
  return summary


def _append_result(workdir: Path, row: dict[str, Any]) -> None:
  with open(workdir / RESULTS_FILE, 'a') as f:
    f.write(json.dumps(row) + '\n')
    f.flush()
    os.fsync(f.fileno())


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | os.PathLike,
              progress: Callable[[str], None] = print) -> Path:
  """Runs (or resumes) the sweep in `workdir`; returns the results file."""
  check_sweep_config(sweep)
  workdir = Path(workdir).absolute()
  _claim_folder(workdir, sweep)
  first = pretrain_config(sweep, *sweep.sizes[0], tokenizer_path=None)
  tokenizer = train_or_load_tokenizer(first.data, str(workdir))
  done = {row['cell'] for row in load_results(workdir)}
  cells = compression_cells(sweep)
  ft_task = finetune_config(sweep)
  task = classification.get_task(ft_task.task)
  majority = classification.majority_class_accuracy(ft_task.task, task.eval_splits[0],
                                                    ft_task.data_dir)
  for index, (layers, hidden) in enumerate(sweep.sizes, start=1):
    name = size_name(layers, hidden)
    run_dir = workdir / 'runs' / name
    tag = f'[{index}/{len(sweep.sizes)}] {name}'
    if all(f'{name}/{c["name"]}' in done for c in cells):
      progress(f'{tag}: all {len(cells)} cells done')
      continue
    pre_config = pretrain_config(sweep, layers, hidden, tokenizer.path)
    progress(f'{tag}: pretraining for {sweep.pretrain_budget_s:.0f} s of training time')
    pre = _stage(run_dir / 'pretrain', lambda: pretrain(pre_config, run_dir / 'pretrain'))
    progress(f'{tag}: pretrained {pre["step"]} steps, eval_loss {pre["eval_loss"]:.3f}; '
             f'fine-tuning')
    ft = _stage(run_dir / 'finetune',
                lambda: finetune(finetune_config(sweep), run_dir / 'pretrain',
                                 run_dir / 'finetune'))
    progress(f'{tag}: fine-tuned {ft["step"]} steps, accuracy {ft["eval_accuracy"]:.3f}; '
             f'evaluating {len(cells)} compression cells')
    for cell in cells:
      cell_id = f'{name}/{cell["name"]}'
      if cell_id in done:
        continue
      if cell['method'] == 'dense':
        target = run_dir / 'finetune'
      else:
        target = run_dir / 'compressed' / cell['name']
        if not target.exists():  # compress_checkpoint is atomic: an existing folder is whole
          compress_checkpoint(run_dir / 'finetune', cell['config'], target)
      result = evaluate_checkpoint(target)
      _append_result(workdir, {
          'cell': cell_id, 'model': name, 'layers': layers, 'hidden': hidden,
          'total_params': result['total_params'],
          'pretrain_budget_s': float(sweep.pretrain_budget_s),
          'pretrain_steps': pre['step'], 'pretrain_wall_s': pre['wall_time_s'],
          'pretrain_eval_loss': pre['eval_loss'],
          'method': cell['method'], 'sparsity': cell['sparsity'], 'bits': cell['bits'],
          'nonzero_params': result['nonzero_params'], 'stored_bytes': result['stored_bytes'],
          'dense_fp32_bytes': result['dense_fp32_bytes'],
          'accuracy': result['eval_accuracy'], 'eval_loss': result['eval_loss'],
          'task': result['task'], 'majority_accuracy': majority,
          # The task's primary metric, so claims and figures need not know the task.
          'metric_name': result['primary_metric'], 'metric': result[result['primary_metric']],
          'higher_is_better': result['primary_mode'] == 'max',
      })
      done.add(cell_id)
    progress(f'{tag}: done')
  return workdir / RESULTS_FILE
