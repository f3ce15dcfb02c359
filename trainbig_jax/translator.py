"""`trainbig translate`: text in, text out, with a translation run or compressed checkpoint.

Lines are translated in batches of the run's `train.batch_size` rows, truncated to
`data.max_source_len` tokens and decoded to `data.max_target_len` with the run's `decode`
settings; every batch has the same shape (the last one is padded), so decoding compiles once.
An empty input line gives an empty output line; output lines match input lines one to one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np

from trainbig_jax import tasks
from trainbig_jax.files import atomic_write
from trainbig_jax.compress.checkpoints import load_checkpoint_params
from trainbig_jax.data import translation
from trainbig_jax.data.tokenizer import load_tokenizer
from trainbig_jax.evaluate import _mesh_for
from trainbig_jax.tasks import translate as translate_task
from trainbig_jax.train import checkpoint
from trainbig_jax.train.state import check_params_fit, params_shardings


class Translator:
  """A checkpoint's model, tokenizer and compiled decoder on this host's devices."""

  def __init__(self, path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
      raise checkpoint.CheckpointError(f'--checkpoint={path} does not exist.')
    self.config = checkpoint.read_config(path)
    task = tasks.task_of(self.config)
    if task.NAME != translate_task.NAME:
      raise checkpoint.CheckpointError(
          f'--checkpoint={path} is a {task.NAME!r} run; trainbig translate needs a '
          f'{translate_task.NAME!r} one.')
    self.tokenizer = load_tokenizer(str(path / checkpoint.TOKENIZER_FILE))
    params, _ = load_checkpoint_params(path)
    model = translate_task.build_model(self.config, self.tokenizer)
    check_params_fit(params, translate_task.init_params_fn(model, self.config), str(path),
                     f'its config and tokenizer ({self.tokenizer.vocab_size} pieces)')
    mesh = _mesh_for(self.config)
    shardings = params_shardings(translate_task.init_params_fn(model, self.config), mesh)
    self.params = jax.device_put(params, shardings)
    self._decode = translate_task.translator(model, self.config, mesh, shardings)
    self.batch_size = self.config.train.batch_size

  def _batch(self, lines: list[str]) -> dict[str, np.ndarray]:
    d = self.config.data
    rows = self.batch_size // jax.process_count()
    inputs = np.full((self.batch_size, d.max_source_len), self.tokenizer.pad_id, np.int32)
    for row, line in enumerate(lines):
      if line.strip():
        ids = translation.encode_text(self.tokenizer, line, d.max_source_len)
        inputs[row, :len(ids)] = ids
    start = jax.process_index() * rows  # this process's share of the global batch
    return {'inputs': inputs[start:start + rows]}

  def translate_batches(self, lines: Iterable[str]) -> Iterator[list[str]]:
    """Translations of `lines`, one list per batch of up to `batch_size` lines."""
    pending: list[str] = []
    for line in lines:
      pending.append(line.rstrip('\n'))
      if len(pending) == self.batch_size:
        yield self._translate(pending)
        pending = []
    if pending:
      yield self._translate(pending)

  def _translate(self, lines: list[str]) -> list[str]:
    rows = self._decode(self.params, self._batch(lines))
    return [translation.detokenize(self.tokenizer, rows[i]) if line.strip() else ''
            for i, line in enumerate(lines)]


def translate_file(checkpoint_path: str | os.PathLike, input_path: str,
                   output_path: str | None = None) -> int:
  """Translates `input_path` ('-': stdin) line by line into `output_path` (None or '-':
  stdout); returns the number of lines. A file output is written whole or not at all."""
  if input_path != '-' and not Path(input_path).is_file():
    raise FileNotFoundError(f'--input={input_path} is not a file.')
  translator = Translator(checkpoint_path)
  if input_path == '-':
    lines = sys.stdin.readlines()
  else:
    lines = Path(input_path).read_text(encoding='utf-8').splitlines()
  from tqdm import tqdm
  bar = tqdm(total=len(lines), unit='line', disable=not sys.stderr.isatty(), leave=False)
  outputs: list[str] = []
  for batch in translator.translate_batches(lines):
    outputs.extend(batch)
    bar.update(len(batch))
    if output_path in (None, '-') and jax.process_index() == 0:
      sys.stdout.write(''.join(f'{line}\n' for line in batch))
      sys.stdout.flush()
  bar.close()
  if output_path not in (None, '-') and jax.process_index() == 0:
    atomic_write(output_path, ''.join(f'{line}\n' for line in outputs))
  return len(outputs)
