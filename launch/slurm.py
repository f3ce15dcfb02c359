"""Submits one trainbig command as a SLURM GPU job: one process per GPU on every node.

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --time=24:00:00 --partition=gpu \
      --env=TRAINBIG_DATA_DIR=/shared/tfds -- \
      train --config=configs/pretrain.py:roberta_large --workdir=/shared/runs/large

writes WORKDIR/slurm/JOB_NAME.sbatch from launch/slurm_job.sbatch.template and runs
`sbatch` on it; --dry_run prints the script and the sbatch command instead. The job starts
`trainbig ... --distributed` through srun in every task (JAX's SLURM detection joins them),
writes its log to WORKDIR/slurm/, checkpoints on SIGTERM and requeues itself before its time
limit (see the template); the requeued job resumes from the run folder. This checkout (on
shared storage) and its venv are used on every node: --repo and --venv default to them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_command import (ROOT, LaunchError, check_command, check_shared_path,  # noqa: E402
                         flag_value, parse_env, split_command)

TEMPLATE = Path(__file__).resolve().parent / 'slurm_job.sbatch.template'
JOB_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')
# SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME = re.compile(r'(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})$')
SLURM_NAME = re.compile(r'[A-Za-z0-9_.,-]+$')


class _Template(string.Template):
  delimiter = '@'  # bash uses $ throughout the script


def check_args(args: argparse.Namespace, command: list[str]) -> list[str]:
  """Checks everything that can be checked before submitting; returns the job's command."""
  if not JOB_NAME.match(args.job_name):
    raise LaunchError(f'--job_name={args.job_name!r} is invalid: letters, digits, _ . -, at '
                      'most 64 characters.')
  for name in ('nodes', 'gpus_per_node', 'cpus_per_task'):
    if getattr(args, name) < 1:
      raise LaunchError(f'--{name}={getattr(args, name)} must be at least 1.')
  if not TIME.match(args.time):
    raise LaunchError(f'--time={args.time!r} is invalid: SLURM time such as 24:00:00 or '
                      '2-00:00:00.')
  if args.max_requeues < 0:
    raise LaunchError(f'--max_requeues={args.max_requeues} must be >= 0.')
  if args.signal_lead_s < 30:
    raise LaunchError(f'--signal_lead_s={args.signal_lead_s} is too short to save a '
                      'checkpoint: give at least 30 seconds.')
  for name in ('partition', 'account', 'qos'):
    value = getattr(args, name)
    if value is not None and not SLURM_NAME.match(value):
      raise LaunchError(f'--{name}={value!r} is invalid: letters, digits and _ . , - only.')
  check_shared_path(args.repo, '--repo')
  check_shared_path(args.venv, '--venv')
  args.env = parse_env(args.env)
  return check_command(command)


def render_script(args: argparse.Namespace, job: list[str]) -> str:
  workdir = flag_value(job, 'workdir') or flag_value(job, 'out')
  directives = [f'#SBATCH --{name}={getattr(args, name)}'
                for name in ('partition', 'account', 'qos') if getattr(args, name)]
  exports = [f'export {k}={shlex.quote(v)}' for k, v in args.env.items()]
  return _Template(TEMPLATE.read_text()).substitute(
      job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
      cpus_per_task=args.cpus_per_task, time=args.time, log_dir=log_dir(workdir),
      signal_lead_s=args.signal_lead_s, max_requeues=args.max_requeues,
      extra_directives='\n'.join(directives), exports='\n'.join(exports),
      repo=shlex.quote(args.repo),
      trainbig=shlex.join([f'{args.venv}/bin/trainbig', *job]))


def log_dir(workdir: str) -> str:
  return f'{workdir}/slurm'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description='Submit a trainbig command as a SLURM job, one process per GPU.',
      usage='%(prog)s --nodes=N --gpus_per_node=G --time=T [--partition=P] [--dry_run] '
            '-- COMMAND [--flags]')
  parser.add_argument('--job_name', default='trainbig')
  parser.add_argument('--nodes', type=int, default=1)
  parser.add_argument('--gpus_per_node', type=int, default=8)
  parser.add_argument('--cpus_per_task', type=int, default=8,
                      help='CPU cores per process (data loading, host work)')
  parser.add_argument('--time', default='24:00:00', help='time limit of one job (requeued '
                      'after it)')
  parser.add_argument('--partition', default=None)
  parser.add_argument('--account', default=None)
  parser.add_argument('--qos', default=None)
  parser.add_argument('--max_requeues', type=int, default=20,
                      help='requeue before the time limit at most this many times')
  parser.add_argument('--signal_lead_s', type=int, default=300,
                      help='seconds before the time limit at which the job checkpoints')
  parser.add_argument('--repo', default=str(ROOT),
                      help='this repository on shared storage (each task runs from there)')
  parser.add_argument('--venv', default=str(ROOT / '.venv'),
                      help='virtual environment with trainbig_jax[cuda], on shared storage')
  parser.add_argument('--env', action='append', default=[],
                      help='NAME=VALUE exported in the job (repeatable)')
  parser.add_argument('--dry_run', action='store_true',
                      help='print the script and the sbatch command, submit nothing')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help='after --: the trainbig command and its flags')
  args = parser.parse_args(argv)
  try:
    job = check_args(args, split_command(args.command))
    script = render_script(args, job)
    workdir = flag_value(job, 'workdir') or flag_value(job, 'out')
    path = Path(log_dir(workdir)) / f'{args.job_name}.sbatch'
    sbatch = ['sbatch', str(path)]
    if args.dry_run:
      print(f'# {path}:')
      print(script, end='')
      print(f'# submit:\n{shlex.join(sbatch)}')
      return 0
    if shutil.which('sbatch') is None:
      raise LaunchError('sbatch is not on PATH: run this on a SLURM login node, or use '
                        '--dry_run to see the script.')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.sbatch.tmp')
    tmp.write_text(script)
    tmp.replace(path)
    return subprocess.run(sbatch).returncode
  except LaunchError as e:
    parser.exit(2, f'{parser.prog}: error: {e}\n')


if __name__ == '__main__':
  sys.exit(main())
