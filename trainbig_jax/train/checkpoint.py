"""Run folders and Orbax checkpoints.

A run folder (WORKDIR) holds:
  config.json       the resolved config of the run
  tokenizer.model   the SentencePiece model (travels with every checkpoint)
  metrics.jsonl     one JSON object a line (see metrics.py)
  checkpoints/N/    Orbax steps with items 'state' (step, params, opt_state),
                    'data' (the data iterator's state) and 'progress' (training wall-clock
                    seconds and tokens so far)
Orbax writes each step into a temporary folder and renames it when complete, so an
interrupted save never shadows the previous good checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'  # fine-tuning keeps its most accurate evaluation here


class CheckpointError(ValueError):
  """A checkpoint named by the user is missing, incomplete or incompatible."""


def data_state_filename() -> str:
  """The file of this process's data-iterator state inside a step's 'data' item.

  Each process reads its own documents, so each has its own iterator state. Orbax's JSON
  handler writes from the primary process only; with several processes every one writes its
  own file instead. A single process keeps Orbax's default name.
  """
  count = jax.process_count()
  return 'metadata' if count == 1 else f'process_{jax.process_index()}-of-{count}.json'


def manager(workdir: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  # Synchronous saves: the time they take is excluded from the training clock, which an
  # overlapping async save would blur.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  every_process = ocp.options.MultiprocessingOptions(primary_host=None)
  handlers = {
      'state': ocp.StandardCheckpointHandler(),
      'data': ocp.JsonCheckpointHandler(filename=data_state_filename(),
                                        multiprocessing_options=every_process),
      'progress': ocp.JsonCheckpointHandler(),  # the same on every process: primary writes
  }
  return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                               item_names=tuple(handlers), item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         progress: dict[str, Any]) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      progress=ocp.args.JsonSave(progress)), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, target_state: Any, step: int | None = None):
  """(state, data_state, progress) of `step` (default latest), or None when there is none."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  data_dir = Path(mngr.directory) / str(step) / 'data'
  if data_dir.is_dir() and not (data_dir / data_state_filename()).exists():
    written = sorted(p.name for p in data_dir.iterdir() if p.name != 'commit_success.txt')
    raise CheckpointError(
        f'{data_dir.parent} holds the data position of another number of processes '
        f'({", ".join(written) or "none"}); resume it with as many processes as wrote it, '
        'or use a new --workdir.')
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target_state),
      data=ocp.args.JsonRestore(),
      progress=ocp.args.JsonRestore()))
  return restored['state'], restored['data'], restored['progress']


# Settings a resumed run must share with the run it continues (None: the whole section). The
# rest may change on resume, e.g. train.total_steps or budget_s to extend a run. A different
# batch size was accepted silently: the run went on as another experiment (steps, schedule and
# curves of another batch size) than the one its config.json records.
RESUME_FIXED = {'model': None, 'data': None, 'train': ('batch_size',)}


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Saves the run's config; a resumed run must keep the settings in RESUME_FIXED."""
  path = Path(workdir) / CONFIG_FILE
  if path.exists():
    old = json.loads(path.read_text())
    new = json.loads(config.to_json())
    for section, fixed in RESUME_FIXED.items():
      keys = fixed or set(old.get(section, {})) | set(new.get(section, {}))
      diffs = sorted(k for k in keys
                     if old.get(section, {}).get(k) != new.get(section, {}).get(k))
      if diffs:
        raise CheckpointError(
            f'{workdir} holds a run with other {section} settings ({", ".join(diffs)}); '
            f'use a new --workdir or the same config.')
  # Every process writes the same file: a temporary name of its own keeps the renames atomic.
  tmp = path.with_suffix(f'.json.tmp{jax.process_index()}')
  tmp.write_text(config.to_json(indent=2))
  os.replace(tmp, path)


def read_config(run_dir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = Path(run_dir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f'{run_dir} is not a trainbig run folder: it has no {CONFIG_FILE}.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def params_step_dir(run_dir: str | os.PathLike) -> Path:
  """The checkpoint step folder whose parameters stand for a run.

  A fine-tuning run's best evaluation (best/N) when it has one, else the newest complete
  step under checkpoints/. The path is absolute: Orbax reads no metadata under a relative
  one (it returns None).
  """
  for sub in (BEST_DIR, CHECKPOINT_DIR):
    root = Path(run_dir).absolute() / sub
    steps = ocp.utils.checkpoint_steps(root) if root.exists() else []
    if steps:
      return root / str(max(steps))
  raise CheckpointError(f'{run_dir} has no complete checkpoint under '
                        f'{Path(run_dir) / CHECKPOINT_DIR}.')


def restore_params(run_dir: str | os.PathLike) -> dict[str, Any]:
  """The parameter tree (host numpy arrays) that stands for a run (see params_step_dir).

  Reads only what is stored, without needing the optimizer that wrote it, so any Orbax user
  can do the same.
  """
  state_dir = params_step_dir(run_dir) / 'state'
  if not state_dir.exists():
    raise CheckpointError(f'{state_dir.parent} is not a complete checkpoint: no state item.')
  # Orbax warns that a step's item folder has no checkpoint-level metadata file, which is
  # how CheckpointManager lays items out; the warning says nothing to the user.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return _restore_params(state_dir)
  finally:
    logging.set_verbosity(verbosity)


def _restore_params(state_dir: Path) -> dict[str, Any]:
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata.tree
    restore_args = _numpy_restore_args(tree)
    state = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return state['params']


def _numpy_restore_args(tree):
  import numpy as np
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                      is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
