"""The shared train loop on synthetic MLM batches whose *global* batch at step s does not
depend on the number of processes: each process takes its own rows of the same global batch.

This isolates the multi-process runtime (sharded state, cross-process collectives, per-process
checkpoint items) from the data pipeline, whose per-process document sharding makes real
batches differ between process counts. Run as a script by launch/local_multiprocess.py
(`--script`), or call `train` in-process for the single-process reference.

  python tests/multiprocess_worker.py WORKDIR TOTAL_STEPS CHECKPOINT_EVERY [SIGTERM_AT]

SIGTERM_AT=P:S makes process P send itself SIGTERM while fetching the batch of step S+1, as
a preempted host would: every process must then stop after that step and checkpoint it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from trainbig_jax.train import distributed

if __name__ == '__main__':  # before any other JAX call
  distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainbig_jax.configs import pretrain as pretrain_configs  # noqa: E402
from trainbig_jax.data.mlm import mask_tokens  # noqa: E402
from trainbig_jax.models.encoder import Encoder, encoder_config  # noqa: E402
from trainbig_jax.tasks.mlm import encoder_init_fn, mlm_sums  # noqa: E402
from trainbig_jax.train import loop  # noqa: E402
from trainbig_jax.train.state import make_optimizer  # noqa: E402

SPECIAL_IDS = (0, 1, 2, 3, 4)  # pad, unk, bos, eos, mask as in data/tokenizer.py
MASK_ID = 4


def global_batch(step: int, batch_size: int, seq_len: int, vocab_size: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """The whole batch of `step`, identical on every process whatever their number."""
  rng = np.random.default_rng([seed, step])
  tokens = rng.integers(len(SPECIAL_IDS), vocab_size, size=(batch_size, seq_len))
  return mask_tokens(tokens, rng, vocab_size=vocab_size, mask_id=MASK_ID,
                     special_ids=SPECIAL_IDS)


class RowsOfGlobalBatches:
  """This process's rows of each global batch. The state records both the step and the
  rows, so a process restored with another process's state would read the wrong rows."""

  def __init__(self, batch_size: int, seq_len: int, vocab_size: int,
               sigterm_at_step: int | None = None):
    self._shape = (batch_size, seq_len, vocab_size)
    self._sigterm_at_step = sigterm_at_step
    per_process = batch_size // jax.process_count()
    start = jax.process_index() * per_process
    self._state = {'step': 0, 'rows': [start, start + per_process]}

  def __next__(self) -> dict[str, np.ndarray]:
    start, stop = self._state['rows']
    if self._state['step'] == self._sigterm_at_step:
      os.kill(os.getpid(), signal.SIGTERM)
    batch = global_batch(self._state['step'], *self._shape)
    self._state = {**self._state, 'step': self._state['step'] + 1}
    return {k: v[start:stop] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return dict(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    self._state = dict(state)


def config(total_steps: int, checkpoint_every: int):
  c = pretrain_configs.get_config('tiny')
  c.train.total_steps = total_steps
  c.train.checkpoint_every = c.train.eval_every = checkpoint_every
  c.train.log_every = 1
  c.train.keep_checkpoints = 5
  return c


def train(workdir: str | Path, total_steps: int, checkpoint_every: int,
          sigterm_at: str | None = None) -> loop.Summary:
  c = config(total_steps, checkpoint_every)
  sigterm_at_step = None
  if sigterm_at:
    process, step = (int(x) for x in sigterm_at.split(':'))
    sigterm_at_step = step if process == jax.process_index() else None
  model = Encoder(encoder_config(c.model, vocab_size=c.data.vocab_size))
  batch_size, seq_len, vocab = c.train.batch_size, c.data.seq_len, c.data.vocab_size
  eval_rows = RowsOfGlobalBatches(batch_size, seq_len, vocab)
  eval_rows.set_state({**eval_rows.get_state(), 'step': 10**6})  # far from the train steps
  eval_batches = [next(eval_rows)]
  job = loop.Job(
      config=c, workdir=Path(workdir), sums_fn=mlm_sums(model),
      init_params=encoder_init_fn(model, seq_len),
      train_iterator=RowsOfGlobalBatches(batch_size, seq_len, vocab, sigterm_at_step),
      eval_batches=lambda: eval_batches, tx=make_optimizer(c.train))
  Path(workdir).mkdir(parents=True, exist_ok=True)
  return loop.run(job)


if __name__ == '__main__':
  workdir, total_steps, checkpoint_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  summary = train(workdir, total_steps, checkpoint_every, *sys.argv[4:5])
  print(json.dumps(summary.__dict__))
