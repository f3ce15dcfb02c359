"""Runs one trainbig command as K cooperating JAX processes on this machine (CPU devices).

  python launch/local_multiprocess.py --processes=2 --devices_per_process=4 -- \
      train --config=configs/pretrain.py:tiny --workdir=/tmp/run

Each process gets TRAINBIG_COORDINATOR=127.0.0.1:PORT (a free loopback port),
TRAINBIG_NUM_PROCESSES=K, TRAINBIG_PROCESS_ID=k, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D, so `trainbig` joins them into one job of
K*D devices through jax.distributed (the same runtime a TPU pod or GPU cluster uses). Output
is streamed line by line with a [pK] prefix. If a process fails, the others are stopped (they
would otherwise wait forever in a collective) and the launcher exits with its status.
Ctrl-C / SIGTERM is forwarded to every process, which then checkpoint together and exit.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

# After a forwarded Ctrl-C / SIGTERM, processes get this long to checkpoint and exit before
# SIGKILL. (After a failure there is no grace: the others wait on the dead one in collectives,
# and JAX's preemption notifier swallows SIGTERM outside the train loop anyway.)
GRACE_S = 60.0


def free_port() -> int:
  # The OS picks an unused port; the tiny window before the coordinator binds it is harmless
  # on a dev machine.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, port: int, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
  env = dict(base)
  # Drop any device count the caller had set (pytest's conftest sets 8): ours must win.
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                     env.get('XLA_FLAGS', '')).split()
  xla_flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env.update({
      'TRAINBIG_COORDINATOR': f'127.0.0.1:{port}',
      'TRAINBIG_NUM_PROCESSES': str(num_processes),
      'TRAINBIG_PROCESS_ID': str(process_id),
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': ' '.join(xla_flags),
      'PYTHONUNBUFFERED': '1',
  })
  return env


def _stream(pipe: IO[str], prefix: str, lock: threading.Lock) -> None:
  for line in pipe:
    with lock:
      sys.stdout.write(f'{prefix} {line}' if line.endswith('\n') else f'{prefix} {line}\n')
      sys.stdout.flush()
  pipe.close()


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)  # the whole group: grain worker processes included
      except ProcessLookupError:
        pass


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
  """SIGTERMs every live process, then SIGKILLs whatever is left after `grace_s`."""
  _signal_all(procs, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.1)
  _signal_all(procs, signal.SIGKILL)
  for p in procs:
    p.wait()


def launch(command: list[str], *, processes: int, devices_per_process: int,
           port: int = 0, script: str | None = None) -> int:
  """Runs `command` in `processes` local processes; returns 0 or the first failure's status."""
  port = port or free_port()
  program = [sys.executable, script] if script else [sys.executable, '-m', 'trainbig_jax.cli']
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  threads = []
  for k in range(processes):
    env = process_env(os.environ, port=port, num_processes=processes, process_id=k,
                      devices_per_process=devices_per_process)
    p = subprocess.Popen(program + command, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1,
                         start_new_session=True)  # own group: see _signal_all
    procs.append(p)
    t = threading.Thread(target=_stream, args=(p.stdout, f'[p{k}]', lock), daemon=True)
    t.start()
    threads.append(t)

  forwarded = []

  def forward(signum, frame):
    # Every process gets the signal, so they stop at the same step and checkpoint together;
    # a second Ctrl-C does not wait for that.
    forwarded.append(signum)
    _signal_all(procs, signal.SIGTERM if len(forwarded) == 1 else signal.SIGKILL)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  status = 0
  try:
    while True:
      codes = [p.poll() for p in procs]  # every one: any() would stop at the first running
      if all(c is not None for c in codes):
        break
      failed = [p for p, c in zip(procs, codes) if c not in (None, 0)]
      if failed:
        status = failed[0].returncode
        with lock:
          print(f'[launch] process {procs.index(failed[0])} exited with status {status}; '
                'stopping the others.', file=sys.stderr, flush=True)
        _stop_all(procs, grace_s=0.0)
        break
      if forwarded:  # give them time to checkpoint, then make sure they are gone
        _stop_all(procs, grace_s=GRACE_S)
        break
      time.sleep(0.1)
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  for t in threads:
    t.join(timeout=5)
  if not status:
    status = next((p.returncode for p in procs if p.returncode), 0)
  # A status < 0 means killed by a signal; report it the way a shell would.
  return 128 - status if status < 0 else status


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description='Run a trainbig command as several local JAX processes on CPU.',
      usage='%(prog)s --processes=K --devices_per_process=D [--port=P] -- COMMAND [--flags]')
  parser.add_argument('--processes', type=int, default=2, help='number of processes (K)')
  parser.add_argument('--devices_per_process', type=int, default=4,
                      help='simulated CPU devices in each process (D)')
  parser.add_argument('--port', type=int, default=0, help='coordinator port (0: a free one)')
  parser.add_argument('--script', default=None,
                      help='run this Python file instead of the trainbig CLI (it must call '
                           'trainbig_jax.train.distributed.initialize() first)')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='after --: the trainbig command and its flags')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error(f'--processes={args.processes} and --devices_per_process='
                 f'{args.devices_per_process} must be positive.')
  if not command and not args.script:
    parser.error('give the trainbig command after --, e.g. -- train --config=... --workdir=...')
  return launch(command, processes=args.processes, devices_per_process=args.devices_per_process,
                port=args.port, script=args.script)


if __name__ == '__main__':
  sys.exit(main())
