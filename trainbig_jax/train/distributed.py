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

import os
from collections.abc import Mapping

ENV_COORDINATOR = 'TRAINBIG_COORDINATOR'
ENV_NUM_PROCESSES = 'TRAINBIG_NUM_PROCESSES'
ENV_PROCESS_ID = 'TRAINBIG_PROCESS_ID'
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)


class DistributedError(ValueError):
  """The multi-process settings are incomplete or invalid."""


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
          'process_id': process_id}


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
    jax.distributed.initialize()
  return True
