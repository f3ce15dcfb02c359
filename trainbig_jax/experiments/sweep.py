"""`trainbig sweep`: every model size under one budget, fine-tuned, compressed, evaluated.

The budget is training wall-clock seconds (`budget='time'`, the paper's measure), analytic
training FLOPs (`'flops'`) or tokens (`'tokens'`); the last two are the same on every machine.
With `seeds=N` every cell is run N times (seed k: initialisation, data order and masking).

Layout of a sweep folder DIR:
  sweep.json                    the sweep config (a rerun must use the same one)
  tokenizer.model               shared by every size (trained once on the pretraining data)
  runs/<size>/pretrain/         a pretraining run (metrics.jsonl, checkpoints, ...)
  runs/<size>/finetune/         its fine-tuning run
  runs/<size>/compressed/<cell> compressed checkpoints
  runs/<size>/seed<k>/...       the same for seed k >= 1 (seed 0 keeps the folders above)
  machine.json                  this machine's measured matmul rate (measured once per sweep)
  examples/<cell id>.npz        per-example evaluation sums of a cell ('loss', 'weight',
                                'correct' arrays over the same validation examples in the
                                same order for every cell; a translation's also 'bleu', each
                                decoded sentence's BLEU statistics); examples/<size>[/seed<k>]/
                                pretrain.npz the same for the final pretraining checkpoint
                                (a translation sweep's is its dense cell's file)
  results.jsonl                 one line per evaluated cell (see experiments/results.py);
                                `examples` and `pretrain_examples` name its .npz files
Every stage is resumable: finished runs carry a summary.json, finished cells a line in
results.jsonl, and a rerun after an interruption does only what is missing.
In a multi-process job every process trains and evaluates; process 0 alone writes the shared
files (sweep.json, the tokenizer, summaries, compressed checkpoints, results rows) and the
others wait for it where they then read them. A .npz file is
written (atomically) before the results line that names it, so no line names a missing file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from trainbig_jax import files, tasks
from trainbig_jax.compress import quantize
from trainbig_jax.compress.checkpoints import compress_checkpoint
from trainbig_jax.configs import compress as compress_configs
from trainbig_jax.configs import finetune as finetune_configs
from trainbig_jax.configs import pretrain as pretrain_configs
from trainbig_jax.configs import translate as translate_configs
from trainbig_jax.data import classification
from trainbig_jax.data.tokenizer import train_or_load_tokenizer
from trainbig_jax.evaluate import evaluate_checkpoint
from trainbig_jax.experiments.results import (EXAMPLES_DIR, MACHINE_FILE, RESULTS_FILE,
                                              load_results)
from trainbig_jax.models.encoder import DTYPES
from trainbig_jax.models.layout import TOKEN_EMBEDDING
from trainbig_jax.tasks import mlm as mlm_task
from trainbig_jax.tasks.classify import finetune
from trainbig_jax.tasks.mlm import pretrain
from trainbig_jax.train import distributed, runlock
from trainbig_jax.train.flops import matmul_flops_per_s

SWEEP_FILE = 'sweep.json'
SUMMARY_FILE = 'summary.json'
BUDGET_KINDS = ('time', 'flops', 'tokens')
# What a sweep's sizes are trained for: an encoder pretrained then fine-tuned to classify, or
# an encoder-decoder trained to translate (its first stage is the whole training).
SWEEP_TASKS = ('classify', 'translate')
# Evaluations over a pretraining budget (evenly spaced in time, FLOPs or tokens).
EVALS_PER_BUDGET = 12


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


def budget_value(sweep: ml_collections.ConfigDict) -> float:
  """The pretraining budget in its own unit: seconds, FLOPs or tokens."""
  return float({'time': sweep.pretrain_budget_s, 'flops': sweep.pretrain_budget_flops,
                'tokens': sweep.pretrain_budget_tokens}[sweep.budget])


def run_dir_of(workdir: Path, name: str, seed: int) -> Path:
  return workdir / 'runs' / name / (f'seed{seed}' if seed else '')


def cell_id_of(name: str, seed: int, cell: str) -> str:
  return f'{name}/seed{seed}/{cell}' if seed else f'{name}/{cell}'


def pretrain_config(sweep: ml_collections.ConfigDict, layers: int, hidden: int,
                    tokenizer_path: str, seed: int = 0, tokenizer=None
                    ) -> ml_collections.ConfigDict:
  """The pretraining config of one size and seed. A FLOP budget needs the `tokenizer` (the
  model's vocabulary decides its FLOPs per step)."""
  translating = _task_kind(sweep) == 'translate'
  configs = translate_configs if translating else pretrain_configs
  c = configs.get_config(sweep.pretrain_preset)
  _override(c, sweep.pretrain_overrides.to_dict(), 'pretrain_overrides')
  c.preset = size_name(layers, hidden)
  configs.set_size(c, layers, hidden, heads=sweep.heads or None)
  c.seed = c.seed + seed
  c.train.total_steps = sweep.pretrain_total_steps
  c.data.tokenizer_path = tokenizer_path
  c.train.eval_every = 10 ** 9
  if sweep.budget == 'time':
    c.train.budget_s = float(sweep.pretrain_budget_s)
    # Evaluations evenly spaced in time whatever the model's speed.
    c.train.eval_every_s = float(sweep.pretrain_budget_s) / EVALS_PER_BUDGET
    return c
  c.train.budget_s = 0.0  # the FLOP or token count alone decides
  c.train.eval_every_s = 0.0
  if sweep.budget == 'flops':
    c.train.budget_flops = float(sweep.pretrain_budget_flops)
    per_step = (mlm_task.flops_per_step(mlm_task.build_model(c, tokenizer), c)
                if tokenizer is not None else None)
  else:
    c.train.budget_tokens = float(sweep.pretrain_budget_tokens)
    per_step = c.train.batch_size * c.data.seq_len  # an upper bound: packing pads little
  if per_step:  # evaluations evenly spaced in steps, as many as under a time budget
    c.train.eval_every = max(1, int(budget_value(sweep) / per_step) // EVALS_PER_BUDGET)
  return c


def _task_kind(sweep: ml_collections.ConfigDict) -> str:
  return sweep.get('task_kind', 'classify')


def finetune_config(sweep: ml_collections.ConfigDict, seed: int = 0
                    ) -> ml_collections.ConfigDict:
  c = finetune_configs.get_config(sweep.finetune_preset)
  _override(c, sweep.finetune_overrides.to_dict(), 'finetune_overrides')
  c.seed = c.seed + seed
  return c


def compression_cells(sweep: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The compression grid: (name, method, sparsity, bits, compress config) per cell."""
  def cell(method, sparsity, bits):
    c = compress_configs.get_config(sweep.compress_preset)
    c.prune.sparsity, c.quant.bits = float(sparsity), int(bits)
    if sweep.quantize_embeddings:
      c.quant.include = tuple(c.quant.include) + (TOKEN_EMBEDDING[_task_kind(sweep)],)
    name = {'dense': 'dense', 'prune': f'prune{round(sparsity * 100)}',
            'quantize': f'int{bits}',
            'prune_quantize': f'prune{round(sparsity * 100)}_int{bits}'}[method]
    return dict(name=name, method=method, sparsity=float(sparsity), bits=int(bits), config=c)
  cells = [cell('dense', 0.0, quantize.FLOAT_BITS)]
  cells += [cell('prune', s, quantize.FLOAT_BITS) for s in sweep.sparsities]
  cells += [cell('quantize', 0.0, b) for b in sweep.bits]
  cells += [cell('prune_quantize', s, b) for s, b in sweep.prune_quantize]
  return cells


def check_sweep_config(sweep: ml_collections.ConfigDict) -> None:
  if not sweep.sizes:
    raise SweepError('sizes is empty; give at least one (layers, hidden) pair.')
  for size in sweep.sizes:
    if len(size) != 2 or any(not isinstance(v, int) or v <= 0 for v in size):
      raise SweepError(f'sizes entry {size!r} is invalid: give (layers, hidden) positive ints.')
  if _task_kind(sweep) not in SWEEP_TASKS:
    raise SweepError(f'task_kind={_task_kind(sweep)!r} is invalid; allowed: '
                     f'{", ".join(SWEEP_TASKS)}.')
  if _task_kind(sweep) == 'translate' and sweep.budget == 'flops':
    raise SweepError("budget='flops' counts the encoder's analytic FLOPs; a translation sweep "
                     "takes budget='time' or 'tokens'.")
  if sweep.budget not in BUDGET_KINDS:
    raise SweepError(f'budget={sweep.budget!r} is invalid; allowed: {", ".join(BUDGET_KINDS)}.')
  field = {'time': 'pretrain_budget_s', 'flops': 'pretrain_budget_flops',
           'tokens': 'pretrain_budget_tokens'}[sweep.budget]
  value = sweep[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    unit = {'time': 'seconds', 'flops': 'FLOPs', 'tokens': 'tokens'}[sweep.budget]
    raise SweepError(f'{field}={value!r} must be > 0 {unit} (budget={sweep.budget!r}).')
  if isinstance(sweep.seeds, bool) or not isinstance(sweep.seeds, int) or sweep.seeds < 1:
    raise SweepError(f'seeds={sweep.seeds!r} is invalid: a positive integer (runs per cell).')
  for s in list(sweep.sparsities) + [s for s, _ in sweep.prune_quantize]:
    if not 0.0 < s < 1.0:
      raise SweepError(f'sparsity {s!r} in the grid is invalid: allowed (0, 1).')
  for b in list(sweep.bits) + [b for _, b in sweep.prune_quantize]:
    try:
      quantize.check_bits(b)
    except ValueError as e:
      raise SweepError(f'bits {b!r} in the grid is invalid: {e}') from None


def _claim_folder(workdir: Path, sweep: ml_collections.ConfigDict) -> None:
  path = workdir / SWEEP_FILE
  if path.exists():
    old = json.loads(path.read_text())
    if old != json.loads(sweep.to_json()):
      raise SweepError(f'{workdir} holds a sweep with other settings; use a new --workdir or '
                       f'the same config to resume it.')
    return
  workdir.mkdir(parents=True, exist_ok=True)
  files.atomic_write(path, sweep.to_json(indent=2))


def _stage(run_dir: Path, train_fn: Callable[[], Any]) -> dict[str, Any]:
  """Runs a training stage unless it already finished; returns its summary."""
  summary_path = run_dir / SUMMARY_FILE
  if summary_path.exists():
    return json.loads(summary_path.read_text())
  summary = train_fn().__dict__
  if jax.process_index() == 0:  # every process trained; one records it
    files.atomic_write(summary_path, json.dumps(summary))
  return summary


def _write_examples(workdir: Path, relative: str, values: dict[str, Any]) -> str:
  """Writes per-example arrays to workdir/relative atomically (process 0); returns `relative`."""
  if jax.process_index() == 0:
    path = workdir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **values)
    files.atomic_write(path, buffer.getvalue())
  return relative


def measure_machine(workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
  """This machine's sustained matmul rate, measured once per sweep (about a second) and kept
  in machine.json, so FLOPs can be read as seconds on another machine."""
  path = workdir / MACHINE_FILE
  if path.exists():
    return json.loads(path.read_text())
  device = jax.devices()[0]
  n = 512 if device.platform == 'cpu' else 4096
  rate = matmul_flops_per_s(n, DTYPES['float32'], seconds=1.0)
  machine = {'matmul_flops_per_s': rate, 'matmul_size': n, 'matmul_dtype': 'float32',
             'device_kind': device.device_kind, 'platform': device.platform,
             'device_count': jax.device_count(), 'jax_version': jax.__version__}
  progress(f'matmul rate on {jax.device_count()} x {device.device_kind}: '
           f'{rate / 1e9:.3g} GFLOP/s (fp32, {n}^2)')
  if jax.process_index() == 0:
    files.atomic_write(path, json.dumps(machine, indent=2))
  return machine


def _append_result(workdir: Path, row: dict[str, Any]) -> None:
  if jax.process_index() != 0:  # every process evaluated the cell; one row records it
    return
  files.append_jsonl(workdir / RESULTS_FILE, row)  # a line torn by a kill is cut off first


@runlock.holds_run_folder(lambda sweep, workdir, *args, **kwargs: workdir)
def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | os.PathLike,
              progress: Callable[[str], None] = print) -> Path:
  """Runs (or resumes) the sweep in `workdir`; returns the results file."""
  check_sweep_config(sweep)
  workdir = Path(workdir).absolute()
  first = pretrain_config(sweep, *sweep.sizes[0], tokenizer_path=None)
  translating = _task_kind(sweep) == 'translate'
  train_task = tasks.task_of(first)
  # Process 0 claims the folder, trains the shared tokenizer, reads the data and measures the
  # machine first; the others then find what it wrote instead of racing it for the same files.
  with distributed.primary_first('trainbig:sweep_prepare'):
    _claim_folder(workdir, sweep)
    tokenizer = train_or_load_tokenizer(first.data, str(workdir))
    majority = None  # a translation has no majority class
    if not translating:
      ft_task = finetune_config(sweep)
      majority = classification.majority_class_accuracy(
          ft_task.task, classification.get_task(ft_task.task).eval_splits[0], ft_task.data_dir)
    machine = measure_machine(workdir, progress)
  done = {row['cell'] for row in load_results(workdir)}
  cells = compression_cells(sweep)
  budget = {'time': f'{sweep.pretrain_budget_s:.0f} s of training time',
            'flops': f'{sweep.pretrain_budget_flops:.3g} training FLOPs',
            'tokens': f'{sweep.pretrain_budget_tokens:.3g} tokens'}[sweep.budget]
  runs = [(size, seed) for size in sweep.sizes for seed in range(sweep.seeds)]
  for index, ((layers, hidden), seed) in enumerate(runs, start=1):
    name = size_name(layers, hidden)
    run_dir = run_dir_of(workdir, name, seed)
    tag = f'[{index}/{len(runs)}] {name}' + (f' seed {seed}' if sweep.seeds > 1 else '')
    if all(cell_id_of(name, seed, c['name']) in done for c in cells):
      progress(f'{tag}: all {len(cells)} cells done')
      continue
    pre_config = pretrain_config(sweep, layers, hidden, tokenizer.path, seed, tokenizer)
    progress(f'{tag}: {"training" if translating else "pretraining"} for {budget}')
    pre = _stage(run_dir / 'pretrain',
                 lambda: (train_task.train if translating else pretrain)(pre_config,
                                                                         run_dir / 'pretrain'))
    progress(f'{tag}: {"trained" if translating else "pretrained"} {pre["step"]} steps, '
             f'eval_loss {pre["eval_loss"]:.3f}' + ('' if translating else '; fine-tuning'))
    # The final training checkpoint's per-example values. A translation run is itself the
    # dense cell, whose evaluation writes them; an MLM run is evaluated here.
    pre_examples = (f'{EXAMPLES_DIR}/{cell_id_of(name, seed, "dense")}.npz' if translating
                    else f'{EXAMPLES_DIR}/{cell_id_of(name, seed, "pretrain")}.npz')
    if not translating and not (workdir / pre_examples).exists():
      _write_examples(workdir, pre_examples,
                      evaluate_checkpoint(run_dir / 'pretrain', per_example=True)['per_example'])
    source = run_dir / 'pretrain'  # what the cells compress: the translation run itself, or
    if not translating:            # the classifier fine-tuned from the pretrained encoder
      source = run_dir / 'finetune'
      ft = _stage(source, lambda: finetune(finetune_config(sweep, seed), run_dir / 'pretrain',
                                           source))
      progress(f'{tag}: fine-tuned {ft["step"]} steps, accuracy {ft["eval_accuracy"]:.3f}')
    progress(f'{tag}: evaluating {len(cells)} compression cells')
    for cell in cells:
      cell_id = cell_id_of(name, seed, cell['name'])
      if cell_id in done:
        continue
      if cell['method'] == 'dense':
        target = source
      else:
        target = run_dir / 'compressed' / cell['name']
        with distributed.primary_first(f'trainbig:sweep_compress:{cell_id}'):
          if not target.exists():  # compress_checkpoint is atomic: an existing folder is whole
            compress_checkpoint(source, cell['config'], target)
      result = evaluate_checkpoint(target, per_example=True)
      examples = _write_examples(workdir, f'{EXAMPLES_DIR}/{cell_id}.npz',
                                 result.pop('per_example'))
      _append_result(workdir, {
          'cell': cell_id, 'model': name, 'layers': layers, 'hidden': hidden, 'seed': seed,
          'total_params': result['total_params'],
          'budget_kind': sweep.budget, 'pretrain_budget': budget_value(sweep),
          'pretrain_budget_s': float(sweep.pretrain_budget_s),
          'pretrain_steps': pre['step'], 'pretrain_wall_s': pre['wall_time_s'],
          'pretrain_tokens': pre.get('tokens'), 'pretrain_flops': pre.get('flops'),
          'pretrain_stopped_by': pre.get('stopped_by'),
          'matmul_flops_per_s': machine['matmul_flops_per_s'],
          'pretrain_eval_loss': pre['eval_loss'],
          'examples': examples, 'pretrain_examples': pre_examples,
          # What pretrain_examples score the training run by (claim 1): MLM loss, or BLEU.
          'pretrain_metric_name': 'eval_bleu' if translating else 'eval_loss',
          'method': cell['method'], 'sparsity': cell['sparsity'], 'bits': cell['bits'],
          'nonzero_params': result['nonzero_params'], 'stored_bytes': result['stored_bytes'],
          'dense_fp32_bytes': result['dense_fp32_bytes'],
          'accuracy': result['eval_accuracy'],
          # Every named evaluation metric (eval_loss; eval_bleu and eval_chrf for translation).
          **{k: v for k, v in result.items()
             if k.startswith('eval_') and k not in ('eval_examples', 'eval_seconds')},
          'task': result['task'], 'majority_accuracy': majority,
          # The task's primary metric, so claims and figures need not know the task.
          'metric_name': result['primary_metric'], 'metric': result[result['primary_metric']],
          'higher_is_better': result['primary_mode'] == 'max',
      })
      done.add(cell_id)
    progress(f'{tag}: done')
  return workdir / RESULTS_FILE
