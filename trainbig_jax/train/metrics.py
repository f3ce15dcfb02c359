"""Metric writers: WORKDIR/metrics.jsonl (one JSON object a line) and TensorBoard events.

Train lines: step, wall_time_s, tokens, train_loss (+ learning_rate, grad_norm, ...).
Eval lines:  step, wall_time_s and the task's named eval metrics (eval_loss, eval_accuracy,
             and e.g. eval_bleu; see trainbig_jax/tasks).
wall_time_s is training time only: evaluation, checkpointing and compilation are excluded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = 'metrics.jsonl'


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All complete lines of a metrics file (a torn last line from a crash is skipped)."""
  rows = []
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  if not path.exists():
    return rows
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


class MetricWriter:
  """Appends metrics to JSONL (flushed each write) and to TensorBoard, process 0 only."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self.path = Path(workdir) / METRICS_FILE
    self._tb = None
    if not enabled:
      return
    if resume_step is not None:
      self._truncate_after(resume_step)
    elif self.path.exists():
      self.path.unlink()  # a fresh run (no checkpoint) starts a fresh curve
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(Path(workdir) / 'tb'), flush_secs=30)
    except ImportError:  # TensorBoard events are optional; the JSONL file is the record
      self._tb = None
    self._file = open(self.path, 'a')

  def _truncate_after(self, step: int) -> None:
    """On resume, drop lines logged after the restored checkpoint: they will be redone."""
    rows = [r for r in read_metrics(self.path) if r.get('step', 0) <= step]
    tmp = self.path.with_suffix('.jsonl.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    os.replace(tmp, self.path)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {k: (float(v) if hasattr(v, 'dtype') or isinstance(v, float) else v)
           for k, v in row.items()}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step' and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, row['step'])

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
