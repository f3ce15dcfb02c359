"""Writing files that are never seen half-written, and reading JSON-lines files.

Every file the project writes whole (configs, summaries, tokenizers, rewritten metrics) goes
through `atomic_write`; every JSONL file it reads (metrics.jsonl, results.jsonl) through
`read_jsonl`, which tolerates exactly what an interrupted append leaves behind; a record that
must survive a crash once written (a sweep's results line) is added with `append_jsonl`,
which first cuts off what an interrupted earlier append left. A run folder is set up inside
`removed_on_failure`, so a failed setup leaves no folder that looks like a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
  """A JSON-lines file damaged somewhere other than its last line."""


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces `path` with `data` so that readers see the old file or the new one, never part.

  The data goes to a temporary file beside `path` (named per process and call, so processes
  writing the same file at once do not collide), is flushed to disk, then renamed over it.
  """
  path = Path(path)
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
  try:
    with open(tmp, 'xb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def removed_on_failure(folder: str | os.PathLike, remove: bool = True) -> Iterator[Path]:
  """Creates `folder` (and missing parents) for the block; if the block raises, removes what
  it created, with everything written there, so a command that fails while setting up (bad
  data, a tokenizer of the wrong size) leaves no half-made run folder behind. A folder that
  existed before (a run being resumed) is never removed, nor anything when `remove` is False
  (the processes of a job other than the first, which share the folder).
  """
  folder = Path(folder).absolute()
  top = folder  # the outermost folder this call creates
  while not top.parent.exists():
    top = top.parent
  created = not folder.exists()
  folder.mkdir(parents=True, exist_ok=True)
  try:
    yield folder
  except Exception:
    if created and remove:
      shutil.rmtree(top, ignore_errors=True)
    raise


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
  """(line number, object) for every line of a JSONL file of objects.

  An append interrupted by a crash leaves a torn last line: a final line that is not a JSON
  object is dropped. A bad line anywhere else means the file is damaged: JsonlError names the
  file and line.
  """
  path = Path(path)
  lines = path.read_text(encoding='utf-8').splitlines()
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if i == last:
        break
      raise JsonlError(f'{path}, line {i + 1}: not valid JSON ({e.msg}).') from None
    if not isinstance(obj, dict):
      if i == last:
        break
      raise JsonlError(f'{path}, line {i + 1}: expected a JSON object, got '
                       f'{type(obj).__name__}.')
    records.append((i + 1, obj))
  return records


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
  """Appends `record` as one line of the JSONL file `path` (created if missing), on disk when
  this returns.

  An append interrupted by a crash leaves a torn last line (no final newline); it is cut off
  first, so the new line starts a line of its own instead of extending the torn one into a
  damaged line in the middle of the file (which `read_jsonl` would then refuse).
  """
  path = Path(path)
  if path.exists() and path.stat().st_size:
    with open(path, 'rb') as f:  # only the last byte, unless the line is torn
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b'\n'
    if torn:
      data = path.read_bytes()
      os.truncate(path, data.rfind(b'\n') + 1)
  with open(path, 'a', encoding='utf-8') as f:
    f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())
