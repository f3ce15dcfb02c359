"""One writer per run folder: an advisory lock that names the process holding it.

`WORKDIR/writer.lock` is locked with flock(2) by the process writing the folder. The kernel
drops the lock when that process ends, however it ends (SIGKILL and OOM kills included), so a
lock left behind by a dead process never blocks a rerun; the file's text (pid, host, command)
only serves to name the holder in the message a second writer gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

LOCK_FILE = 'writer.lock'


class RunFolderBusyError(ValueError):
  """Another live process is writing the run folder."""


def check_folder_path(folder: str | os.PathLike, flag: str = '--workdir') -> None:
  """A run folder path must be a folder we may write, or a new one we may create.

  Checked before any work, so that a folder that cannot be written fails in one line naming
  it, not at the first file the command happens to write (a bare 'Permission denied').
  """
  path = Path(folder)
  if path.exists():
    if not path.is_dir():
      raise NotADirectoryError(f'{flag}={folder} is a file, not a folder; give a new or an '
                               f'existing run folder.')
    _check_writable(path, f'{flag}={folder} is not writable')
    return
  for parent in path.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise NotADirectoryError(f'{flag}={folder} lies under {parent}, which is a file.')
      _check_writable(parent, f'{flag}={folder} cannot be created: {parent} is not writable')
      break


def _check_writable(folder: Path, what: str) -> None:
  # os.access asks the kernel with this process's rights (root's override included).
  if not os.access(folder, os.W_OK | os.X_OK):
    raise PermissionError(f'{what} (Permission denied); the command writes its checkpoints, '
                          'metrics and lock there: make it writable or give another folder.')


@contextlib.contextmanager
def hold(folder: str | os.PathLike) -> Iterator[None]:
  """Holds the writer lock of `folder` (created if needed) for the duration of the block."""
  folder = Path(folder)
  check_folder_path(folder)
  created = not folder.exists()
  folder.mkdir(parents=True, exist_ok=True)
  fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'pid unknown'
    os.close(fd)
    raise RunFolderBusyError(
        f'{folder} is being written by another live process ({holder}); wait for it or stop '
        f'it, or use another folder.') from None
  command = ' '.join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]
  os.ftruncate(fd, 0)
  os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}: {command}\n'.encode(), 0)
  try:
    yield
  finally:
    os.ftruncate(fd, 0)
    # A command that failed before writing anything leaves no folder behind (nor its lock).
    if created and os.listdir(folder) == [LOCK_FILE]:
      os.unlink(folder / LOCK_FILE)
      os.rmdir(folder)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def holds_run_folder(folder_of: Callable[..., str | os.PathLike]):
  """Decorator: the function runs holding the lock of the folder `folder_of(*args)` names.

  Only process 0 of a multi-process job locks: the processes of one job write together.
  """
  def wrap(fn):
    @functools.wraps(fn)
    def locked(*args, **kwargs):
      if jax.process_index() != 0:
        return fn(*args, **kwargs)
      with hold(folder_of(*args, **kwargs)):
        return fn(*args, **kwargs)
    return locked
  return wrap
