"""Runs one trainbig command on every worker of a Cloud TPU VM slice.

  python launch/tpu_slice.py --tpu=my-v5e --zone=us-west4-a --accelerator_type=v5litepod-16 \
      --slice=create --delete=on_success --env=TRAINBIG_DATA_DIR=/mnt/shared/tfds -- \
      train --config=configs/pretrain.py:roberta_base --workdir=/mnt/shared/runs/base

Steps, each a `gcloud compute tpus ...` command printed by --dry_run exactly as run:
  1. the slice: check that an existing one is READY (--slice=reuse), create it
     (--slice=create), or request it as a queued resource and wait until it is ACTIVE
     (--slice=queued: the way to get large or spot slices when capacity frees up);
  2. this repository at its current commit (`git archive HEAD`) copied to every worker and
     installed with the `tpu` extra into ~/trainbig_venv (skip with --skip_install);
  3. the same `trainbig ... --distributed` on all workers at once (JAX reads the slice's
     workers from the TPU metadata); every line a worker prints comes back prefixed with
     [wK] and is also appended to WORKDIR/logs/worker_K.log on the shared run folder;
  4. optionally the slice deleted (--delete=always or on_success).
Ctrl-C / SIGTERM sends SIGTERM to trainbig on every worker: the run checkpoints and stops,
and the same command resumes it later (on this slice or a new one).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_command import (ROOT, LaunchError, check_command, env_prefix, flag_value,  # noqa: E402
                         parse_env, print_commands, split_command)

# Runtime (software) versions per TPU generation, from the Cloud TPU docs' "TPU software
# versions" page (cloud.google.com/tpu/docs/runtimes); --runtime_version overrides.
DEFAULT_RUNTIME = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite',
                   'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
ACCELERATOR_TYPE = re.compile(r'(v4|v5litepod|v5p|v6e)-(\d+)$')
TPU_NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
ZONE = re.compile(r'[a-z]+-[a-z]+\d+-[a-z]$')
SLICE_MODES = ('reuse', 'create', 'queued')
DELETE_MODES = ('never', 'always', 'on_success')
ARCHIVE_NAME = 'trainbig_jax-src.tar.gz'
REMOTE_SRC = '$HOME/trainbig_jax'
REMOTE_VENV = '$HOME/trainbig_venv'
# Each TPU VM knows its own worker number; the run command prefixes its output with it.
WORKER_NUMBER = ('curl -s -H Metadata-Flavor:Google http://metadata.google.internal/'
                 'computeMetadata/v1/instance/attributes/agent-worker-number')
QUEUED_POLL_S = 30.0


@dataclasses.dataclass
class Plan:
  """The commands of a launch, in the order they run."""
  check: list[str] | None  # prints the slice state (reuse) or queued-resource state (queued)
  create: list[str] | None
  install: list[list[str]]
  run: list[str]
  stop: list[str]
  delete: list[str] | None


def gcloud(args, group: str, verb: str, name: str, *flags: str) -> list[str]:
  """`gcloud compute tpus GROUP VERB NAME --zone=.. [--project=..] FLAGS...`"""
  where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])
  return ['gcloud', 'compute', 'tpus', group, verb, name, *where, *flags]


def check_args(args: argparse.Namespace, command: list[str]) -> list[str]:
  """Checks everything that can be checked here; returns the command every worker runs."""
  if not TPU_NAME.match(args.tpu or ''):
    raise LaunchError(f'--tpu={args.tpu!r} is invalid: lowercase letters, digits and hyphens, '
                      'starting with a letter, at most 63 characters.')
  if not ZONE.match(args.zone or ''):
    raise LaunchError(f'--zone={args.zone!r} is invalid: expected a zone such as us-central2-b.')
  if args.slice != 'reuse':
    match = ACCELERATOR_TYPE.match(args.accelerator_type or '')
    if not match:
      raise LaunchError(f'--accelerator_type={args.accelerator_type!r} is invalid for '
                        f'--slice={args.slice}: expected GENERATION-SIZE with generation one of '
                        f'{", ".join(DEFAULT_RUNTIME)} (e.g. v5litepod-16, v4-32).')
    if not args.runtime_version:
      args.runtime_version = DEFAULT_RUNTIME[match.group(1)]
  if args.spot and args.slice == 'reuse':
    raise LaunchError('--spot applies to a slice this launcher creates; with --slice=reuse the '
                      'slice already exists.')
  if args.queued_wait_s <= 0:
    raise LaunchError(f'--queued_wait_s={args.queued_wait_s} must be positive.')
  args.env = parse_env(args.env)
  return check_command(command)


def make_plan(args: argparse.Namespace, job: list[str]) -> Plan:
  check = create = delete = None
  if args.slice == 'reuse':
    check = gcloud(args, 'tpu-vm', 'describe', args.tpu, '--format=value(state)')
  elif args.slice == 'create':
    create = gcloud(args, 'tpu-vm', 'create', args.tpu,
                    f'--accelerator-type={args.accelerator_type}',
                    f'--version={args.runtime_version}', *(['--spot'] if args.spot else []))
  else:
    create = gcloud(args, 'queued-resources', 'create', args.tpu, f'--node-id={args.tpu}',
                    f'--accelerator-type={args.accelerator_type}',
                    f'--runtime-version={args.runtime_version}',
                    *(['--spot'] if args.spot else []))
    check = gcloud(args, 'queued-resources', 'describe', args.tpu, '--format=value(state.state)')
  if args.delete != 'never':
    delete = (gcloud(args, 'queued-resources', 'delete', args.tpu, '--force', '--quiet')
              if args.slice == 'queued' else
              gcloud(args, 'tpu-vm', 'delete', args.tpu, '--quiet'))

  install = []
  if not args.skip_install:
    archive = str(Path(tempfile.gettempdir()) / ARCHIVE_NAME)
    remote_install = '; '.join([
        'set -e', f'rm -rf {REMOTE_SRC}', f'mkdir -p {REMOTE_SRC}',
        f'tar -xzf $HOME/{ARCHIVE_NAME} -C {REMOTE_SRC}',
        f'test -x {REMOTE_VENV}/bin/python || {args.python} -m venv {REMOTE_VENV}',
        f'{REMOTE_VENV}/bin/pip install --quiet "{REMOTE_SRC}[tpu]"'])
    install = [
        ['git', '-C', str(ROOT), 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD'],
        gcloud(args, 'tpu-vm', 'scp', archive, f'{args.tpu}:{ARCHIVE_NAME}', '--worker=all'),
        gcloud(args, 'tpu-vm', 'ssh', args.tpu, '--worker=all', f'--command={remote_install}'),
    ]

  workdir = flag_value(job, 'workdir') or flag_value(job, 'out')
  logs = f'{workdir}/logs' if workdir else '$HOME/trainbig_logs'
  env = env_prefix(args.env)
  trainbig = f'{env + " " if env else ""}{REMOTE_VENV}/bin/trainbig {shlex.join(job)}'
  remote_run = '; '.join([
      'set -o pipefail', f'W=$({WORKER_NUMBER})', f'mkdir -p {shlex.quote(logs)}',
      f'cd {REMOTE_SRC}',
      f'{trainbig} 2>&1 | tee -a {shlex.quote(logs)}/worker_$W.log | sed -u "s/^/[w$W] /"'])
  run = gcloud(args, 'tpu-vm', 'ssh', args.tpu, '--worker=all', f'--command={remote_run}')
  stop = gcloud(args, 'tpu-vm', 'ssh', args.tpu, '--worker=all',
                f'--command=pkill -TERM -f "{REMOTE_VENV}/bin/trainbig " || true')
  return Plan(check=check, create=create, install=install, run=run, stop=stop, delete=delete)


def print_plan(plan: Plan, args: argparse.Namespace) -> None:
  lines = []
  if args.slice == 'reuse':
    lines += ['# the slice must exist and be READY:', shlex.join(plan.check)]
  else:
    lines += ['# request the slice:', shlex.join(plan.create)]
    if plan.check:
      lines += [f'# then every {QUEUED_POLL_S:.0f} s (at most {args.queued_wait_s:.0f} s) until '
                'ACTIVE:', shlex.join(plan.check)]
  if plan.install:
    lines += ['# install this repository (HEAD) on every worker:']
    lines += [shlex.join(c) for c in plan.install]
  lines += ['# run on every worker (output prefixed [wK]):', shlex.join(plan.run)]
  lines += ['# on Ctrl-C / SIGTERM (every worker checkpoints and stops):', shlex.join(plan.stop)]
  if plan.delete:
    lines += [f'# afterwards ({args.delete}):', shlex.join(plan.delete)]
  print_commands(lines)


def _state(cmd: list[str]) -> str:
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode:
    raise LaunchError(f'{shlex.join(cmd)} failed: '
                      f'{(result.stderr.strip().splitlines() or ["no output"])[-1]}')
  return result.stdout.strip()


def _run(cmd: list[str]) -> None:
  print(f'[launch] {shlex.join(cmd)}', flush=True)
  subprocess.run(cmd, check=True)


def execute(plan: Plan, args: argparse.Namespace) -> int:
  if shutil.which('gcloud') is None:
    raise LaunchError('gcloud is not installed (or not on PATH); install the Google Cloud CLI '
                      'or use --dry_run to see the commands.')
  if subprocess.run(['git', '-C', str(ROOT), 'diff', '--quiet', 'HEAD']).returncode:
    print('[launch] warning: uncommitted changes are not installed on the workers (HEAD is).',
          file=sys.stderr)
  if args.slice == 'reuse':
    state = _state(plan.check)
    if state != 'READY':
      raise LaunchError(f'TPU {args.tpu} in {args.zone} is {state or "missing"}, not READY.')
  else:
    _run(plan.create)
    if plan.check:
      deadline = time.monotonic() + args.queued_wait_s
      while (state := _state(plan.check)) != 'ACTIVE':
        if state in ('FAILED', 'SUSPENDED') or time.monotonic() > deadline:
          raise LaunchError(f'queued resource {args.tpu} is {state}, not ACTIVE.')
        print(f'[launch] queued resource {args.tpu}: {state}', flush=True)
        time.sleep(QUEUED_POLL_S)
  status = 1
  try:
    for cmd in plan.install:
      _run(cmd)
    print(f'[launch] {shlex.join(plan.run)}', flush=True)
    proc = subprocess.Popen(plan.run, start_new_session=True)

    def stop(signum, frame):  # every worker checkpoints, then the ssh session ends
      print('[launch] stopping: SIGTERM to trainbig on every worker', flush=True)
      subprocess.run(plan.stop)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      status = proc.wait()
    finally:
      for s, handler in old.items():
        signal.signal(s, handler)
  finally:
    if plan.delete and (args.delete == 'always' or status == 0):
      _run(plan.delete)
  return status


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description='Run a trainbig command on every worker of a Cloud TPU VM slice.',
      usage='%(prog)s --tpu=NAME --zone=ZONE [--slice=reuse|create|queued] '
            '[--accelerator_type=TYPE] [--dry_run] -- COMMAND [--flags]')
  parser.add_argument('--tpu', help='TPU (slice) name')
  parser.add_argument('--zone', help='Cloud zone, e.g. us-central2-b')
  parser.add_argument('--project', default=None, help='Cloud project (default: gcloud config)')
  parser.add_argument('--slice', choices=SLICE_MODES, default='reuse',
                      help='reuse an existing slice, create it, or request it as a queued '
                           'resource')
  parser.add_argument('--accelerator_type', default=None,
                      help='e.g. v4-32, v5litepod-16, v5p-128, v6e-64 (to create a slice)')
  parser.add_argument('--runtime_version', default=None,
                      help='TPU software version (default: by generation, see DEFAULT_RUNTIME)')
  parser.add_argument('--spot', action='store_true', help='create a Spot (preemptible) slice')
  parser.add_argument('--queued_wait_s', type=float, default=24 * 3600.0,
                      help='give up waiting for a queued resource after this long')
  parser.add_argument('--delete', choices=DELETE_MODES, default='never',
                      help='delete the slice after the run')
  parser.add_argument('--skip_install', action='store_true',
                      help='the workers already have this version installed')
  parser.add_argument('--python', default='python3',
                      help='Python (>= 3.11) on the workers that creates the venv')
  parser.add_argument('--env', action='append', default=[],
                      help='NAME=VALUE set for trainbig on every worker (repeatable)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='after --: the trainbig command and its flags')
  args = parser.parse_args(argv)
  try:
    job = check_args(args, split_command(args.command))
    plan = make_plan(args, job)
    if args.dry_run:
      print_plan(plan, args)
      return 0
    return execute(plan, args)
  except LaunchError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  except subprocess.CalledProcessError as e:
    parser.exit(e.returncode or 1, f'{parser.prog}: error: {shlex.join(e.cmd)} exited with '
                                   f'status {e.returncode}\n')


if __name__ == '__main__':
  sys.exit(main())
