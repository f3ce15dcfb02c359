"""The trainbig command that every process of a cluster job runs, checked before launch.

Shared by the TPU slice and SLURM launchers: both start the same `trainbig ... --distributed`
on every worker, so both need the same checks (a known command, a run folder on shared
storage) and the same quoting. Nothing here imports JAX.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository the workers install or run

# Commands that make sense on every worker of a job (report/plan read files on one machine).
JOB_COMMANDS = ('train', 'finetune', 'sweep', 'eval', 'compress')
ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*$')


class LaunchError(ValueError):
  """A launcher argument is invalid; the message names it and what is allowed."""


def split_command(argv: list[str]) -> list[str]:
  """The trainbig command after `--` (argparse REMAINDER keeps the separator)."""
  return argv[1:] if argv[:1] == ['--'] else list(argv)


def flag_value(command: list[str], name: str) -> str | None:
  """The value of `--name=value` or `--name value` in `command`, or None."""
  for i, arg in enumerate(command):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(command):
      return command[i + 1]
  return None


def check_command(command: list[str]) -> list[str]:
  """Checks a trainbig command for a cluster job; returns it with --distributed appended.

  The run folder must be one absolute POSIX path: every worker writes checkpoints there, so
  it has to be the same shared folder everywhere (an NFS/Filestore/gcsfuse mount).
  """
  if not command:
    raise LaunchError('no trainbig command: give it after --, e.g. -- train '
                      '--config=configs/pretrain.py:roberta_base --workdir=/shared/runs/base')
  if command[0] not in JOB_COMMANDS:
    raise LaunchError(f'trainbig command {command[0]!r} cannot run as a cluster job; allowed: '
                      f'{", ".join(JOB_COMMANDS)}.')
  if any(a == '--distributed' or a.startswith('--distributed=') or a == '--nodistributed'
         for a in command):
    raise LaunchError('do not pass --distributed in the command: the launcher adds it.')
  workdir = flag_value(command, 'workdir') or flag_value(command, 'out')
  if command[0] in ('train', 'finetune', 'sweep') and workdir is None:
    raise LaunchError(f'trainbig {command[0]} needs --workdir=/shared/path (the same folder on '
                      'every worker).')
  if workdir is not None:
    check_shared_path(workdir, 'the command\'s --workdir')
  return command + ['--distributed']


def check_shared_path(path: str, what: str) -> None:
  if path.startswith('gs://') or '://' in path:
    raise LaunchError(f'{what}={path!r} is a URL; give the POSIX path of a shared mount '
                      '(e.g. /mnt/shared/runs/x: a Filestore, NFS or gcsfuse mount).')
  if not path.startswith('/'):
    raise LaunchError(f'{what}={path!r} is relative; give an absolute path on storage that '
                      'every worker mounts at the same place.')


def parse_env(pairs: list[str]) -> dict[str, str]:
  """KEY=VALUE arguments -> a dict, each checked."""
  env = {}
  for pair in pairs:
    key, sep, value = pair.partition('=')
    if not sep or not ENV_NAME.match(key):
      raise LaunchError(f'--env={pair!r} is invalid: expected NAME=VALUE with NAME made of '
                        'letters, digits and _.')
    env[key] = value
  return env


def env_prefix(env: dict[str, str]) -> str:
  return ' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())


def print_commands(commands: list[list[str]] | list[str]) -> None:
  """Prints commands as a shell would run them (one a line, quoted exactly)."""
  for cmd in commands:
    print(cmd if isinstance(cmd, str) else shlex.join(cmd))
