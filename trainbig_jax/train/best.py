"""Keeps the parameters of the best evaluation so far in WORKDIR/best (Orbax, keep 1).

"Best" is the task's primary metric in its direction ('max': higher is better, 'min': lower
is better). Downstream commands (compress, eval) read WORKDIR/best when it exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from trainbig_jax.train import checkpoint

MODES = ('max', 'min')


class BestCheckpoint:
  """Saves (params, eval metrics) whenever `metric` improves, from `min_step` on."""

  def __init__(self, workdir: Path, metric: str, mode: str, min_step: int = 0):
    if mode not in MODES:
      raise ValueError(f'mode={mode!r} is invalid; allowed: {", ".join(MODES)}.')
    self.metric, self.min_step = metric, min_step
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False,
        best_fn=lambda m: m[metric], best_mode=mode)
    self.mngr = ocp.CheckpointManager(Path(workdir).absolute() / checkpoint.BEST_DIR,
                                      options=options, item_names=('state', 'metrics'))

  def consider(self, step: int, state: Any, metrics: dict[str, float]) -> None:
    if step < self.min_step or step in self.mngr.all_steps():
      return
    self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'params': state.params}),
        metrics=ocp.args.JsonSave(metrics)), metrics=metrics)
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.close()
