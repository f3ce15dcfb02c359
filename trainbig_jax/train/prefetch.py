"""Batches put on the devices ahead of the step that needs them.

A background thread draws host batches from the (grain) iterator and places them on the mesh
(`partitioning.global_batch`) while the current step runs, keeping up to `size` ready, so
the step never waits for the data pipeline unless the pipeline is slower than the step.
Checkpoints must record the data position of the batches the loop has *consumed*, not of
those drawn ahead: each batch travels with the iterator state right after it was drawn,
and `get_state()` returns the state of the last batch handed out. size=0 draws each batch
when asked, in the caller's thread (no read-ahead).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax

from trainbig_jax.train import partitioning

_DONE = object()


class DevicePrefetch:
  """Iterator of device batches from a host-batch iterator with get_state()."""

  def __init__(self, iterator: Iterator[dict[str, Any]], mesh: jax.sharding.Mesh,
               size: int = 2):
    self._iterator, self._mesh = iterator, mesh
    self._state = iterator.get_state()
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self._thread = None
    if size > 0:
      self._thread = threading.Thread(target=self._fill, daemon=True, name='DevicePrefetch')
      self._thread.start()

  def _fill(self) -> None:
    try:
      while True:
        try:
          host_batch = next(self._iterator)  # iterators with __next__ only are allowed
        except StopIteration:
          break
        item = (partitioning.global_batch(host_batch, self._mesh), self._iterator.get_state())
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if self._stop.is_set():
          return
      self._queue.put((_DONE, None))
    except BaseException as e:  # handed to the consumer, raised where it asks for a batch
      self._queue.put((_DONE, e))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._thread is None:
      batch = partitioning.global_batch(next(self._iterator), self._mesh)
      self._state = self._iterator.get_state()
      return batch
    batch, state = self._queue.get()
    if batch is _DONE:
      self._queue.put((_DONE, state))  # every later call ends the same way
      if state is not None:
        raise state
      raise StopIteration
    self._state = state
    return batch

  def get_state(self) -> Any:
    """The data position after the last batch handed out (what a checkpoint must save)."""
    return self._state

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not None:
      self._thread.join(timeout=10)
