"""Multi-process (multi-host) start-up through JAX's own runtime.

Every process of a job runs the same command. Before anything touches a device, each one
calls `jax.distributed.initialize`, after which `jax.devices()` lists the devices of all
processes and jitted steps run over one global mesh. The coordinates come from either

  TRAINBIG_COORDINATOR=host:port, TRAINBIG_NUM_PROCESSES=N, TRAINBIG_PROCESS_ID=i
      (set by launch/local_multiprocess.py, or by hand / a job script on any cluster), or
  `trainbig ... --distributed`
      JAX's own detection of the cluster (Cloud TPU pods, SLURM, Open MPI, ...).

With neither, nothing happens and the run is single-process, as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import NoReturn

ENV_COORDINATOR = 'TRAINBIG_COORDINATOR'
ENV_NUM_PROCESSES = 'TRAINBIG_NUM_PROCESSES'
ENV_PROCESS_ID = 'TRAINBIG_PROCESS_ID'
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


class DistributedError(ValueError):
  """The multi-process settings are incomplete or invalid."""


# A process that dies (kill -9, OOM, a lost host) stops sending heartbeats; after this long
# the coordination service fails every other process instead of letting it wait forever
# (JAX's default is 100 s). That is what ends a wait at a barrier, or in a collective that
# blocks on a dead peer (GPU, TPU); on CPU a collective fails at once (the peer's socket
# closes). tests/test_elastic.py kills a process both ways.
HEARTBEAT_TIMEOUT_S = 30


def settings_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, object] | None:
  """jax.distributed.initialize keyword arguments from TRAINBIG_* variables, or None if unset."""
  given = {k: environ[k] for k in ENV_VARS if environ.get(k)}
  if not given:
    return None
  if len(given) != len(ENV_VARS):
    missing = ', '.join(k for k in ENV_VARS if k not in given)
    raise DistributedError(f'Multi-process settings are incomplete: {missing} not set; set all '
                           f'of {", ".join(ENV_VARS)} or none.')
  address = given[ENV_COORDINATOR]
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f'{ENV_COORDINATOR}={address!r} is invalid: expected host:port, '
                           'e.g. 10.0.0.1:1234.')
  try:
    num_processes = int(given[ENV_NUM_PROCESSES])
    process_id = int(given[ENV_PROCESS_ID])
  except ValueError:
    raise DistributedError(f'{ENV_NUM_PROCESSES}={given[ENV_NUM_PROCESSES]!r} and '
                           f'{ENV_PROCESS_ID}={given[ENV_PROCESS_ID]!r} must be integers.') from None
  if num_processes < 1:
    raise DistributedError(f'{ENV_NUM_PROCESSES}={num_processes} must be at least 1.')
  if not 0 <= process_id < num_processes:
    raise DistributedError(f'{ENV_PROCESS_ID}={process_id} must be in [0, {num_processes}).')
  return {'coordinator_address': address, 'num_processes': num_processes,
          'process_id': process_id, 'heartbeat_timeout_seconds': HEARTBEAT_TIMEOUT_S}


def initialize(auto_detect: bool = False, environ: Mapping[str, str] = os.environ) -> bool:
  """Joins this process to a multi-process JAX job if one is configured; True if it did.

  Must run before any other JAX call (jax.devices(), an array, a jit): the runtime's device
  list is fixed by the first of them. TRAINBIG_* variables win over `auto_detect`.
  """
  settings = settings_from_env(environ)
  if settings is None and not auto_detect:
    return False
  import jax  # imported here so that a single-process run pays nothing
  if settings is not None:
    jax.distributed.initialize(**settings)
  else:  # Cloud TPU, SLURM, Open MPI, ...: JAX reads the cluster's own environment
    try:
      jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except ValueError as e:  # JAX: "coordinator_address should be defined."
      raise DistributedError(
          f'--distributed found no cluster to join ({e}); JAX detects Cloud TPU, SLURM, Open '
          f'MPI and Kubernetes jobs, elsewhere set {", ".join(ENV_VARS)}.') from None
  global _joined
  _joined = True
  sys.excepthook = _exit_after_traceback
  return True


_joined = False


def exit_if_joined(status: int) -> None:
  """In a multi-process job, ends this process now with `status`; otherwise does nothing.

  A normal exit runs JAX's shutdown barrier, which waits (5 minutes by default) for every
  other process; after an error here the others never arrive (they wait for this one in a
  collective), so the failure would surface only minutes later. Exiting at once lets a
  launcher or scheduler see the failure and stop the job. Output is flushed first; metrics
  and checkpoints are already on disk (each write is flushed or committed when made).
  """
  if _joined:
    _exit(status)


def _exit(status: int) -> NoReturn:
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _exit_after_traceback(exc_type, exc, tb) -> None:
  # An uncaught exception: print it as Python would, then skip the shutdown barrier too.
  traceback.print_exception(exc_type, exc, tb)
  _exit(1)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process has reached `name`; returns at once in a single process.

  Goes through the coordination service, not a device collective: on CPU the first
  collective between processes gives up after 30 s, so processes that reach it far apart
  (one still preparing data or a tokenizer) must meet here first.
  """
  import jax
  if jax.process_count() == 1:
    return
  # The service accepts each barrier id once; every process calls the same barriers in the
  # same order, so numbering the uses of a name keeps ids unique and equal across processes.
  uses = _barrier_uses[name] = _barrier_uses.get(name, 0) + 1
  # The distributed runtime's client; Orbax's own process barriers use it the same way.
  from jax._src import distributed as jax_distributed
  jax_distributed.global_state.client.wait_at_barrier(f'{name}#{uses}', int(timeout_s * 1000))


_barrier_uses: dict[str, int] = {}


@contextlib.contextmanager
def primary_first(name: str, timeout_s: float = 3600.0) -> Iterator[None]:
  """Runs the block on process 0, then on all others (which then find its results).

  For work that writes shared files once (preparing a dataset, training the tokenizer):
  the other processes wait instead of racing process 0 for the same paths, then do the
  cheap part (opening what it wrote).
  """
  import jax
  if jax.process_index() != 0:
    barrier(f'{name}:primary_done', timeout_s)
  yield
  if jax.process_index() == 0:
    barrier(f'{name}:primary_done', timeout_s)
