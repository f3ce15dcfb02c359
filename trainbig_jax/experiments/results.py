"""Reading a sweep's outputs: the per-cell results table and the pretraining eval curves.

A sweep directory holds (written by `trainbig sweep`):
  results.jsonl                        one JSON object per evaluated cell (model x compression)
  runs/<model>/pretrain/metrics.jsonl  one JSON object per logged step; eval lines carry eval_loss
  sweep.json                           the sweep's config (optional; only used for labels)

A sweep may be interrupted mid-write, so a final line that is not valid JSON is ignored; a
broken line anywhere else means the file is damaged and is reported with its line number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from trainbig_jax import files

RESULTS_FILE = 'results.jsonl'
EXAMPLES_DIR = 'examples'  # per-example evaluation sums, one .npz per cell (sweep.py)
MACHINE_FILE = 'machine.json'  # the sweep machine's measured matmul rate
SWEEP_CONFIG_FILE = 'sweep.json'

# Keys every results.jsonl line must have: the claims and the report read all of them.
REQUIRED_KEYS = (
    'model', 'layers', 'hidden', 'total_params', 'pretrain_budget_s', 'pretrain_steps',
    'pretrain_wall_s', 'pretrain_eval_loss', 'method', 'sparsity', 'bits', 'nonzero_params',
    'stored_bytes', 'dense_fp32_bytes',
)
# The quality of a cell: the task's primary metric, its name and direction. Rows from
# classification sweeps written before these keys existed carry only `accuracy`, which then
# stands for them (metric_name 'eval_accuracy', higher is better).
METRIC_KEYS = ('metric', 'metric_name', 'higher_is_better')
# Keys that may be absent (older or hand-made files); filled with these defaults.
OPTIONAL_KEYS = ('eval_loss', 'cell')
METHODS = ('dense', 'prune', 'quantize', 'prune_quantize')


class ResultsError(ValueError):
  """A sweep output file is missing or malformed."""


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
  try:
    return files.read_jsonl(path)
  except files.JsonlError as e:
    raise ResultsError(str(e)) from None


def _default_cell_id(row: dict[str, Any]) -> str:
  return f"{row['model']}/{row['method']}/s{row['sparsity']:g}/b{row['bits']}"


def load_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
  """All cells of `sweep_dir/results.jsonl`, in file order.

  Every line must carry REQUIRED_KEYS and either METRIC_KEYS or `accuracy` (else
  ResultsError naming the file, line and key); without METRIC_KEYS, `accuracy` is the metric.
  `eval_loss` defaults to None and `cell` to 'model/method/s<sparsity>/b<bits>'. Extra keys
  are kept untouched. If a cell id appears twice (a resumed sweep re-evaluated it), the later
  line wins, since it is the newer measurement. A missing file gives an empty list so that a
  report can still be drawn from the curves of a sweep interrupted before any evaluation.
  """
  path = Path(sweep_dir) / RESULTS_FILE
  if not path.exists():
    return []
  by_cell: dict[str, dict[str, Any]] = {}
  for lineno, row in _read_jsonl(path):
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if 'metric' not in row and 'accuracy' not in row:
      missing.append('accuracy')
    if missing:
      raise ResultsError(f'{path}, line {lineno}: missing key {missing[0]!r}'
                         + (f' (and {", ".join(map(repr, missing[1:]))})' if missing[1:] else '')
                         + f'; every line needs: {", ".join(REQUIRED_KEYS)} and accuracy '
                         f'(or {", ".join(METRIC_KEYS)}).')
    row = dict(row)
    if 'metric' not in row:
      row.update(metric=row['accuracy'], metric_name='eval_accuracy', higher_is_better=True)
    for k in ('total_params', 'sparsity', 'bits', 'nonzero_params', 'stored_bytes', 'metric'):
      v = row[k]
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ResultsError(f'{path}, line {lineno}: key {k!r} must be a finite number, '
                           f'got {v!r}.')
    row.setdefault('eval_loss', None)
    if not row.get('cell'):
      row['cell'] = _default_cell_id(row)
    by_cell.pop(row['cell'], None)  # re-insert so the order is that of the newest line
    by_cell[row['cell']] = row
  return list(by_cell.values())


def load_curves(sweep_dir: str | Path) -> dict[str, dict[str, list[float]]]:
  """Pretraining eval curves: {model: {'step': [...], 'wall_time_s': [...], 'eval_loss': [...]}}.

  Read from `sweep_dir/runs/<model>/pretrain/metrics.jsonl`; eval lines are those with a
  non-null `eval_loss` (train lines and other keys are ignored). Points are sorted by step;
  when a step was logged twice (a resumed run), the later line wins. Models without a
  metrics file or without any eval line are left out.
  """
  curves: dict[str, dict[str, list[float]]] = {}
  runs = Path(sweep_dir) / 'runs'
  if not runs.is_dir():
    return curves
  for metrics in sorted(runs.glob('*/pretrain/metrics.jsonl')):
    model = metrics.parent.parent.name
    by_step: dict[int, tuple[float, float]] = {}
    for lineno, rec in _read_jsonl(metrics):
      if rec.get('eval_loss') is None:
        continue
      if 'step' not in rec or 'wall_time_s' not in rec:
        key = 'step' if 'step' not in rec else 'wall_time_s'
        raise ResultsError(f'{metrics}, line {lineno}: eval line without {key!r}.')
      by_step[int(rec['step'])] = (float(rec['wall_time_s']), float(rec['eval_loss']))
    if not by_step:
      continue
    steps = sorted(by_step)
    curves[model] = {
        'step': steps,
        'wall_time_s': [by_step[s][0] for s in steps],
        'eval_loss': [by_step[s][1] for s in steps],
    }
  return curves


def load_examples(sweep_dir: str | Path, relative: str | None) -> dict[str, Any] | None:
  """A cell's per-example values {'loss', 'weight', 'correct'} (arrays; a translation's also
  'bleu', [sentences, 10] BLEU statistics), or None when the row
  names no file (sweeps written before per-example data were kept)."""
  if not relative:
    return None
  path = Path(sweep_dir) / relative
  try:
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise ResultsError(f'{path}: per-example file named in {RESULTS_FILE} cannot be read '
                       f'({e}).') from None


def load_machine(sweep_dir: str | Path) -> dict[str, Any]:
  """machine.json of a sweep (its measured matmul rate), or {} when absent."""
  path = Path(sweep_dir) / MACHINE_FILE
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except (OSError, json.JSONDecodeError):
    return {}


def load_sweep_config(sweep_dir: str | Path) -> dict[str, Any]:
  """`sweep_dir/sweep.json` as a dict, or {} when absent or unreadable (labels only)."""
  path = Path(sweep_dir) / SWEEP_CONFIG_FILE
  try:
    cfg = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, json.JSONDecodeError):
    return {}
  return cfg if isinstance(cfg, dict) else {}
