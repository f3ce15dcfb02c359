"""Run folders and Orbax checkpoints.

A run folder (WORKDIR) holds:
  config.json       the resolved config of the run
  tokenizer.model   the SentencePiece model (travels with every checkpoint)
  metrics.jsonl     one JSON object a line (see metrics.py)
  checkpoints/N/    Orbax steps with items 'state' (step, params, opt_state),
                    'data' (the position in the job's data stream, the same on every
                    process) and 'progress' (training wall-clock seconds and tokens so far)
A run resumes on any number of processes and any mesh: the state is restored onto the new
run's shardings, and the data position does not depend on the process count.
Orbax writes each step into a temporary folder and renames it when complete, so an
interrupted save never shadows the previous good checkpoint. A step that fails to restore
(a truncated, deleted or altered file) is moved to damaged_checkpoints/ with a warning and
training resumes from the newest one that restores.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging
import orbax.checkpoint as ocp

from trainbig_jax import files
from trainbig_jax.train import distributed
from trainbig_jax.models import layer_stack

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
BEST_DIR = 'best'  # fine-tuning keeps its most accurate evaluation here


class CheckpointError(ValueError):
  """A checkpoint named by the user is missing, incomplete or incompatible."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (no space left, no permission, ...)."""


# The data item's file: Orbax's JSON default, written by the primary process. The data
# position is that of the whole job's stream (data/global_batches.py), the same on every
# process, so a run resumes on any process count.
DATA_STATE_FILE = 'metadata'
# Earlier multi-process runs saved one data position per process under these names.
_PER_PROCESS_DATA_STATE = re.compile(r'process_(\d+)-of-(\d+)\.json')


def manager(workdir: str | os.PathLike, keep: int = 3) -> ocp.CheckpointManager:
  # Synchronous saves: the time they take is excluded from the training clock, which an
  # overlapping async save would blur.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  handlers = {
      'state': ocp.StandardCheckpointHandler(),  # restored onto the target's shardings
      # The same on every process: the primary writes them.
      'data': ocp.JsonCheckpointHandler(filename=DATA_STATE_FILE),
      'progress': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                               item_names=tuple(handlers), item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         progress: dict[str, Any]) -> None:
  previous = mngr.latest_step()
  # Before the save, not after it fails: the reports of its abandoned writes can come before
  # the failure reaches the except clause below.
  ignore_abandoned_writes()
  # A failed save is reported below in one line; Orbax would also log it with its traceback.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        progress=ocp.args.JsonSave(progress)), force=True)
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  # disk full, permissions, ...
    kept = (f'checkpoint step {previous} is intact' if previous is not None
            else 'no earlier checkpoint exists')
    raise CheckpointSaveError(
        f'Saving checkpoint step {step} in {mngr.directory} failed ({failure_gist(e)}); '
        f'{kept}: free space or fix permissions, then rerun to resume.') from None
  finally:
    logging.set_verbosity(verbosity)


def restore(mngr: ocp.CheckpointManager, target_state: Any, step: int | None = None):
  """(state, data_state, progress) of `step`, or None when there is none.

  Without `step`: the newest step that restores. A newer one that fails to (a torn, deleted
  or altered file) is moved aside to WORKDIR/damaged_checkpoints/ with a warning naming it,
  so the run resumes from the one before and can save that step number again.
  """
  # Before the restore, not after it fails: the abandoned reads' reports can come first.
  ignore_abandoned_reads()
  if step is not None:
    return _restore_step(mngr, target_state, step)
  while (latest := mngr.latest_step()) is not None:
    try:
      return _restore_step(mngr, target_state, latest)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # whatever the damage, fall back
      damaged = Path(mngr.directory) / str(latest)
      aside = _set_aside(damaged)
      reason = failure_gist(e)
      logging.warning('Checkpoint %s does not restore (%s): moved to %s; resuming from the '
                      'previous checkpoint.', damaged, reason, aside)
      mngr.reload()
  return None


def failure_gist(e: BaseException) -> str:
  """The gist of a restore failure: TensorStore's status line, else the first 200 characters."""
  text = ' '.join(str(e).split())
  system = re.search(r'File too large|No space left on device|Permission denied|'
                     r'Read-only file system|Disk quota exceeded', text)
  if system:
    return system.group(0)
  status = re.search(r'\b(DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|OUT_OF_RANGE'
                     r'|INTERNAL|UNKNOWN): [^\[{]{0,160}', text)
  return (status.group(0).strip() if status else text[:200]) or type(e).__name__


def ignore_abandoned_reads() -> None:
  """Silences the 'Event loop is closed' tracebacks that follow a failed Orbax restore.

  Orbax runs a restore's reads in an event loop that it closes as soon as one read fails;
  the other reads, still running in TensorStore's threads, then complete into the closed
  loop, and TensorStore prints each such error through sys.excepthook. They are harmless
  (their results are no longer wanted), so that one error is dropped; every other one still
  reaches the previous hook. Installed before a restore starts: the first reports can be
  printed while the failure is still on its way to the caller (and interleave with the
  one-line error that follows), as on Python 3.12 with 8 devices.
  """
  if getattr(sys.excepthook, 'ignores_abandoned_reads', False):
    return
  abandoned = lambda exc: isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not abandoned(exc):
      previous_excepthook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not abandoned(unraisable.exc_value):
      previous_unraisablehook(unraisable)
  excepthook.ignores_abandoned_reads = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def ignore_abandoned_writes() -> None:
  """Silences the reports of the other writes of a failed Orbax save; the save's own error
  is what the user gets, in one line.

  When one write of a save fails (disk full, no permission), Orbax stops waiting for the
  others: those still running in TensorStore's threads end in the save's closed event loop
  (see ignore_abandoned_reads), and those already failed are asyncio tasks and futures
  nobody awaits, which asyncio logs ('Task exception was never retrieved', '_GatheringFuture
  exception ...') whenever the garbage collector frees them, often after the one-line error.
  Only those whose error names a step's temporary folder (an unfinished save) are dropped;
  every other asyncio error is logged.
  """
  ignore_abandoned_reads()
  asyncio_logger = pylogging.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedWriteFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedWriteFilter())


class _AbandonedWriteFilter(pylogging.Filter):

  def filter(self, record: pylogging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    abandoned = ('exception was never retrieved' in str(record.msg)
                 and exc is not None and ocp.path.atomicity.TMP_DIR_SUFFIX in str(exc))
    return not abandoned


def _set_aside(step_dir: Path) -> Path:
  """Moves a damaged step folder out of checkpoints/ (process 0), returning where to."""
  aside_root = step_dir.parent.parent / DAMAGED_DIR
  aside = aside_root / step_dir.name
  suffix = 1
  while aside.exists():
    aside, suffix = aside_root / f'{step_dir.name}.{suffix}', suffix + 1
  if jax.process_index() == 0:
    aside_root.mkdir(exist_ok=True)
    os.rename(step_dir, aside)
  distributed.barrier(f'trainbig:set_aside:{step_dir}')
  return aside


def _check_not_per_process(data_dir: Path) -> None:
  """Refuses a step written with one data position per process (before the global stream):
  those positions index each process's own share of the documents, which no longer exist."""
  if not data_dir.is_dir() or (data_dir / DATA_STATE_FILE).exists():
    return
  counts = {m.group(2) for p in data_dir.iterdir()
            if (m := _PER_PROCESS_DATA_STATE.fullmatch(p.name))}
  if counts:
    raise CheckpointError(
        f'{data_dir.parent} was written by {" or ".join(sorted(counts))} processes with one '
        'data position per process (trainbig before the global data stream): it can only '
        'resume with that process count and that trainbig version; eval, compress and '
        'finetune --init_checkpoint read it, or train anew in another --workdir.')


def _restore_step(mngr: ocp.CheckpointManager, target_state: Any, step: int):
  _check_not_per_process(Path(mngr.directory) / str(step) / 'data')
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
  files.atomic_write(path, config.to_json(indent=2))  # every process: same bytes, own temp


def read_config(run_dir: str | os.PathLike) -> ml_collections.ConfigDict:
  path = Path(run_dir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f'{run_dir} is not a trainbig run folder: it has no {CONFIG_FILE}.')
  try:
    config = json.loads(path.read_text(encoding='utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{path} is damaged: not a JSON config ({e}).') from None
  if not isinstance(config, dict):
    raise CheckpointError(f'{path} is damaged: it holds no JSON object.')
  return ml_collections.ConfigDict(config)


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
  can do the same. Layers come back per layer (layers_0, ...) even when the run stored them
  stacked (model.scan_layers), so compression and evaluation see one layout.
  """
  state_dir = params_step_dir(run_dir) / 'state'
  if not state_dir.exists():
    raise CheckpointError(f'{state_dir.parent} is not a complete checkpoint: no state item.')
  # Orbax warns that a step's item folder has no checkpoint-level metadata file, which is
  # how CheckpointManager lays items out; the warning says nothing to the user.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  ignore_abandoned_reads()  # before the restore: see restore()
  try:
    return _restore_params(state_dir)
  except Exception as e:  # pylint: disable=broad-except  # a damaged file, whichever
    raise CheckpointError(f'{state_dir} is damaged and cannot be read ({failure_gist(e)}); '
                          f'restore it from a copy or remove that step folder.') from None
  finally:
    logging.set_verbosity(verbosity)


def _restore_params(state_dir: Path) -> dict[str, Any]:
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata.tree
    restore_args = _numpy_restore_args(tree)
    state = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return layer_stack.unstack_layers(state['params'])


def _numpy_restore_args(tree):
  import numpy as np
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                      is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
