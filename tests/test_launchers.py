"""Cluster launchers: the exact commands of --dry_run for a sample TPU slice and SLURM
cluster, and one-line errors for bad arguments (nothing is started; gcloud and sbatch need
not be installed)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / 'launch'
sys.path.insert(0, str(LAUNCH))

import slurm  # noqa: E402
import tpu_slice  # noqa: E402

TRAIN = ['--', 'train', '--config=configs/pretrain.py:roberta_base',
         '--workdir=/mnt/shared/runs/base']


def dry_run(main, argv, capsys) -> list[str]:
  assert main(argv + ['--dry_run'] + TRAIN) == 0
  return capsys.readouterr().out.splitlines()


def error_of(main, argv, capsys) -> str:
  cut = argv.index('--') if '--' in argv else len(argv)
  command = argv[cut:] or TRAIN  # the sample command unless the case gives its own
  with pytest.raises(SystemExit) as exit_info:
    main(argv[:cut] + ['--dry_run'] + command)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_tpu_queued_slice_dry_run(capsys):
  lines = dry_run(tpu_slice.main, [
      '--tpu=paper-v5e', '--zone=us-west4-a', '--project=my-proj', '--slice=queued',
      '--accelerator_type=v5litepod-16', '--spot', '--delete=on_success',
      '--env=TRAINBIG_DATA_DIR=/mnt/shared/tfds'], capsys)
  commands = [shlex.split(l) for l in lines if not l.startswith('#')]
  where = ['--zone=us-west4-a', '--project=my-proj']
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'paper-v5e',
                         *where, '--node-id=paper-v5e', '--accelerator-type=v5litepod-16',
                         '--runtime-version=v2-alpha-tpuv5-lite', '--spot']
  assert commands[1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe',
                         'paper-v5e', *where, '--format=value(state.state)']
  assert commands[2][:4] == ['git', '-C', str(LAUNCH.parent), 'archive']
  assert commands[2][-1] == 'HEAD'
  assert commands[3][3:5] == ['tpu-vm', 'scp'] and '--worker=all' in commands[3]
  install = commands[4]
  assert install[3:6] == ['tpu-vm', 'ssh', 'paper-v5e'] and '--worker=all' in install
  assert 'pip install --quiet "$HOME/trainbig_jax[tpu]"' in install[-1]
  run = commands[5]
  assert run[3:6] == ['tpu-vm', 'ssh', 'paper-v5e'] and '--worker=all' in run
  remote = run[-1].removeprefix('--command=')
  # The same trainbig command on every worker, with --distributed, its output prefixed by
  # the worker's number and kept in the shared run folder.
  assert ('TRAINBIG_DATA_DIR=/mnt/shared/tfds $HOME/trainbig_venv/bin/trainbig train '
          '--config=configs/pretrain.py:roberta_base --workdir=/mnt/shared/runs/base '
          '--distributed 2>&1') in remote
  assert 'agent-worker-number' in remote and 'sed -u "s/^/[w$W] /"' in remote
  assert 'tee -a /mnt/shared/runs/base/logs/worker_$W.log' in remote
  assert 'pkill -TERM' in commands[6][-1]
  assert commands[7] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'paper-v5e',
                         *where, '--force', '--quiet']
  assert len(commands) == 8


def test_tpu_reuse_dry_run_checks_state_and_keeps_slice(capsys):
  lines = dry_run(tpu_slice.main, ['--tpu=pod', '--zone=us-central2-b', '--skip_install'],
                  capsys)
  commands = [shlex.split(l) for l in lines if not l.startswith('#')]
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'pod',
                         '--zone=us-central2-b', '--format=value(state)']
  assert [c[4] for c in commands[1:]] == ['ssh', 'ssh']  # run, stop: no install, no delete
  assert not any('create' in c or 'delete' in c for c in commands)


@pytest.mark.parametrize('argv, expected', [
    (['--tpu=Pod', '--zone=us-central2-b'], "--tpu='Pod' is invalid"),
    (['--tpu=pod', '--zone=central'], "--zone='central' is invalid"),
    (['--tpu=pod', '--zone=us-central2-b', '--slice=create', '--accelerator_type=v9-8'],
     "--accelerator_type='v9-8' is invalid for --slice=create"),
    (['--tpu=pod', '--zone=us-central2-b', '--spot'], '--spot applies to a slice'),
    (['--tpu=pod', '--zone=us-central2-b', '--env=1X=2'], "--env='1X=2' is invalid"),
    (['--tpu=pod', '--zone=us-central2-b', '--', 'report', '--sweep=/x'],
     "trainbig command 'report' cannot run as a cluster job"),
    (['--tpu=pod', '--zone=us-central2-b', '--', 'train', '--workdir=gs://b/run'],
     "--workdir='gs://b/run' is a URL"),
    (['--tpu=pod', '--zone=us-central2-b', '--', 'train', '--workdir=runs/x'],
     "--workdir='runs/x' is relative"),
    (['--tpu=pod', '--zone=us-central2-b', '--', 'train', '--config=c.py:x'],
     'trainbig train needs --workdir'),
    (['--tpu=pod', '--zone=us-central2-b', '--', 'train', '--workdir=/x', '--distributed'],
     'do not pass --distributed'),
])
def test_tpu_argument_errors(argv, expected, capsys):
  assert expected in error_of(tpu_slice.main, argv, capsys)


def test_slurm_dry_run_script(capsys, tmp_path):
  lines = dry_run(slurm.main, [
      '--nodes=4', '--gpus_per_node=8', '--time=2-00:00:00', '--partition=gpu',
      '--account=nlp', '--repo=/shared/trainbig_jax', '--venv=/shared/venvs/tb',
      '--max_requeues=3', '--env=TRAINBIG_DATA_DIR=/shared/tfds'], capsys)
  assert lines[0] == '# /mnt/shared/runs/base/slurm/trainbig.sbatch:'
  assert lines[-1] == 'sbatch /mnt/shared/runs/base/slurm/trainbig.sbatch'
  script = '\n'.join(lines[1:-2]) + '\n'
  for directive in ('--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8',
                    '--time=2-00:00:00', '--partition=gpu', '--account=nlp', '--requeue',
                    '--signal=B:USR1@300', '--open-mode=append',
                    '--output=/mnt/shared/runs/base/slurm/%x-%j.out'):
    assert f'#SBATCH {directive}\n' in script, directive
  assert ('\nsrun --kill-on-bad-exit=1 --label /shared/venvs/tb/bin/trainbig train '
          '--config=configs/pretrain.py:roberta_base --workdir=/mnt/shared/runs/base '
          '--distributed &\n') in script
  assert 'export TRAINBIG_DATA_DIR=/shared/tfds\ncd /shared/trainbig_jax\n' in script
  assert 'trap requeue_after_save USR1' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
  assert '-lt 3 ]' in script
  path = tmp_path / 'job.sbatch'
  path.write_text(script)
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0  # valid bash


@pytest.mark.parametrize('argv, expected', [
    (['--nodes=0'], '--nodes=0 must be at least 1'),
    (['--time=tomorrow'], "--time='tomorrow' is invalid"),
    (['--job_name=a b'], "--job_name='a b' is invalid"),
    (['--signal_lead_s=5'], '--signal_lead_s=5 is too short'),
    (['--repo=shared/tb'], "--repo='shared/tb' is relative"),
    (['--partition=gpu;rm'], "--partition='gpu;rm' is invalid"),
    (['--', 'train'], 'trainbig train needs --workdir'),
    (['--'], 'no trainbig command'),
])
def test_slurm_argument_errors(argv, expected, capsys):
  assert expected in error_of(slurm.main, argv, capsys)
